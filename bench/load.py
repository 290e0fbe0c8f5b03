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
- priorities: the engine started with vLLM's priority scheduling and the gateway with
  `--priority-scheduling`; the same online load alone and beside a rebase (20 + 20 problems per α),
  an eval run (24 GSM8K items) and a batch (2 × --num-prompts completions) on its variant, in
  alternating order, each job started 2 s after the online run's first requests are in flight,
  then left to finish: online TTFT beside each against alone, and each job's time to finish after
  the load (issue 38's target: p99 within 1.5x, the job completes).
  Priorities stay on for every scenario of the invocation, so run it on its own.
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
- bound: one variant at --concurrency and at 2/3 of it, alternated, --repeats each: what two variants
  in lockstep on one engine can reach at most (load_scenarios.alternation_bound says why).

References: each variant's greedy answer to every prompt, one request at a time through the
gateway. An answer is `exact` (its own variant's reference), `wrong-variant` (another variant's
reference, not its own) or `diverged` (neither: numerics of a different batch).

Outputs in --out-dir: runs/*.json (vLLM's detailed results), summary.json, summary.md (the table),
throughput_vs_ttft.png, timeline.png (the 2-variant random run: per-request TTFT, in-flight
requests, swaps).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from load_harness import Bench, Run, lowrank_copy, say  # noqa: E402
from load_report import report  # noqa: E402
from load_scenarios import SCENARIOS, Plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "pico"], default="smollm2")
    default = ["overhead", "mixed", "poisson", "change", "eval"]
    parser.add_argument("--scenarios", nargs="+", default=default, choices=SCENARIOS)
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
    else:
        from loaders.demo import prepare_demo

        models = prepare_demo(args.cache_dir / "demo", log=say)
    lowrank = lowrank_copy(models.delta, args.cache_dir) if "lanes" in args.scenarios else None
    bench = Bench(args, models.base, models.delta, work, lowrank)
    plan = Plan(bench, args, random.Random(args.seed), rates)
    runs: list[Run] = []
    try:
        bench.write_prompts()
        if set(args.scenarios) - {"lanes", "replicas", "kill"}:
            bench.references(bench.models[:4])
        elif {"replicas", "kill"} & set(args.scenarios):
            bench.references(bench.models[1:3])
        for name, scenario in SCENARIOS.items():
            if name in args.scenarios:
                runs += scenario(plan)
    finally:
        bench.stop()
    report(runs, work, args)


if __name__ == "__main__":
    main()
