"""Hot-swap latency vs cold start, measured side by side in one run on the same model.

    .venv/bin/python bench/swap.py                       # generated pico model
    .venv/bin/python bench/swap.py --base DIR --delta F  # your model and delta

Swap: engine with the worker extension, alternating base <-> base+Δ, each swap timed from
the gateway's side (pause, in-place reload, prefix-cache reset, resume) and checked by a
request. Cold start: a fresh stock vLLM server on the offline-merged checkpoint, timed from
process start to the first completed request. The last line is the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltas.recipe import DeltaTerm, Recipe  # noqa: E402
from loaders.demo import prepare_demo  # noqa: E402
from loaders.engine import EngineClient, EngineProcess, EngineSpec  # noqa: E402
from loaders.merge import write_merged_checkpoint  # noqa: E402


def first_completion(url: str, model: str) -> str:
    body = {"model": model, "prompt": "The capital of France", "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def cold_start(checkpoint: Path, logs: Path, max_model_len: int) -> float:
    spec = EngineSpec(model=str(checkpoint), served_name="m", max_model_len=max_model_len,
                      log_path=logs / "cold.log")  # fmt: skip
    proc = EngineProcess(spec, with_extension=False)
    start = time.perf_counter()
    proc.start()
    try:
        proc.wait_ready(timeout=1800)
        first_completion(proc.url, "m")
        return time.perf_counter() - start
    finally:
        proc.stop()


async def swaps(base: Path, delta: Path, logs: Path, n: int, max_model_len: int) -> list[float]:
    spec = EngineSpec(model=str(base), served_name="m", max_model_len=max_model_len,
                      log_path=logs / "swap.log")  # fmt: skip
    proc = EngineProcess(spec)
    proc.start()
    await asyncio.to_thread(proc.wait_ready, 1800)
    client = EngineClient(proc.url, "m")
    plain, variant = Recipe(base=str(base)), Recipe(base=str(base), deltas=[DeltaTerm(path=str(delta))])
    times = []
    try:
        for i in range(n):
            target = variant if i % 2 == 0 else plain
            start = time.perf_counter()
            await client.apply(target)
            times.append(time.perf_counter() - start)
            await asyncio.to_thread(first_completion, proc.url, "m")
    finally:
        await client.close()
        proc.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path)
    parser.add_argument("--delta", type=Path)
    parser.add_argument("--swaps", type=int, default=7)
    parser.add_argument("--max-model-len", type=int, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deltagate-bench-"))
    if args.base is None:
        demo = prepare_demo(Path(".cache/demo"))
        args.base, args.delta = demo.base, demo.delta
    merged = write_merged_checkpoint(
        Recipe(base=str(args.base.resolve()), deltas=[DeltaTerm(path=str(args.delta.resolve()))]),
        work / "merged",
    )
    print(f"model: {args.base}  delta: {args.delta}  logs: {work}", flush=True)
    times = asyncio.run(
        swaps(args.base.resolve(), args.delta.resolve(), work, args.swaps, args.max_model_len)
    )
    print("swap seconds: " + " ".join(f"{t:.3f}" for t in times), flush=True)
    cold = cold_start(merged, work, args.max_model_len)
    median = statistics.median(times)
    print(f"cold start of the merged checkpoint (process start -> first completion): {cold:.2f} s")
    print(f"hot swap median of {len(times)}: {median:.3f} s")
    print(f"swap is {cold / median:.1f}x faster than a cold start")


if __name__ == "__main__":
    main()
