"""GMT against plain SFT, from the same seed: task accuracy, the delta's exact density, artifact size,
and the swap pause, side by side in one run.

    .venv/bin/python bench/gmt.py                     # SmolLM2-135M fp32, 40 steps, keep 0.2
    .venv/bin/python bench/gmt.py --keep 0.05 --n 300

Both fine-tunes take the data, batches, seed, learning rate and steps of the default addition delta
(training/default.py: its SFT run is the cached one); GMT (training/gmt.py) masks each step's
gradients below the step's (1 - keep) quantile per tensor and holds masked entries exactly. Each is
extracted by `deltagate extract`'s function. One engine with the worker extension serves the base
and swaps to each delta in turn (staged while it serves, then committed, as under load); accuracy is
greedy exact match on `--n` held-out addition problems (the built-in eval's grader), with 95% Wilson
intervals; the swap pause is timed around the gateway client's one swap call, `--repeats` times each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltas import Checkpoint, DeltaTerm, Recipe, extract_delta, open_artifact  # noqa: E402
from loaders.engine import EngineClient, EngineProcess, EngineSpec  # noqa: E402
from server.evals.addition import addition_split  # noqa: E402
from server.evals.stats import wilson  # noqa: E402
from training.default import DEFAULT_SFT, prepare_default  # noqa: E402
from training.evaluate import task_accuracy  # noqa: E402
from training.gmt import GMTConfig, gmt_finetune  # noqa: E402


def gmt_delta(base: Path, cache: Path, keep: float) -> tuple[Path, Path]:
    """The GMT fine-tune of `base` with the default SFT's settings and its extracted delta (cached)."""
    cfg = GMTConfig(**asdict(DEFAULT_SFT), keep=keep)
    tag = f"{base.name}-addition-gmt{keep:g}-s{cfg.steps}-b{cfg.batch_size}-seed{cfg.seed}"
    post, delta = cache / "models" / tag, cache / "deltas" / f"{tag}.safetensors"
    if not delta.is_file():
        if not (post / "model.safetensors").is_file():
            print(f"GMT fine-tune, keep {keep:g}, {cfg.steps} steps (cached afterwards)", flush=True)
            report = gmt_finetune(base, post, addition_split(2000, seed=cfg.seed), cfg, log=_every(10))
            print(f"entries ever updated: {report['updated_share']:.2%}", flush=True)
        extract_delta(base, post, delta)
    return post, delta


def _every(n: int):
    seen = [0]

    def log(line: str) -> None:
        seen[0] += 1
        if seen[0] % n == 0:
            print("  " + line, flush=True)

    return log


def density(base: Path, post: Path) -> tuple[float, int, int]:
    """(share of entries whose delta is not exactly zero, tensors with any, tensors)."""
    b, p = Checkpoint(base), Checkpoint(post)
    nonzero = total = moved = 0
    names = b.tensor_names()
    for name in names:
        before = b.get(name)
        changed = int((before != p.get(name)).sum())
        nonzero, total, moved = nonzero + changed, total + before.numel(), moved + (changed > 0)
    return nonzero / total, moved, len(names)


def complete(url: str) -> None:
    body = {"model": "m", "prompt": "The capital of France", "max_tokens": 4, "temperature": 0}
    httpx.post(url + "/v1/completions", json=body, timeout=600).raise_for_status()


async def serve_and_measure(base: Path, deltas: dict[str, Path], n: int, repeats: int, log_dir: Path) -> dict:
    """Per model: accuracy on `n` held-out problems and the pauses of swaps to it from the base."""
    spec = EngineSpec(
        model=str(base), served_name="m", max_model_len=512, log_path=log_dir / "engine-gmt.log"
    )
    proc = EngineProcess(spec)
    proc.start()
    await asyncio.to_thread(proc.wait_ready, 1800)
    client = EngineClient(proc.url, "m")
    plain = Recipe(base=str(base))
    problems = addition_split(n, seed=1, held_out=True)
    out: dict[str, dict] = {}
    try:
        for name in ("base", *deltas):
            target = (
                plain
                if name == "base"
                else Recipe(base=str(base), deltas=[DeltaTerm(path=str(deltas[name]))])
            )
            pauses, tensors = [], 0
            for _ in range(repeats if name != "base" else 0):
                await client.apply(plain)  # untimed: the starting point
                await client.stage(target)
                await asyncio.to_thread(complete, proc.url)  # the engine serves meanwhile
                await client.wait_staged(target)
                start = time.perf_counter()
                result = await client.apply(target)
                pauses.append(time.perf_counter() - start)
                tensors = result.tensors
            await client.apply(target)
            accuracy = await asyncio.to_thread(task_accuracy, proc.url, "m", problems)
            out[name] = {"accuracy": accuracy, "pauses": pauses, "tensors": tensors}
            print(
                f"  {name}: accuracy {accuracy:.1%} on {n}; pauses {[round(p, 4) for p in pauses]}",
                flush=True,
            )
    finally:
        await client.close()
        proc.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--keep", type=float, default=0.2, help="GMT: share of each tensor's entries a step updates"
    )
    parser.add_argument("--n", type=int, default=200, help="held-out addition problems")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    models = prepare_default(args.cache_dir)
    gmt_post, gmt = gmt_delta(models.base, args.cache_dir, args.keep)
    runs = {"sft": (models.post, models.delta), f"gmt (keep {args.keep:g})": (gmt_post, gmt)}
    print(
        f"SmolLM2 {models.base}; {DEFAULT_SFT.steps} steps, batch {DEFAULT_SFT.batch_size}, "
        f"seed {DEFAULT_SFT.seed}"
    )
    torch.set_num_threads(2)
    shapes = {name: density(models.base, post) for name, (post, _) in runs.items()}
    measured = asyncio.run(
        serve_and_measure(
            models.base, {n: d for n, (_, d) in runs.items()}, args.n, args.repeats, args.cache_dir
        )
    )
    head = (
        "model",
        "accuracy (95% CI)",
        "delta density",
        "tensors moved",
        "artifact MB",
        "layouts",
        "swap pause",
    )
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base_acc = measured["base"]["accuracy"]
    lo, hi = wilson(round(base_acc * args.n), args.n)
    print(f"| base | {base_acc:.1%} ({lo:.1%}-{hi:.1%}) | - | - | - | - | - |")
    for name, (_, delta) in runs.items():
        m, (share, moved, of) = measured[name], shapes[name]
        lo, hi = wilson(round(m["accuracy"] * args.n), args.n)
        art = open_artifact(delta)
        layouts = sorted({t.params.get("layout", "full") for t in art.manifest.tensors})
        cells = [
            name,
            f"{m['accuracy']:.1%} ({lo:.1%}-{hi:.1%})",
            f"{share:.2%}",
            f"{moved}/{of}",
            f"{delta.stat().st_size / 1e6:.1f}",
            "+".join(layouts),
            f"{statistics.median(m['pauses']) * 1e3:.1f} ms ({m['tensors']} tensors)",
        ]
        print("| " + " | ".join(cells) + " |")
    print(f"\nn = {args.n} held-out problems (seed 1); pause: median of {args.repeats} staged swaps")


if __name__ == "__main__":
    main()
