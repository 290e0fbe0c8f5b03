"""The load benchmark's harness (bench/load.py): the engine, the gateway, prompts, references and
one `vllm bench serve` run, checked answer by answer."""

from __future__ import annotations

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
DONE = ("completed", "failed", "canceled", "cancelled", "expired")  # a job's end states
LORA_ENGINE = ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16")
LORA_GATEWAY = ["--lora-slots", "2", "--max-lora-rank", "16"]
PRIORITY_ENGINE = ("--scheduling-policy", "priority")  # what `serve --priority-scheduling` starts with
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
    answer_p50_ms: float = (
        0.0  # first token to last of an answer, median (the time a batch holds its weights)
    )
    failed: int = 0
    swaps: int = 0
    exact: int = 0
    wrong_variant: int = 0
    diverged: int = 0
    requests: int = 0
    failed_after_kill: int = -1  # replicas-kill: failed requests that started after the kill (-1: none)
    background_done_s: float = -1.0  # priorities: s from the online run's end to its job's (-1: none)
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
        self.priorities = "priorities" in args.scenarios  # the engine and the gateway: on for the run
        spec = EngineSpec(
            model=str(base),
            served_name=self.name,
            max_model_len=1024,
            log_path=work / "engine.log",
            extra_args=(LORA_ENGINE if lowrank else ()) + (PRIORITY_ENGINE if self.priorities else ()),
        )
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
        args = [
            "--base",
            f"{self.name}={self.base_dir}",
            "--engine-url",
            f"{self.name}={self.engine.url}",
            "--variant",
            f"{self.models[1]}={d}",
            "--variant",
            f"{self.models[2]}={d}:0.5",
            "--variant",
            f"{self.models[3]}={d}:1.5",
            *extra,
        ]
        if self.priorities:
            args.append("--priority-scheduling")
        if self.lowrank:
            args += [
                "--variant",
                f"{self.models[4]}={self.lowrank}",
                "--variant",
                f"{self.models[5]}={self.lowrank}:0.5",
            ]
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
            answer_p50_ms=1000 * statistics.median(sum(itl) for itl in r["itls"]) if r.get("itls") else 0.0,
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

    def start_eval(self, variant: str, limit: int | None = None) -> tuple[str, str]:
        """Start an eval run on `variant` (GSM8K 5-shot, 2 in flight; all 1314 items, which outlasts the
        load, or `limit` of them); return once it has graded items."""
        auth = {"Authorization": f"Bearer {ADMIN}"}
        body = {"name": "beside online traffic", "data_source": {"type": "builtin", "task": "gsm8k"}}
        eval_id = httpx.post(self.gateway.url + "/v1/evals", json=body, headers=auth).json()["id"]
        run = {"variants": [variant], "max_tokens": 64, "concurrency": 2, "limit": limit}
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

    def start_rebase(self, variant: str, items: int = 100) -> str:
        """Start a rebase of `variant` onto θ′ (registered once; `items` validation and as many holdout
        problems: 100 outlast the load); return once its eval has graded items."""
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
        body = {
            "from_base": self.name,
            "to_base": "updated",
            "variants": [variant],
            "eval_id": eval_id,
            "alphas": [0.5, 1.0, 1.5],
            "validation": items,
            "holdout": items,
            "max_tokens": 8,
            "gate": {"min_difference": -1},
            "concurrency": 2,
        }  # outlasts the load
        for alpha in ("", *(f":a{a:g}" for a in body["alphas"])):  # left by a run that was stopped
            httpx.delete(f"{url}/v1/variants/{variant}:updated{alpha}", headers=auth)
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
        say(
            f"    rebase beside it: phase {job['report']['phase']}, {job['progress']['done']}/"
            f"{job['progress']['total']} items of the phase; canceled"
        )
        time.sleep(1.0)  # its eval run is canceled by the job (it polls twice a second), which then stops
        self._delete_candidates(job)

    def _delete_candidates(self, job: dict) -> None:
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for entry in job["report"]["variants"].values():
            for name in {*entry["candidates"].values(), entry["variant"]} - {None}:
                httpx.delete(f"{self.gateway.url}/v1/variants/{name}", headers=auth)

    def wait_for_load(self, timeout: float = 120.0) -> None:
        """Until requests are in flight on the gateway (the load generator's start-up, seconds of
        importing, is over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in httpx.get(self.gateway.url + "/metrics", timeout=30).text.splitlines():
                if line.startswith("deltagate_inflight_requests{") and float(line.split()[-1]) > 0:
                    return
            time.sleep(0.1)
        raise SystemExit(f"no request in flight {timeout:.0f} s after the load was started")

    def start_batch(self, variant: str, n: int) -> str:
        """Start a Batch API batch of `n` completions on `variant` (the bench's prompts, --output-len
        tokens each); return once it is in progress."""
        auth = {"Authorization": f"Bearer {ADMIN}"}
        prompts = [json.loads(x)["prompt"] for x in self.prompts.read_text().splitlines()]
        out = self.args.output_len
        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
            for i in range(n)
            for body in [{"model": variant, "prompt": prompts[i % len(prompts)], "max_tokens": out}]
        ]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        files = {"file": ("batch.jsonl", data)}
        url = self.gateway.url
        uploaded = httpx.post(f"{url}/v1/files", files=files, data={"purpose": "batch"}, headers=auth)
        file_id = uploaded.json()["id"]
        body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
        r = httpx.post(f"{url}/v1/batches", json=body, headers=auth)
        r.raise_for_status()
        return r.json()["id"]

    def finish(self, kind: str, job, timeout: float = 1800.0, since: float | None = None) -> float:
        """Wait for a background job started above (kind rebase, eval or batch) to complete; the
        seconds it took from `since` (monotonic; default: this call). Its rebase candidates are
        deleted after."""
        auth = {"Authorization": f"Bearer {ADMIN}"}
        url = self.gateway.url
        where = {
            "rebase": lambda: f"{url}/v1/rebases/{job}",
            "eval": lambda: f"{url}/v1/evals/{job[0]}/runs/{job[1]}",
            "batch": lambda: f"{url}/v1/batches/{job}",
        }[kind]()
        start = time.monotonic()
        while (state := httpx.get(where, headers=auth, timeout=60).json())["status"] not in DONE:
            if time.monotonic() - start > timeout:
                raise SystemExit(f"the {kind} beside the load did not finish in {timeout:.0f} s: {state}")
            time.sleep(0.5)
        took = time.monotonic() - (start if since is None else since)
        if state["status"] != "completed":
            raise SystemExit(f"the {kind} beside the load ended {state['status']}: {state}")
        say(f"    the {kind} beside it completed {took:.1f} s after the online load")
        if kind == "rebase":
            self._delete_candidates(state)
        return took

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
            spec = replace(
                self.engine.spec,
                log_path=self.work / f"engine-{mode}.log",
                env=(("DELTAGATE_SWAP_MODE", mode),),
            )
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
            args = [
                "--ray",
                "--replicas",
                "2",
                "--max-model-len",
                "1024",
                "--base",
                f"{self.name}={self.base_dir}",
                "--variant",
                f"{self.models[1]}={d}",
                "--variant",
                f"{self.models[2]}={d}:0.5",
            ]
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
