"""The load benchmark's scenarios (bench/load.py's docstring says what each measures): one function
each, over the harness, returning its runs; SCENARIOS maps the --scenarios names to them."""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from load_harness import Bench, Run, say, schedule  # noqa: E402

JOB_AFTER = 2.0  # priorities: s after the online load's first requests that a background job starts


@dataclass
class Plan:
    """What every scenario reads: the harness, the command line, the schedule RNG, the Poisson rates."""

    bench: Bench
    args: object
    rng: random.Random
    rates: list[float]

    @property
    def n(self) -> int:
        return self.args.num_prompts

    @property
    def c(self) -> int:
        return self.args.concurrency


def overhead(p: Plan) -> list[Run]:
    b, runs = p.bench, []
    say("overhead: the base model, engine directly vs through the gateway")
    b.run("warmup", "warmup", [b.name] * p.n, concurrency=p.c)  # base resident, engine warm
    for rep in range(p.args.repeats):
        for target in ("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct"):
            runs.append(
                b.run(f"overhead-{target}-{rep}", "overhead", [b.name] * p.n, target=target, concurrency=p.c)
            )
    return runs


def mixed(p: Plan) -> list[Run]:
    b = p.bench
    say("mixed traffic: 1, 2 and 4 variants, closed loop")
    runs = [b.run("mixed-1", "mixed", [b.models[1]] * p.n, concurrency=p.c, kind="single")]
    for k in (2, 4):
        for kind in ("round-robin", "random", "zipf"):
            plan = schedule(b.models[:k], p.n, kind, p.rng)
            runs.append(b.run(f"mixed-{k}-{kind}", "mixed", plan, concurrency=p.c, kind=kind))
    return runs


def poisson(p: Plan) -> list[Run]:
    b, runs = p.bench, []
    say(f"Poisson arrivals at {p.rates} req/s, one and two variants")
    for rate in p.rates:
        runs.append(b.run(f"poisson-{rate:g}-1", "poisson", [b.models[1]] * p.n, rate=rate, kind="single"))
        plan = schedule(b.models[:2], p.n, "random", p.rng)
        runs.append(b.run(f"poisson-{rate:g}-2", "poisson", plan, rate=rate, kind="random"))
    return runs


def change(p: Plan) -> list[Run]:
    b, rate = p.bench, statistics.median(p.rates)
    say(f"variant change under steady load ({rate:g} req/s): {b.models[1]} then {b.models[2]}")
    plan = [b.models[1]] * (p.n // 2) + [b.models[2]] * (p.n - p.n // 2)
    return [b.run("change", "change", plan, rate=rate, kind="change")]


def _beside(p: Plan, scenario: str, what: str, start: Callable[[str], object], cancel) -> list[Run]:
    """The same online load alone and beside a background job on that variant, alternating."""
    b, runs = p.bench, []
    for rep in range(p.args.repeats):
        for beside in (False, True) if rep % 2 == 0 else (True, False):
            job = start(b.models[1]) if beside else None
            kind = f"with-{what}" if beside else "alone"
            runs.append(
                b.run(
                    f"{scenario}-{'on' if beside else 'off'}-{rep}",
                    scenario,
                    [b.models[1]] * p.n,
                    concurrency=p.c,
                    kind=kind,
                )
            )
            if job:
                cancel(job)
    return runs


def eval_(p: Plan) -> list[Run]:
    say(f"online traffic with and without an eval run beside it (GSM8K on {p.bench.models[1]})")
    return _beside(p, "eval", "eval", p.bench.start_eval, p.bench.cancel_eval)


def rebase(p: Plan) -> list[Run]:
    say(f"online traffic with and without a rebase of {p.bench.models[1]} beside it")
    return _beside(p, "rebase", "rebase", p.bench.start_rebase, p.bench.cancel_rebase)


def priorities(p: Plan) -> list[Run]:
    """Online load alone and beside each kind of background work on its variant, with priorities on
    (the engine's priority scheduling, the swap policy's background class). Each job starts
    JOB_AFTER s after the online load's first requests are in flight (started before, a job takes
    the engine in the load generator's start-up, about 10 s with nothing in flight, and the first
    online wave pays the swap back); it is then left to finish, and how long that took is said."""
    b, runs = p.bench, []
    say(f"priorities: online traffic on {b.models[1]} alone and beside a rebase, an eval run, a batch")
    jobs = {
        "rebase": lambda: b.start_rebase(b.models[1], items=20),
        "eval": lambda: b.start_eval(b.models[1], limit=24),
        "batch": lambda: b.start_batch(b.models[1], 2 * p.n),
    }
    order = ["alone", *jobs]
    for rep in range(p.args.repeats):
        for what in order if rep % 2 == 0 else order[::-1]:
            started: dict = {}

            def start(what: str = what, started: dict = started) -> None:
                b.wait_for_load()
                time.sleep(JOB_AFTER)
                started["job"] = jobs[what]()

            thread = threading.Thread(target=start) if what in jobs else None
            kind = f"with-{what}" if thread else "alone"
            plan = [b.models[1]] * p.n
            run = b.run(
                f"priorities-{what}-{rep}",
                "priorities",
                plan,
                concurrency=p.c,
                kind=kind,
                on_start=thread.start if thread else None,
            )
            if thread:
                ended = time.monotonic()
                thread.join()
                run.background_done_s = b.finish(what, started["job"], since=ended)
            runs.append(run)
    return runs


def swaps(p: Plan) -> list[Run]:
    b = p.bench
    say("swap design: before (full reload in the pause) vs after (incremental, staged)")
    modes = {"before": lambda: b.use_swap_mode("full"), "after": lambda: b.use_swap_mode("incremental")}
    plan = schedule(b.models[:2], p.n, "random", p.rng)
    return b.alternate("swaps", modes, b.models[1], plan, concurrency=p.c)


def policy(p: Plan) -> list[Run]:
    b, args = p.bench, p.args
    say(f"swap policy: quanta {args.quanta} s (max wait {args.max_wait:g} s), 1 and 2 variants")
    flags = lambda q: ["--swap-quantum", str(q), "--swap-max-wait", str(args.max_wait)]  # noqa: E731
    quanta = {f"q{q:g}": lambda q=q: b.restart_gateway(flags(q)) for q in args.quanta}
    plan = schedule(b.models[:2], p.n, "random", p.rng)
    return b.alternate("policy", quanta, b.models[1], plan, concurrency=p.c)


def alternation_bound(p: Plan) -> list[Run]:
    """One variant at the concurrency and at 2/3 of it, alternated: with one variant resident at a
    time, closed-loop streams picking one of two variants at random leave the other's requests
    waiting, and when each variant's requests run as one wave (answers of one length end together) a
    wave is 2/3 of the streams on average (x = c - x/2: the last wave's streams split between the two).
    So two variants' throughput is at most one variant's at 2c/3 streams, however cheap the swap."""
    b, low = p.bench, max(1, round(2 * p.c / 3))
    say(f"alternation bound: one variant at concurrency {p.c} and {low}")
    runs = []
    for rep in range(p.args.repeats):
        for c in (p.c, low) if rep % 2 == 0 else (low, p.c):
            plan = [b.models[1]] * p.n
            runs.append(b.run(f"bound-c{c}-{rep}", "bound", plan, concurrency=c, kind="single"))
    return runs


def lanes(p: Plan) -> list[Run]:
    b = p.bench
    say("lanes: two low-rank variants as LoRA adapters beside the base vs by swaps, same engine")
    modes = {lane: lambda lane=lane: b.use_lane(lane) for lane in ("adapter", "swap")}
    plan = schedule(b.models[4:6], p.n, "random", p.rng)
    return b.alternate("lanes", modes, b.models[4], plan, concurrency=p.c)


def replicas(p: Plan) -> list[Run]:
    b = p.bench
    say("replicas: two variants on one engine vs on Ray Serve with two engine replicas")
    modes = {mode: lambda mode=mode: b.use_cluster(mode == "ray") for mode in ("one", "ray")}
    plan = schedule(b.models[1:3], p.n, "random", p.rng)
    return b.alternate("replicas", modes, b.models[1], plan, concurrency=p.c)


def kill(p: Plan) -> list[Run]:
    b = p.bench
    say(f"kill: Ray Serve, two variants; the engine holding {b.models[1]} killed mid-run")
    b.use_cluster(True)
    plan = schedule(b.models[1:3], p.n, "random", random.Random(p.args.seed + 1))
    return [b.run_with_kill("replicas-kill", plan, concurrency=p.c, after=p.args.kill_after)]


# In the order they run; the keys are --scenarios' choices.
SCENARIOS: dict[str, Callable[[Plan], list[Run]]] = {
    "overhead": overhead,
    "mixed": mixed,
    "poisson": poisson,
    "change": change,
    "eval": eval_,
    "rebase": rebase,
    "priorities": priorities,
    "swaps": swaps,
    "policy": policy,
    "bound": alternation_bound,
    "lanes": lanes,
    "replicas": replicas,
    "kill": kill,
}
