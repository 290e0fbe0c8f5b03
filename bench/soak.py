"""Soak: many streams over several variants for a long time, with the registry changing under them.

    .venv/bin/python bench/soak.py                         # SmolLM2, 10 minutes, 16 streams
    .venv/bin/python bench/soak.py --duration 60 --streams 8

One managed `deltagate serve` on SmolLM2 with `--lora-slots 2`, so every lane is in play: the base,
two full-delta variants (swap lane: Δ and 0.5·Δ) and a rank-16 projection-only copy of Δ (adapter
lane). `--streams` clients send greedy completions (half streamed) for as long as `--duration`;
every `--change-every` seconds the traffic moves to another pair of variants. A third of the way
in, the delta is uploaded again under a new name and a variant defined on it (then deleted at two
thirds); halfway, a copy of the base is registered as a runtime base (then deleted at 80%). Each
answer is checked against its variant's greedy reference (each variant alone, one request at a
time, before the load). Reported: requests, failed requests, answers whose tokens differ from the
reference (and of those, how many only where the reference had a near-tie), gateway RSS growth after
warm-up (the first 20%), open file descriptors, swaps, and processes left after shutdown.
`tests/server/test_soak.py` runs the same `soak()` for 60 s on the test suite's shared gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

Params = Callable[[str, str], dict]  # (model, prompt) -> completion request body (greedy, logprobs)


@dataclass
class Action:
    """A registry change at a fraction of the run."""

    at: float
    what: str
    do: Callable[[httpx.AsyncClient], Awaitable[dict[str, list[dict]]]]  # models it adds, with references
    leave: tuple[str, ...] = ()  # models taken out of traffic (their requests finished) before `do`


@dataclass
class SoakResult:
    seconds: float
    streams: int
    requests: int = 0
    failed: int = 0
    differ: int = 0  # tokens differ from the reference
    near_ties: int = 0  # ... of which only after a token the reference had within 2e-3 of another
    per_model: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    rss_mb_after_warmup: float = 0.0
    rss_mb_end: float = 0.0
    fds_after_warmup: int = 0
    fds_end: int = 0
    swaps: int = 0
    samples: list[tuple[float, float, int]] = field(default_factory=list)  # (seconds, RSS MiB, fds) every 2 s

    @property
    def rss_growth(self) -> float:
        return self.rss_mb_end / self.rss_mb_after_warmup - 1 if self.rss_mb_after_warmup else 0.0

    def line(self) -> str:
        """One line, never wrapped: what a log or a CI step greps."""
        return (
            f"soak {self.seconds:.0f}s {self.streams} streams: {self.requests} requests, "
            f"{self.failed} failed, {self.differ} differ from reference ({self.near_ties} at near-ties), "
            f"RSS "
            f"{self.rss_mb_after_warmup:.0f}->{self.rss_mb_end:.0f} MiB ({self.rss_growth:+.1%}), fds "
            f"{self.fds_after_warmup}->{self.fds_end}, {self.swaps} swaps"
        )


def compare(got: dict, want: dict, tol: float = 2e-3) -> str:
    """`same`, `near-tie` (first difference where the reference had the token within `tol`) or `differ`."""
    for i, (g, w) in enumerate(zip(got["tokens"], want["tokens"], strict=False)):
        if g != w:
            top = want.get("top_logprobs") or []
            alts = top[i] if i < len(top) and top[i] else {}
            close = g in alts and math.isclose(alts[g], want["token_logprobs"][i], abs_tol=tol)
            return "near-tie" if close else "differ"
    return "same" if len(got["tokens"]) == len(want["tokens"]) else "differ"


async def _ask(client: httpx.AsyncClient, body: dict, stream: bool) -> dict:
    """One greedy completion; its tokens (and logprobs), streamed or not."""
    if not stream:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        lp = r.json()["choices"][0]["logprobs"]
        return {"tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"]}
    tokens: list[str] = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']['message'][:200]}")
            for choice in event.get("choices", []):
                tokens += (choice.get("logprobs") or {}).get("tokens") or []
    return {"tokens": tokens}


async def soak(
    url: str,
    admin: dict,
    refs: dict[str, list[dict]],
    prompts: list[str],
    params: Params,
    *,
    duration: float,
    streams: int,
    change_every: float,
    gateway_pid: int,
    actions: list[Action] = (),
    log=print,
    seed: int = 0,
) -> SoakResult:
    """Drive `streams` clients over `refs`' models for `duration` seconds; check every answer."""
    result = SoakResult(duration, streams)
    pool = dict(refs)  # model -> reference answers per prompt; actions add and remove models
    inflight: Counter[str] = Counter()
    rng = random.Random(seed)
    start = time.monotonic()
    end = start + duration
    gateway = psutil.Process(gateway_pid)
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one_client(k: int) -> None:
            while (now := time.monotonic()) < end:
                names = sorted(pool)
                phase = int((now - start) / change_every)
                active = [names[(phase + j) % len(names)] for j in range(2)]  # the traffic mix of this phase
                extra = [n for n in names if n not in refs]  # models added mid-run get traffic too
                model = rng.choice(active + extra)
                i = rng.randrange(len(prompts))
                inflight[model] += 1
                try:
                    got = await _ask(client, params(model, prompts[i]), stream=rng.random() < 0.5)
                    verdict = compare(got, pool[model][i]) if model in pool else "same"
                except Exception as exc:  # noqa: BLE001 - every failure is counted and a few are shown
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(f"{model}: {exc}")
                    verdict = "failed"
                finally:
                    inflight[model] -= 1
                result.requests += 1
                result.per_model[model] = result.per_model.get(model, 0) + 1
                result.differ += verdict in ("differ", "near-tie")
                result.near_ties += verdict == "near-tie"

        async def registry_changes() -> None:
            for action in sorted(actions, key=lambda a: a.at):
                await asyncio.sleep(max(0.0, start + action.at * duration - time.monotonic()))
                for model in action.leave:
                    pool.pop(model, None)
                    while inflight[model]:
                        await asyncio.sleep(0.05)
                pool.update(await action.do(client))
                result.events.append(f"{time.monotonic() - start:5.1f}s {action.what}")
                log(f"  {result.events[-1]}")

        async def monitor() -> None:
            warm = start + 0.2 * duration
            while time.monotonic() < end:
                await asyncio.sleep(min(2.0, max(0.0, end - time.monotonic())))
                rss, fds = gateway.memory_info().rss / 2**20, gateway.num_fds()
                if not result.rss_mb_after_warmup and time.monotonic() >= warm:
                    result.rss_mb_after_warmup, result.fds_after_warmup = rss, fds
                result.rss_mb_end, result.fds_end = rss, fds
                result.samples.append((round(time.monotonic() - start, 1), round(rss, 1), fds))
                log(
                    f"  {time.monotonic() - start:5.0f}s {result.requests} requests, {result.failed} failed, "
                    f"{result.differ} differ, RSS {rss:.0f} MiB, {fds} fds"
                )

        before = await _swap_count(client, admin)
        await asyncio.gather(*(one_client(k) for k in range(streams)), registry_changes(), monitor())
        result.swaps = await _swap_count(client, admin) - before
    return result


async def _swap_count(client: httpx.AsyncClient, admin: dict) -> int:
    bases = (await client.get("/v1/bases", headers=admin)).json()["data"]
    return sum(len(b["recent_swaps"]) for b in bases if b["group"] == b["name"])


def references(url: str, models: list[str], prompts: list[str], params: Params) -> dict[str, list[dict]]:
    """Each model's greedy answers, one request at a time (no batching)."""
    refs = {}
    for model in models:
        refs[model] = []
        for prompt in prompts:
            r = httpx.post(f"{url}/v1/completions", json=params(model, prompt), timeout=600)
            r.raise_for_status()
            lp = r.json()["choices"][0]["logprobs"]
            refs[model].append({k: lp[k] for k in ("tokens", "token_logprobs", "top_logprobs")})
    return refs


def upload_and_delete(admin: dict, name: str, artifact: Path, base: str, ref: list[dict]) -> list[Action]:
    """Upload `artifact` as delta `name` and define variant `name`-v on `base` (answering `ref`) a
    third of the way in; take it out of traffic and delete both at two thirds."""
    variant = f"{name}-v"

    async def add(client: httpx.AsyncClient) -> dict:
        r = await client.post(
            f"/v1/deltas?name={name}",
            content=artifact.read_bytes(),
            headers={**admin, "content-type": "application/octet-stream"},
        )
        r.raise_for_status()
        body = {"name": variant, "base": base, "deltas": [{"delta": name}]}
        (await client.post("/v1/variants", json=body, headers=admin)).raise_for_status()
        return {variant: ref}

    async def delete(client: httpx.AsyncClient) -> dict:
        (await client.delete(f"/v1/variants/{variant}", headers=admin)).raise_for_status()
        (await client.delete(f"/v1/deltas/{name}", headers=admin)).raise_for_status()
        return {}

    return [
        Action(0.3, f"uploaded delta {name}, defined variant {variant}", add),
        Action(0.65, f"deleted variant {variant}, delta {name}", delete, leave=(variant,)),
    ]


def add_and_delete_base(admin: dict, name: str, path: Path, ref: list[dict]) -> list[Action]:
    """Register `path` as runtime base `name` (answering `ref`) halfway; delete it at 80%."""

    async def add(client: httpx.AsyncClient) -> dict:
        r = await client.post("/v1/bases", json={"name": name, "path": str(path)}, headers=admin)
        r.raise_for_status()
        return {name: ref}

    async def delete(client: httpx.AsyncClient) -> dict:
        (await client.delete(f"/v1/bases/{name}", headers=admin)).raise_for_status()
        return {}

    return [
        Action(0.5, f"added runtime base {name}", add),
        Action(0.8, f"deleted runtime base {name}", delete, leave=(name,)),
    ]


def strays(marker: str) -> list[str]:
    """Processes whose command line mentions `marker` (the run's state dir): what shutdown left."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.pid != os.getpid():
            found.append(f"{p.pid} {cmd[:120]}")
    return found


PROMPTS = [f"What is {a} + {b}? Answer with the number only." for a, b in ((12, 30), (45, 27), (81, 9))] + [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
]


def smollm2_params(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 32, "temperature": 0, "logprobs": 3}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--change-every", type=float, default=10)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="JSON result (default: under --cache/bench)")
    args = parser.parse_args()
    from bench.load import lowrank_copy
    from bench.loadgen import start_gateway
    from training.default import prepare_default

    models = prepare_default(args.cache)
    lowrank = lowrank_copy(models.delta, args.cache)
    work = args.cache / "bench" / "soak"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base_copy = work / "smollm2-copy"  # a second base with the same weights: hot-loaded, same answers
    shutil.copytree(models.base, base_copy, copy_function=os.link)
    token = "soak-admin"
    admin = {"Authorization": f"Bearer {token}"}
    gateway = start_gateway(
        [
            "--base",
            f"smollm2={models.base}",
            "--lora-slots",
            "2",
            "--max-lora-rank",
            "16",
            "--variant",
            f"sft={models.delta}",
            "--variant",
            f"sft-half={models.delta}:0.5",
            "--variant",
            f"sft-lr={lowrank}",
        ],
        work,
        admin_token=token,
    ).wait()
    try:
        print(f"references: 4 models x {len(PROMPTS)} prompts, one at a time")
        names = ["smollm2", "sft", "sft-half", "sft-lr"]
        refs = references(gateway.url, names, PROMPTS, smollm2_params)
        actions = [
            *upload_and_delete(admin, "soak-d", models.delta, "smollm2", refs["sft"]),
            *add_and_delete_base(admin, "smollm2-copy", base_copy, refs["smollm2"]),
        ]
        print(
            f"soak: {args.duration:.0f}s, {args.streams} streams, traffic moves every {args.change_every:g}s"
        )
        run = soak(
            gateway.url,
            admin,
            refs,
            PROMPTS,
            smollm2_params,
            duration=args.duration,
            streams=args.streams,
            change_every=args.change_every,
            gateway_pid=gateway.proc.pid,
            actions=actions,
        )
        result = asyncio.run(run)
    finally:
        gateway.stop()
    time.sleep(2)
    left = strays(str(work / "state"))
    print(result.line() + f", {len(left)} stray processes")
    for error in result.errors:
        print(f"  error: {error}")
    out = args.out or work / "soak.json"
    out.write_text(json.dumps({**asdict(result), "rss_growth": result.rss_growth, "strays": left}, indent=1))
    print(f"written {out}")
    if left:
        for line in left:
            print(f"  stray: {line}")
        for pid in (int(line.split()[0]) for line in left):
            os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
