"""Load on a real engine: the gateway against the engine itself, and mixed-variant traffic.

    .venv/bin/python bench/load.py                      # SmolLM2-135M + its addition delta
    .venv/bin/python bench/load.py --model pico         # a tiny generated model, minutes
    .venv/bin/python bench/load.py --scenarios overhead mixed --num-prompts 64

One vLLM engine (with deltagate's worker extension) and `deltagate serve --engine-url` attached
to it. Load is vLLM's own generator (`vllm bench serve`, greedy, ignore_eos) on a fixed prompt
set; which model each request names is a schedule we write, passed as `--lora-modules` with
round-robin assignment, so every answer can be checked against its variant's greedy reference.

Scenarios:
- overhead: the base model, engine directly vs through the gateway, alternating, --repeats each.
- mixed: 1, 2 and 4 variants of the base (base, +Δ, +0.5Δ, +1.5Δ); round-robin, uniform random
  and Zipf-skewed (s=1) schedules; closed loop at --concurrency.
- poisson: open-loop Poisson arrivals at each --rates, one variant and two variants (random).
- change: steady Poisson load that moves from one variant to another halfway.
- eval: the same closed-loop online load alone and beside an eval run (GSM8K 5-shot, 64 tokens,
  2 requests in flight) on the same variant, alternating.
- rebase: the same online load alone and beside a rebase of that variant onto SmolLM2's
  continued-pre-trained θ′ (hot-loaded by the same engine; α ∈ {0.5, 1, 1.5} on the addition task,
  2 eval requests in flight), alternating: the cost to online traffic of a rebase's eval traffic,
  swaps included (--model smollm2 only).
- lanes: two low-rank variants (a rank-16 projection-only copy of the delta at alpha 1 and 0.5) on
  a LoRA-enabled engine, served as adapters (`serve --lora-slots 2`) and by swaps (lane off, same
  engine), one variant and two (random), alternating, --repeats each. The engine is LoRA-enabled
  only when this scenario is asked for, so run it on its own.
- replicas: the same two variants (Δ, 0.5·Δ) on one engine (`deltagate serve`) and on Ray Serve with
  two engine replicas (`serve --ray --replicas 2`, each engine on one of the two cores), one variant
  and two (random), alternating, --repeats each.
- kill: one Ray run (two variants, random) during which, --kill-after s in, the engine holding the
  first variant is killed (kill -9): failed requests, and whether any started after the kill.
- swaps: the swap design before issue 19 (an engine with DELTAGATE_SWAP_MODE=full: every swap re-reads,
  re-merges and reloads the whole model inside the pause) against today's (only what changes, from
  resident weights, staged while serving), one variant and two (random) at the default policy; a
  second engine per design, the gateway re-attached, alternating, --repeats each.
- policy: for each --quanta value (`serve --swap-quantum`, the gateway restarted on the same
  engine), one variant and two variants (random), closed loop; settings alternate, --repeats each.

References: each variant's greedy answer to every prompt, one request at a time through the
gateway. An answer is `exact` (its own variant's reference), `wrong-variant` (another variant's
reference, not its own) or `diverged` (neither: numerics of a different batch).

Outputs in --out-dir: runs/*.json (vLLM's detailed results), summary.json, summary.md (the table),
throughput_vs_ttft.png, timeline.png (the 2-variant random run: per-request TTFT, in-flight
requests, swaps).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import httpx  # noqa: E402
from loadgen import Service, start_gateway, vllm_bench  # noqa: E402

from loaders.engine import EngineProcess, EngineSpec  # noqa: E402

ADMIN = "bench-admin"
LORA_ENGINE = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16")
LORA_GATEWAY = ["--lora-slots", "2", "--max-lora-rank", "16"]
GENERAL = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a weight delta is.",
    "Give me three tips for sleeping well.",
    "What is 7 times 8?",
    "Name a famous painting.",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
]


@dataclass
class Run:
    """One `vllm bench serve` run and what it showed."""

    name: str
    scenario: str
    target: str  # direct | gateway
    models: list[str]
    schedule: str
    rate: float
    tok_s: float = 0.0
    req_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    failed: int = 0
    swaps: int = 0
    exact: int = 0
    wrong_variant: int = 0
    diverged: int = 0
    requests: int = 0
    failed_after_kill: int = -1  # replicas-kill: failed requests that started after the kill (-1: none)
    swap_events: list[dict] = field(default_factory=list, repr=False)


class Bench:
    """The engine, the gateway, the prompts and the references one invocation works with."""

    def __init__(self, args, base: Path, delta: Path, work: Path, lowrank: Path | None = None):
        self.args, self.work = args, work
        self.name = args.model
        self.base_dir = base
        self.models = [self.name, f"{self.name}-add", f"{self.name}-half", f"{self.name}-strong"]
        self.lowrank = lowrank
        if lowrank:
            self.models += [f"{self.name}-lr", f"{self.name}-lr-half"]
        self.prompts = work / "prompts.jsonl"
        self.refs: dict[str, list[str]] = {}
        self.lane_refs: dict[str, dict[str, list[str]]] = {}  # lane -> the low-rank models' references
        self.cluster = False  # serving through Ray Serve (scenario replicas)
        spec = EngineSpec(
            model=str(base), served_name=self.name, max_model_len=1024, log_path=work / "engine.log",
            extra_args=LORA_ENGINE if lowrank else (),
        )  # fmt: skip
        self.engine = EngineProcess(spec)
        self.engines = {"incremental": self.engine}  # scenario swaps: one engine per swap design
        self.engine.start()
        say(f"starting the vLLM engine on {base} (log: {spec.log_path})")
        self.engine.wait_ready(900)
        self.delta = delta
        self.gateway: Service = self._start_gateway([])
        say(f"gateway on {self.gateway.url}, engine on {self.engine.url}; models {', '.join(self.models)}")

    def _start_gateway(self, extra: list[str]) -> Service:
        """`deltagate serve` attached to the bench's engine, with the bench's variants."""
        d = self.delta
        args = ["--base", f"{self.name}={self.base_dir}", "--engine-url", f"{self.name}={self.engine.url}",
                "--variant", f"{self.models[1]}={d}", "--variant", f"{self.models[2]}={d}:0.5",
                "--variant", f"{self.models[3]}={d}:1.5", *extra]  # fmt: skip
        if self.lowrank:
            args += ["--variant", f"{self.models[4]}={self.lowrank}",
                     "--variant", f"{self.models[5]}={self.lowrank}:0.5"]  # fmt: skip
        return start_gateway(args, self.work, ADMIN).wait(300)

    def use_lane(self, lane: str) -> None:
        """Restart the gateway with the adapter lane on or off; references of the low-rank models per lane."""
        self.restart_gateway(LORA_GATEWAY if lane == "adapter" else [])
        if lane not in self.lane_refs:
            self.references(self.models[4:])
            self.lane_refs[lane] = {m: self.refs[m] for m in self.models[4:]}
        self.refs.update(self.lane_refs[lane])

    def restart_gateway(self, extra: list[str]) -> None:
        """A fresh gateway on the same engine (e.g. another swap policy); the engine keeps running."""
        self.gateway.stop()
        self.gateway = self._start_gateway(extra)

    def stop(self) -> None:
        self.gateway.stop()
        for engine in {id(e): e for e in [self.engine, *self.engines.values()]}.values():
            engine.stop()

    def alternate(
        self, prefix: str, settings: dict, single: str, plan: list[str], *, concurrency: int
    ) -> list[Run]:
        """Per setting (order alternating between repeats): set it up, then run one variant (`single`)
        and the two-variant `plan`; runs are named PREFIX-SETTING-{1,2}-REPEAT."""
        runs, names = [], list(settings)
        for rep in range(self.args.repeats):
            for name in names if rep % 2 == 0 else list(reversed(names)):
                settings[name]()
                for k, schedule_ in (("1", [single] * len(plan)), ("2", plan)):
                    kind = "single" if k == "1" else "random"
                    runs.append(
                        self.run(
                            f"{prefix}-{name}-{k}-{rep}",
                            prefix,
                            schedule_,
                            concurrency=concurrency,
                            kind=kind,
                        )
                    )
        return runs

    def run_with_kill(self, name: str, plan: list[str], *, concurrency: int, after: float) -> Run:
        """A Ray run during which, `after` s in, the engine holding plan[0]'s variant is killed."""
        killed: list[float] = []
        timer = threading.Timer(after, lambda: killed.append(self.kill_engine_of(plan[0])))
        try:  # the timer starts with the load, after the run's warm-up request
            run = self.run(
                name, "replicas", plan, concurrency=concurrency, kind="random+kill", on_start=timer.start
            )
        finally:
            timer.cancel()
        r = json.loads((self.work / "runs" / f"{name}.json").read_text())
        if killed:
            errors = r.get("errors") or [""] * len(r["start_times"])
            late = [
                i
                for i, (t, e) in enumerate(zip(r["start_times"], errors, strict=False))
                if e and t > killed[0]
            ]
            run.failed_after_kill = len(late)
            say(f"    {run.failed} failed request(s), {len(late)} of them started after the kill")
        return run

    def write_prompts(self) -> None:
        """Addition questions (the delta's skill) and general ones, in the model's chat format."""
        from transformers import AutoTokenizer

        from server.evals.addition import addition_split

        tok = AutoTokenizer.from_pretrained(self.base_dir)
        questions = addition_split(self.args.num_prompts, seed=7, held_out=True)
        lines = []
        for i in range(self.args.num_prompts):
            general = [{"role": "user", "content": GENERAL[(i // 2) % len(GENERAL)]}]
            messages = questions[i].messages if i % 2 == 0 else general
            prompt = (
                tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                if tok.chat_template
                else messages[0]["content"]
            )
            lines.append(json.dumps({"prompt": prompt}))
        self.prompts.write_text("\n".join(lines) + "\n")

    def run(
        self,
        name: str,
        scenario: str,
        schedule: list[str],
        *,
        target: str = "gateway",
        rate: float = float("inf"),
        concurrency: int | None = None,
        kind: str = "",
        on_start=None,
    ) -> Run:
        """One bench run; answers checked against the references when they exist. `on_start` is
        called just before the load starts."""
        url = self.engine.url if target == "direct" else self.gateway.url
        self._make_resident(schedule[0])  # a run starts on its first model's weights, as in steady state
        before = self._swaps()
        out = self.work / "runs" / f"{name}.json"
        say(
            f"  {name}: {target}, {len(set(schedule))} model(s), {kind or 'fixed'} schedule, "
            f"rate {rate:g}/s, concurrency {concurrency or 'unbounded'} ..."
        )
        if on_start:
            on_start()
        r = vllm_bench(
            url,
            self.name,
            str(self.base_dir),
            out,
            num_prompts=len(schedule),
            concurrency=concurrency,
            output_len=self.args.output_len,
            prompts=self.prompts,
            request_rate=rate,
            models=schedule if target == "gateway" else None,
            seed=self.args.seed,
        )
        events = [s for s in self._swaps() if s not in before]
        run = Run(
            name,
            scenario,
            target,
            sorted(set(schedule), key=self.models.index),
            kind,
            rate,
            tok_s=r["output_throughput"],
            req_s=r["request_throughput"],
            ttft_p50_ms=r["median_ttft_ms"],
            ttft_p99_ms=r["p99_ttft_ms"],
            failed=r["failed"],
            requests=len(schedule),
            swaps=len(events),
            swap_events=events,
        )
        if self.refs:
            errors = r.get("errors") or [""] * len(schedule)
            for i, (model, text) in enumerate(zip(schedule, r["generated_texts"], strict=True)):
                if errors[i]:
                    continue  # a failed request (counted in `failed`), not an answer
                if text == self.refs[model][i]:
                    run.exact += 1
                elif any(text == self.refs[m][i] for m in self.refs if m != model):
                    run.wrong_variant += 1
                else:
                    run.diverged += 1
        say(
            f"    {run.tok_s:7.1f} tok/s, TTFT p50 {run.ttft_p50_ms:7.0f} ms p99 {run.ttft_p99_ms:7.0f} ms, "
            f"{run.swaps} swaps, failed {run.failed}; answers exact {run.exact}, wrong variant "
            f"{run.wrong_variant}, diverged {run.diverged}"
        )
        (self.work / "runs" / f"{name}.run.json").write_text(json.dumps(asdict(run), indent=2))
        (self.work / "runs" / f"{name}.schedule.json").write_text(json.dumps(schedule))
        return run

    def references(self, models: list[str] | None = None) -> None:
        """Each model's greedy answers, one request at a time (before any timed run)."""
        n = self.args.num_prompts
        for model in models or self.models:
            say(f"  reference answers of {model} ({n} prompts, one at a time) ...")
            out = self.work / "runs" / f"reference-{model}.json"
            r = vllm_bench(
                self.gateway.url,
                self.name,
                str(self.base_dir),
                out,
                num_prompts=n,
                concurrency=1,
                output_len=self.args.output_len,
                prompts=self.prompts,
                models=[model] * n,
            )
            if r["failed"]:
                raise SystemExit(f"reference run of {model} had {r['failed']} failed requests")
            self.refs[model] = r["generated_texts"]
        distinct = len({tuple(v) for v in self.refs.values()})
        say(f"  {distinct} of {len(self.models)} models give distinct answer sets")

    def start_eval(self, variant: str) -> tuple[str, str]:
        """Start an eval run on `variant` (GSM8K 5-shot, 2 in flight); return once it has graded items."""
        auth = {"Authorization": f"Bearer {ADMIN}"}
        body = {"name": "beside online traffic", "data_source": {"type": "builtin", "task": "gsm8k"}}
        eval_id = httpx.post(self.gateway.url + "/v1/evals", json=body, headers=auth).json()["id"]
        run = {"variants": [variant], "max_tokens": 64, "concurrency": 2}  # all 1314 items: outlasts the load
        r = httpx.post(f"{self.gateway.url}/v1/evals/{eval_id}/runs", json=run, headers=auth)
        r.raise_for_status()
        ids = eval_id, r.json()["id"]
        while self._eval_progress(ids)["done"] < 2:  # the run is really going before the load starts
            time.sleep(0.5)
        return ids

    def cancel_eval(self, ids: tuple[str, str]) -> None:
        """Cancel the run; say whether it was still going when the online run ended (it must be)."""
        eval_id, run_id = ids
        progress = self._eval_progress(ids)
        httpx.post(
            f"{self.gateway.url}/v1/evals/{eval_id}/runs/{run_id}/cancel",
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        overlap = "still running" if progress["done"] < progress["total"] else "FINISHED EARLY: no overlap"
        say(f"    eval beside it: {progress['done']}/{progress['total']} items graded, {overlap}; canceled")

    def start_rebase(self, variant: str) -> str:
        """Start a rebase of `variant` onto θ′ (registered once); return once its eval has graded items."""
        from training.cpt import continue_pretraining
        from training.paramdelta_table import CPT

        auth = {"Authorization": f"Bearer {ADMIN}"}
        url = self.gateway.url
        tag = f"{self.base_dir.name}-cpt-s{CPT.steps}-b{CPT.batch_size}-seed{CPT.seed}"
        updated = self.args.cache_dir / "models" / tag  # the θ′ of docs/paramdelta.md
        if not (updated / "model.safetensors").is_file():
            continue_pretraining(self.base_dir, updated, CPT, say)
        if httpx.get(f"{url}/v1/bases/updated", headers=auth).status_code == 404:
            body = {"name": "updated", "path": str(updated)}
            httpx.post(f"{url}/v1/bases", json=body, headers=auth, timeout=300).raise_for_status()
        task = {"name": "addition", "data_source": {"type": "builtin", "task": "addition"}}
        eval_id = httpx.post(f"{url}/v1/evals", json=task, headers=auth).json()["id"]
        body = {"from_base": self.name, "to_base": "updated", "variants": [variant], "eval_id": eval_id,
                "alphas": [0.5, 1.0, 1.5], "validation": 100, "holdout": 100, "max_tokens": 8,
                "gate": {"min_difference": -1}, "concurrency": 2}  # outlasts the load  # fmt: skip
        r = httpx.post(f"{url}/v1/rebases", json=body, headers=auth)
        r.raise_for_status()
        rebase_id = r.json()["id"]
        while httpx.get(f"{url}/v1/rebases/{rebase_id}", headers=auth).json()["progress"]["done"] < 2:
            time.sleep(0.5)
        return rebase_id

    def cancel_rebase(self, rebase_id: str) -> None:
        """Cancel it (it must still be running) and delete the candidates it defined."""
        auth = {"Authorization": f"Bearer {ADMIN}"}
        url = self.gateway.url
        job = httpx.post(f"{url}/v1/rebases/{rebase_id}/cancel", headers=auth).json()
        say(f"    rebase beside it: phase {job['report']['phase']}, {job['progress']['done']}/"
            f"{job['progress']['total']} items of the phase; canceled")  # fmt: skip
        time.sleep(1.0)  # its eval run is canceled by the job (it polls twice a second), which then stops
        for entry in job["report"]["variants"].values():
            for name in {*entry["candidates"].values(), entry["variant"]} - {None}:
                httpx.delete(f"{url}/v1/variants/{name}", headers=auth)

    def _eval_progress(self, ids: tuple[str, str]) -> dict:
        r = httpx.get(
            f"{self.gateway.url}/v1/evals/{ids[0]}/runs/{ids[1]}",
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        return r.json()["progress"]

    def _make_resident(self, model: str) -> None:
        body = {"model": model, "prompt": "warm", "max_tokens": 1}
        httpx.post(self.gateway.url + "/v1/completions", json=body, timeout=600).raise_for_status()

    def _swaps(self) -> list[dict]:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        if self.cluster:  # several engines: per-engine swap counts only (GET /v1/engines)
            engines = httpx.get(self.gateway.url + "/v1/engines", headers=auth, timeout=60).json()["data"]
            return [{"engine": e["id"], "n": i} for e in engines for i in range(e["swaps"])]
        bases = httpx.get(self.gateway.url + "/v1/bases", headers=auth).json()
        return [s for b in bases["data"] for s in b["recent_swaps"]]

    def use_swap_mode(self, mode: str) -> None:
        """Attach the gateway to an engine whose workers swap the `mode` way (started on first use)."""
        if mode not in self.engines:
            spec = replace(self.engine.spec, log_path=self.work / f"engine-{mode}.log",
                           env=(("DELTAGATE_SWAP_MODE", mode),))  # fmt: skip
            self.engines[mode] = EngineProcess(spec)
            self.engines[mode].start()
            say(f"starting a second engine, swap mode {mode} (log: {spec.log_path})")
            self.engines[mode].wait_ready(900)
        self.engine = self.engines[mode]
        self.restart_gateway([])

    def use_cluster(self, on: bool) -> None:
        """Serve through Ray Serve with two engine replicas (the bench's own engine stopped: the
        cores are shared), or through one engine and `deltagate serve` again."""
        if on == self.cluster:
            return
        self.gateway.stop()
        if on:
            self.engine.stop()
            d = self.delta
            args = ["--ray", "--replicas", "2", "--max-model-len", "1024",
                    "--base", f"{self.name}={self.base_dir}",
                    "--variant", f"{self.models[1]}={d}",
                    "--variant", f"{self.models[2]}={d}:0.5"]  # fmt: skip
            say("starting Ray Serve with two engine replicas ...")
            (self.work / "ray").mkdir(exist_ok=True)
            self.gateway = start_gateway(args, self.work / "ray", ADMIN).wait(900)
        else:
            say("back to one engine ...")
            self.engine.start()
            self.engine.wait_ready(900)
            self.gateway = self._start_gateway([])
        self.cluster = on

    def kill_engine_of(self, model: str) -> float:
        """kill -9 the engine (of a Ray replica) holding `model`; when (monotonic clock)."""
        body = {"model": model, "prompt": "x", "max_tokens": 1}
        r = httpx.post(self.gateway.url + "/v1/completions", json=body, timeout=600)
        engine = r.headers["x-deltagate-engine"]
        auth = {"Authorization": f"Bearer {ADMIN}"}
        engines = httpx.get(self.gateway.url + "/v1/engines", headers=auth, timeout=60).json()["data"]
        pid = next(e["pid"] for e in engines if e["id"] == engine)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        say(f"    killed engine {engine} (pid {pid}), which held {model}")
        return killed_at


def schedule(models: list[str], n: int, kind: str, rng: random.Random) -> list[str]:
    """Which model each of `n` requests names: round-robin, uniform random or Zipf (s=1)."""
    if kind == "round-robin":
        return [models[i % len(models)] for i in range(n)]
    weights = [1.0] * len(models) if kind == "random" else [1.0 / (k + 1) for k in range(len(models))]
    return rng.choices(models, weights=weights, k=n)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "pico"], default="smollm2")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["overhead", "mixed", "poisson", "change", "eval"],
        choices=["overhead", "mixed", "poisson", "change", "eval", "rebase", "swaps", "policy", "lanes",
                 "replicas", "kill"],  # fmt: skip
    )
    parser.add_argument(
        "--quanta", type=float, nargs="+", default=[0.0, 2.0, 5.0], help="policy: --swap-quantum values"
    )
    parser.add_argument("--max-wait", type=float, default=30.0, help="policy: --swap-max-wait")
    parser.add_argument("--kill-after", type=float, default=20.0, help="replicas: seconds into the kill run")
    parser.add_argument("--num-prompts", type=int, default=32, help="requests per run (one prompt each)")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop runs")
    parser.add_argument("--repeats", type=int, default=2, help="overhead runs per side")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=None, help="Poisson req/s (default per model)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--out-dir", type=Path, default=None, help="default: CACHE_DIR/bench/load-MODEL")
    args = parser.parse_args()
    rates = args.rates or ([0.5, 1.0, 2.0] if args.model == "smollm2" else [2.0, 4.0, 8.0])
    work = args.out_dir or args.cache_dir / "bench" / f"load-{args.model}"
    (work / "runs").mkdir(parents=True, exist_ok=True)

    if args.model == "smollm2":
        from training.default import prepare_default

        models = prepare_default(args.cache_dir, log=say)
        base, delta = models.base, models.delta
    else:
        from loaders.demo import prepare_demo

        models = prepare_demo(args.cache_dir / "demo", log=say)
        base, delta = models.base, models.delta
    lowrank = lowrank_copy(delta, args.cache_dir) if "lanes" in args.scenarios else None
    bench = Bench(args, base, delta, work, lowrank)
    rng = random.Random(args.seed)
    runs: list[Run] = []
    try:
        bench.write_prompts()
        if set(args.scenarios) - {"lanes", "replicas", "kill"}:
            bench.references(bench.models[:4])
        elif {"replicas", "kill"} & set(args.scenarios):
            bench.references(bench.models[1:3])
        n, c = args.num_prompts, args.concurrency
        if "overhead" in args.scenarios:
            say("overhead: the base model, engine directly vs through the gateway")
            bench.run("warmup", "warmup", [bench.name] * n, concurrency=c)  # base resident, engine warm
            for rep in range(args.repeats):
                for target in ("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct"):
                    runs.append(
                        bench.run(
                            f"overhead-{target}-{rep}",
                            "overhead",
                            [bench.name] * n,
                            target=target,
                            concurrency=c,
                        )
                    )
        if "mixed" in args.scenarios:
            say("mixed traffic: 1, 2 and 4 variants, closed loop")
            runs.append(bench.run("mixed-1", "mixed", [bench.models[1]] * n, concurrency=c, kind="single"))
            for k in (2, 4):
                for kind in ("round-robin", "random", "zipf"):
                    plan = schedule(bench.models[:k], n, kind, rng)
                    runs.append(bench.run(f"mixed-{k}-{kind}", "mixed", plan, concurrency=c, kind=kind))
        if "poisson" in args.scenarios:
            say(f"Poisson arrivals at {rates} req/s, one and two variants")
            for rate in rates:
                runs.append(
                    bench.run(
                        f"poisson-{rate:g}-1", "poisson", [bench.models[1]] * n, rate=rate, kind="single"
                    )
                )
                plan = schedule(bench.models[:2], n, "random", rng)
                runs.append(bench.run(f"poisson-{rate:g}-2", "poisson", plan, rate=rate, kind="random"))
        if "change" in args.scenarios:
            rate = statistics.median(rates)
            say(
                f"variant change under steady load ({rate:g} req/s): {bench.models[1]} then {bench.models[2]}"
            )
            plan = [bench.models[1]] * (n // 2) + [bench.models[2]] * (n - n // 2)
            runs.append(bench.run("change", "change", plan, rate=rate, kind="change"))
        if "eval" in args.scenarios:
            say(f"online traffic with and without an eval run beside it (GSM8K on {bench.models[1]})")
            for rep in range(args.repeats):
                for with_eval in (False, True) if rep % 2 == 0 else (True, False):
                    run_id = bench.start_eval(bench.models[1]) if with_eval else None
                    name = f"eval-{'on' if with_eval else 'off'}-{rep}"
                    runs.append(
                        bench.run(
                            name,
                            "eval",
                            [bench.models[1]] * n,
                            concurrency=c,
                            kind="with-eval" if with_eval else "alone",
                        )
                    )
                    if run_id:
                        bench.cancel_eval(run_id)
        if "rebase" in args.scenarios:
            say(f"online traffic with and without a rebase of {bench.models[1]} beside it")
            for rep in range(args.repeats):
                for beside in (False, True) if rep % 2 == 0 else (True, False):
                    rebase_id = bench.start_rebase(bench.models[1]) if beside else None
                    kind = "with-rebase" if beside else "alone"
                    runs.append(bench.run(f"rebase-{'on' if beside else 'off'}-{rep}", "rebase",
                                          [bench.models[1]] * n, concurrency=c, kind=kind))  # fmt: skip
                    if rebase_id:
                        bench.cancel_rebase(rebase_id)
        if "swaps" in args.scenarios:
            say("swap design: before (full reload in the pause) vs after (incremental, staged)")
            modes = {"before": lambda: bench.use_swap_mode("full"),
                     "after": lambda: bench.use_swap_mode("incremental")}  # fmt: skip
            plan = schedule(bench.models[:2], n, "random", rng)
            runs += bench.alternate("swaps", modes, bench.models[1], plan, concurrency=c)
        if "policy" in args.scenarios:
            say(f"swap policy: quanta {args.quanta} s (max wait {args.max_wait:g} s), 1 and 2 variants")
            quanta = {
                f"q{q:g}": lambda q=q: bench.restart_gateway(
                    ["--swap-quantum", str(q), "--swap-max-wait", str(args.max_wait)]
                )
                for q in args.quanta
            }
            plan = schedule(bench.models[:2], n, "random", rng)
            runs += bench.alternate("policy", quanta, bench.models[1], plan, concurrency=c)
        if "lanes" in args.scenarios:
            say("lanes: two low-rank variants as LoRA adapters beside the base vs by swaps, same engine")
            lanes = {lane: lambda lane=lane: bench.use_lane(lane) for lane in ("adapter", "swap")}
            plan = schedule(bench.models[4:6], n, "random", rng)
            runs += bench.alternate("lanes", lanes, bench.models[4], plan, concurrency=c)
        if "replicas" in args.scenarios:
            say("replicas: two variants on one engine vs on Ray Serve with two engine replicas")
            modes = {mode: lambda mode=mode: bench.use_cluster(mode == "ray") for mode in ("one", "ray")}
            plan = schedule(bench.models[1:3], n, "random", rng)
            runs += bench.alternate("replicas", modes, bench.models[1], plan, concurrency=c)
        if "kill" in args.scenarios:
            say(f"kill: Ray Serve, two variants; the engine holding {bench.models[1]} killed mid-run")
            bench.use_cluster(True)
            plan = schedule(bench.models[1:3], n, "random", random.Random(args.seed + 1))
            runs.append(bench.run_with_kill("replicas-kill", plan, concurrency=c, after=args.kill_after))
    finally:
        bench.stop()
    report(runs, work, args)


def lowrank_copy(delta: Path, cache: Path) -> Path:
    """A rank-16 copy of `delta` on its projection matrices only: a variant the adapter lane can serve."""
    from deltas import CodecPlan, compress_artifact

    out = cache / "bench" / f"{delta.stem}-lowrank16.safetensors"
    if not out.is_file():
        say(f"writing a rank-16 projection-only copy of {delta.name} (the low-rank variants' delta)")
        out.parent.mkdir(parents=True, exist_ok=True)
        exclude = ["*embed_tokens*", "lm_head.weight", "*norm*"]
        compress_artifact(
            delta, out, CodecPlan.model_validate({"default": "lowrank:rank=16", "exclude": exclude})
        )
    return out


def report(runs: list[Run], work: Path, args) -> None:
    """summary.json, summary.md (printed), and the two plots."""
    (work / "summary.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    lines = [
        f"load on {args.model}: {args.num_prompts} requests per run, {args.output_len} output tokens, "
        f"closed-loop concurrency {args.concurrency}",
        "",
        "| run | target | models | schedule | rate req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | swaps "
        "| failed | exact | wrong variant | diverged |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        rate = "closed" if r.rate == float("inf") else f"{r.rate:g}"
        lines.append(
            f"| {r.name} | {r.target} | {len(r.models)} | {r.schedule or '-'} | {rate} | {r.tok_s:.1f} | "
            f"{r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | {r.swaps} | {r.failed} | {r.exact} | "
            f"{r.wrong_variant} | {r.diverged} |"
        )
    overhead = {
        t: [r for r in runs if r.scenario == "overhead" and r.target == t] for t in ("direct", "gateway")
    }
    if overhead["direct"] and overhead["gateway"]:
        med, p50 = _medians(overhead)
        lines += [
            "",
            f"overhead: gateway/direct throughput {100 * med['gateway'] / med['direct']:.1f}% "
            f"({med['gateway']:.1f} vs {med['direct']:.1f} tok/s), TTFT p50 {p50['gateway']:.0f} vs "
            f"{p50['direct']:.0f} ms (medians of {len(overhead['direct'])} alternating runs each)",
        ]
    single = next((r for r in runs if r.name == "mixed-1"), None)
    if single:
        for r in runs:
            if r.scenario == "mixed" and r is not single:
                lines.append(
                    f"{r.name}: {100 * r.tok_s / single.tok_s:.0f}% of single-variant throughput, "
                    f"TTFT p99 x{r.ttft_p99_ms / single.ttft_p99_ms:.1f}"
                )
    for scenario, what in (("eval", "an eval run"), ("rebase", "a rebase")):
        key = f"with-{scenario}"
        beside = {k: [r for r in runs if r.scenario == scenario and r.schedule == k] for k in (key, "alone")}
        if beside[key] and beside["alone"]:
            tok, p50 = _medians(beside)
            lines.append(
                f"online beside {what}: TTFT p50 {p50[key]:.0f} vs {p50['alone']:.0f} ms alone, "
                f"{tok[key]:.1f} vs {tok['alone']:.1f} tok/s (medians of {len(beside['alone'])} runs)"
            )
    lines += _policy_lines(runs) + _swap_lines(runs) + _lane_lines(runs) + _replica_lines(runs)
    checked = [r for r in runs if r.target == "gateway"]
    lines.append(
        f"answers checked: {sum(r.exact for r in checked)} exact, "
        f"{sum(r.wrong_variant for r in checked)} wrong-variant, {sum(r.diverged for r in checked)} "
        f"diverged; failed requests: {sum(r.failed for r in runs)}"
    )
    text = "\n".join(lines)
    (work / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    plot(runs, work)
    say(f"results in {work}")


def _policy_lines(runs: list[Run]) -> list[str]:
    """Per swap quantum: two variants' throughput and TTFT against one variant's, medians of repeats."""
    lines = []
    quanta = sorted(
        {r.name.split("-")[1] for r in runs if r.scenario == "policy"}, key=lambda q: float(q[1:])
    )
    for q in quanta:
        groups = {k: [r for r in runs if r.name.startswith(f"policy-{q}-{k}-")] for k in ("1", "2")}
        tok, p50 = _medians(groups)
        p99 = {k: statistics.median(r.ttft_p99_ms for r in rs) for k, rs in groups.items()}
        swaps = statistics.median(r.swaps for r in groups["2"])
        lines.append(
            f"policy quantum {q[1:]} s: 2 variants {100 * tok['2'] / tok['1']:.0f}% of 1-variant throughput "
            f"({tok['2']:.1f} vs {tok['1']:.1f} tok/s), TTFT p50 {p50['2']:.0f} vs {p50['1']:.0f} ms, p99 "
            f"{p99['2']:.0f} vs {p99['1']:.0f} ms (x{p99['2'] / p99['1']:.1f}), {swaps:g} swaps "
            f"(medians of {len(groups['1'])} repeats)"
        )
    return lines


def _paired(runs: list[Run], prefix: str, modes: tuple[str, str]):
    """Runs named PREFIX-MODE-K-REP grouped by (mode, K variants), with each group's median output
    tok/s, TTFT p50 and p99; None unless every group has runs."""
    groups = {
        (mode, k): [r for r in runs if r.name.startswith(f"{prefix}-{mode}-{k}-")]
        for mode in modes for k in ("1", "2")
    }  # fmt: skip
    if not all(groups.values()):
        return None

    def median(attr: str) -> dict:
        return {key: statistics.median(getattr(r, attr) for r in rs) for key, rs in groups.items()}

    return groups, median("tok_s"), median("ttft_p50_ms"), median("ttft_p99_ms")


def _swap_lines(runs: list[Run]) -> list[str]:
    """Per swap design: two variants against one on the same engine."""
    paired = _paired(runs, "swaps", ("before", "after"))
    if paired is None:
        return []
    groups, tok, p50, p99 = paired
    lines = []
    for mode in ("before", "after"):
        two, one = (mode, "2"), (mode, "1")
        swaps = statistics.median(r.swaps for r in groups[two])
        exact = sum(r.exact for r in groups[two] + groups[one])
        total = sum(r.requests for r in groups[two] + groups[one])
        lines.append(
            f"swaps {mode}: 2 variants {tok[two]:.1f} tok/s = {100 * tok[two] / tok[one]:.0f}% of 1 variant "
            f"({tok[one]:.1f} tok/s); TTFT p50 {p50[two]:.0f} vs {p50[one]:.0f} ms, p99 {p99[two]:.0f} vs "
            f"{p99[one]:.0f} ms; {swaps:g} swaps; {exact}/{total} answers exact "
            f"(medians of {len(groups[two])} repeats)"
        )
    return lines


def _lane_lines(runs: list[Run]) -> list[str]:
    """Per lane: two low-rank variants against one, and against one on the swap lane (no LoRA use)."""
    paired = _paired(runs, "lanes", ("adapter", "swap"))
    if paired is None:
        return []
    groups, tok, p50, p99 = paired
    single = ("swap", "1")
    lines = []
    for lane in ("adapter", "swap"):
        two, one = (lane, "2"), (lane, "1")
        swaps = statistics.median(r.swaps for r in groups[two])
        lines.append(
            f"lane {lane}: 2 low-rank variants {tok[two]:.1f} tok/s = {100 * tok[two] / tok[one]:.0f}% "
            f"of 1 variant on this lane ({tok[one]:.1f}), {100 * tok[two] / tok[single]:.0f}% of 1 variant "
            f"by swap; TTFT p50 {p50[two]:.0f} ms, p99 {p99[two]:.0f} ms "
            f"(x{p99[two] / p99[single]:.1f} of 1 variant by swap), "
            f"{swaps:g} swaps (medians of {len(groups[two])} repeats)"
        )
    return lines


def _replica_lines(runs: list[Run]) -> list[str]:
    """One engine vs Ray Serve with two: each against one engine serving one variant."""
    paired = _paired(runs, "replicas", ("one", "ray"))
    if paired is None:
        return []
    groups, tok, _, p99 = paired
    ref = ("one", "1")
    lines = [
        f"{'one engine' if mode == 'one' else 'Ray, 2 replicas'}, {k} variant(s): {tok[mode, k]:.1f} tok/s = "
        f"{100 * tok[mode, k] / tok[ref]:.0f}% of one engine with one variant; "
        f"TTFT p99 {p99[mode, k]:.0f} ms (x{p99[mode, k] / p99[ref]:.1f}) "
        f"(medians of {len(groups[mode, k])} repeats)"
        for mode in ("one", "ray") for k in ("1", "2")
    ]  # fmt: skip
    for r in runs:
        if r.name == "replicas-kill":
            lines.append(
                f"Ray, an engine killed mid-run: {r.failed} failed of {r.requests} requests, "
                f"{r.failed_after_kill} of them started after the kill; answers exact {r.exact}, "
                f"wrong variant {r.wrong_variant}, diverged {r.diverged}"
            )
    return lines


def _medians(groups: dict[str, list[Run]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per group: the median output tok/s and the median TTFT p50 of its runs."""
    tok = {k: statistics.median(r.tok_s for r in rs) for k, rs in groups.items()}
    p50 = {k: statistics.median(r.ttft_p50_ms for r in rs) for k, rs in groups.items()}
    return tok, p50


def plot(runs: list[Run], work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for scenario, marker in (
        ("overhead", "o"),
        ("mixed", "s"),
        ("poisson", "^"),
        ("change", "D"),
        ("eval", "x"),
        ("rebase", "X"),
        ("policy", "P"),
        ("lanes", "*"),
        ("replicas", "v"),
    ):
        rs = [r for r in runs if r.scenario == scenario]
        if rs:
            ax.scatter(
                [r.tok_s for r in rs], [r.ttft_p99_ms / 1000 for r in rs], marker=marker, label=scenario
            )
            for r in rs:
                ax.annotate(
                    r.name.removeprefix(f"{scenario}-"),
                    (r.tok_s, r.ttft_p99_ms / 1000),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set(xlabel="output tokens/s", ylabel="TTFT p99 (s)", title="Throughput vs p99 TTFT per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "throughput_vs_ttft.png", dpi=120)
    plt.close(fig)
    mixed = next((r for r in runs if r.name == "mixed-2-random"), None)
    timeline(mixed or next((r for r in runs if r.name.startswith("policy-q2-2-")), None), work, plt)


def timeline(run: Run | None, work: Path, plt) -> None:
    """Per-request TTFT, requests in flight and swaps over the run (monotonic clock, shared)."""
    if run is None:
        return
    r = json.loads((work / "runs" / f"{run.name}.json").read_text())
    t0 = min(r["start_times"])
    starts = [s - t0 for s in r["start_times"]]
    ends = [s + lat for s, lat in zip(starts, r["latencies"], strict=True)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    models = sorted(set(run.models))
    per_request = _schedule_of(work, run)
    for m in models:
        xs = [s for s, mm in zip(starts, per_request, strict=True) if mm == m]
        ys = [t for t, mm in zip(r["ttfts"], per_request, strict=True) if mm == m]
        top.scatter(xs, ys, s=14, label=m)
    top.set(ylabel="TTFT (s)", title=f"{run.name}: {len(models)} variants, closed loop, swaps shaded")
    points = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    xs, ys, level = [0.0], [0], 0
    for t, d in points:
        level += d
        xs.append(t)
        ys.append(level)
    bottom.step(xs, ys, where="post", color="black", linewidth=1)
    bottom.set(xlabel="seconds since the first request", ylabel="requests in flight (client)")
    for i, swap in enumerate(run.swap_events):
        for axis in (top, bottom):
            axis.axvspan(
                swap["started_monotonic"] - t0,
                swap["started_monotonic"] - t0 + swap["seconds"],
                color="tab:red",
                alpha=0.25,
                label="swap" if i == 0 and axis is top else None,
            )
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "timeline.png", dpi=120)
    plt.close(fig)


def _schedule_of(work: Path, run: Run) -> list[str]:
    return json.loads((work / "runs" / f"{run.name}.schedule.json").read_text())


if __name__ == "__main__":
    main()
