"""Codecs on the real skill delta: size, extract time, swap time, token agreement, KL, task score.

    .venv/bin/python bench/codecs.py               # SmolLM2-135M + its addition delta (cached)
    .venv/bin/python bench/codecs.py --quick       # fewer rows, for a smoke run

One engine serves every row: the exact delta is applied first and its greedy continuations
of the prompt set are the reference; each codec's artifact is then swapped in and scored
on the same token sequences (loaders.fidelity). Sizes are relative to a plain bf16 delta
(2 bytes per element), the size a bf16 checkpoint diff would have.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltas import CodecPlan, extract_delta, open_artifact  # noqa: E402
from loaders import fidelity as fid  # noqa: E402
from loaders.engine import EngineClient  # noqa: E402
from server.evals.addition import addition_split  # noqa: E402
from training.default import DEFAULT_SFT, prepare_default  # noqa: E402
from training.evaluate import task_accuracy  # noqa: E402

ROWS = [
    "dense",
    "int8",
    "int4",
    "int4:group=32",
    "sparse:density=0.1",
    "sparse:density=0.1,select=gradient",
    "sparse:density=0.3",
    "dare:density=0.3",
    "bitdelta",
    "lowrank:rank=64",
]
QUICK = ["dense", "int8", "int4"]


@dataclass
class Row:
    spec: str
    size: int
    zstd_size: int
    extract_s: float
    swap_s: float = 0.0
    agreement: float = 0.0
    kl: float = 0.0
    task: float = 0.0


def write_calibration(post: Path, out: Path, n: int = 128) -> Path:
    """Training-distribution addition dialogues (never the held-out pairs) rendered with the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(post)
    lines = []
    for ex in addition_split(n, seed=DEFAULT_SFT.seed + 1):
        msgs = ex.messages + [{"role": "assistant", "content": ex.answer}]
        lines.append(json.dumps({"text": tok.apply_chat_template(msgs, tokenize=False)}))
    out.write_text("\n".join(lines) + "\n")
    return out


def build_rows(specs: list[str], base: Path, post: Path, work: Path) -> dict[str, tuple[Path, Row]]:
    from training.importance import calibration_gradients

    gradients = None
    rows = {}
    for spec in specs:
        out = work / (spec.replace(":", "_").replace(",", "_").replace("=", "") + ".safetensors")
        plan = CodecPlan.uniform(spec)
        if plan.needs_gradients and gradients is None:
            calib = write_calibration(post, work / "calib.jsonl")
            start = time.perf_counter()
            gradients = calibration_gradients(post, calib)
            print(f"gradients on {calib}: {time.perf_counter() - start:.1f} s", flush=True)
        grads = gradients if plan.needs_gradients else None
        start = time.perf_counter()
        report = extract_delta(base, post, out, plan=plan, gradients=grads)
        seconds = time.perf_counter() - start
        # the same payloads under the lossless zstd layer
        zstd = extract_delta(
            base, post, work / ("z-" + out.name), plan=CodecPlan.uniform(spec, zstd=True), gradients=grads
        )
        rows[spec] = (out, Row(spec, report.size_bytes, zstd.size_bytes, seconds))
        mb, zmb = report.size_bytes / 1e6, zstd.size_bytes / 1e6
        print(f"{spec}: {mb:.1f} MB (zstd {zmb:.1f} MB), extract {seconds:.1f} s", flush=True)
    return rows


async def serve_rows(base: Path, rows: dict[str, tuple[Path, Row]], exact: Path, work: Path, args) -> None:
    engine = await asyncio.to_thread(fid.start_engine, str(base), work)
    client, prober = EngineClient(engine.url, "fidelity"), fid.Prober(engine.url, "fidelity")
    held = addition_split(args.task_examples, seed=1234, held_out=True)

    def task(url: str, model: str) -> float:
        return task_accuracy(url, model, held)

    try:
        reference = await fid.record_reference(
            client, prober, str(base), exact, list(fid.DEFAULT_PROMPTS), args.max_tokens, task
        )
        for spec, (path, row) in rows.items():
            measured = await fid.score_variant(client, prober, str(base), path, reference, task)
            row.swap_s, row.agreement, row.kl, row.task = (
                measured.swap_seconds,
                measured.agreement,
                measured.mean_kl,
                measured.task_score,
            )
            print(
                f"{spec}: swap {row.swap_s:.2f} s, agreement {100 * row.agreement:.2f}%, "
                f"KL {row.kl:.2e}, task {100 * row.task:.1f}%",
                flush=True,
            )
        print(f"compared positions per row: {measured.positions}")
    finally:
        await client.close()
        await prober.close()
        engine.stop()


def print_table(rows: list[Row], bf16_bytes: int) -> None:
    print(f"\nbf16 delta reference size: {bf16_bytes / 1e6:.1f} MB (2 bytes x {bf16_bytes // 2} elements)")
    columns = [
        "codec",
        "size MB",
        "% of bf16",
        "+ zstd MB (% of bf16)",
        "extract s",
        "swap s",
        "token agreement",
        "KL (nats)",
        "task",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r.spec}` | {r.size / 1e6:.1f} | {100 * r.size / bf16_bytes:.1f}% | "
            f"{r.zstd_size / 1e6:.1f} ({100 * r.zstd_size / bf16_bytes:.1f}%) | {r.extract_s:.1f} | "
            f"{r.swap_s:.2f} | {100 * r.agreement:.2f}% | {r.kl:.2e} | {100 * r.task:.1f}% |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--task-examples", type=int, default=60)
    args = parser.parse_args()
    models = prepare_default(Path(".cache"))
    work = Path(tempfile.mkdtemp(prefix="deltagate-codecs-"))
    print(f"base {models.base}\npost {models.post}\nwork {work}", flush=True)
    specs = QUICK if args.quick else ROWS
    rows = build_rows(specs, models.base, models.post, work)
    exact = rows["dense"][0]
    asyncio.run(serve_rows(models.base, rows, exact, work, args))
    bf16 = 2 * sum(t.numel for t in open_artifact(exact).manifest.tensors)
    print_table([r for _, r in rows.values()], bf16)


if __name__ == "__main__":
    main()
