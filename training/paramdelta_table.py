"""The ParamΔ table at small scale, measured through the gateway's served variants.

    .venv/bin/python -m training.paramdelta_table [--cache .cache] [--out docs/paramdelta.md]

Models (all fp32 SmolLM2-135M, all trained on this CPU, all cached under --cache):
    θ        SmolLM2-135M-Instruct                    (served as base `smollm2`)
    θ′       θ + continued pre-training on Python stdlib source   (base `smollm2-py`)
    θ_post   θ fine-tuned on two-digit addition       (variant `sft`      = θ + Δ)
    ParamΔ   θ′ + α·(θ_post − θ)                      (variants `paramdelta-α`)
    θ′_sft   θ′ fine-tuned with the same recipe       (variant `py-sft`   = θ′ + Δ′)
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from deltas.extract import extract_delta
from loaders.engine import free_port, wait_healthy
from training.corpora import chunks, general_files, python_files
from training.cpt import CPTConfig, continue_pretraining
from training.default import DEFAULT_SFT, prepare_default
from training.evaluate import perplexity, task_accuracy
from training.sft import finetune
from training.tasks import addition_split

CPT = CPTConfig()
ALPHAS = (0.5, 1.0, 1.5)
ADMIN = "paramdelta-table"


def build(cache: Path, log=print) -> dict[str, Path]:
    """Train (or reuse) every model of the table; return checkpoint dirs and deltas."""
    default = prepare_default(cache, log)
    base = default.base
    updated = cache / "models" / f"{base.name}-cpt-s{CPT.steps}-b{CPT.batch_size}-seed{CPT.seed}"
    if not (updated / "model.safetensors").is_file():
        log(f"continued pre-training on Python source ({CPT.steps} steps)")
        continue_pretraining(base, updated, CPT, log)
    updated_sft = cache / "models" / f"{updated.name}-addition-s{DEFAULT_SFT.steps}"
    if not (updated_sft / "model.safetensors").is_file():
        log("fine-tuning the updated base with the same recipe")
        finetune(updated, updated_sft, addition_split(2000, seed=DEFAULT_SFT.seed), DEFAULT_SFT, log)
    updated_delta = cache / "deltas" / f"{updated_sft.name}.safetensors"
    if not updated_delta.is_file():
        extract_delta(updated, updated_sft, updated_delta)
    return {"base": base, "updated": updated, "delta": default.delta, "updated_delta": updated_delta}


def serve(paths: dict[str, Path], work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--state-dir", str(work),
           "--admin-token", ADMIN, "--base", f"smollm2={paths['base']}",
           "--base", f"smollm2-py={paths['updated']}", "--variant", f"sft={paths['delta']}"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=open(work / "gateway.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 1800, "gateway", work / "gateway.log")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    for name, path in (("sft-delta", paths["delta"]), ("py-sft-delta", paths["updated_delta"])):
        httpx.post(f"{url}/v1/deltas", json={"name": name, "path": str(path)}, headers=auth)
    variants = {f"paramdelta-{a}": ("sft-delta", a) for a in ALPHAS} | {"py-sft": ("py-sft-delta", 1.0)}
    for name, (delta, alpha) in variants.items():
        body = {"name": name, "base": "smollm2-py", "deltas": [{"delta": delta, "alpha": alpha}]}
        r = httpx.post(f"{url}/v1/variants", json=body, headers=auth)
        if r.status_code not in (201, 409):
            raise RuntimeError(r.text)
    return proc, url


ROWS = [
    ("θ (SmolLM2-135M-Instruct)", "smollm2"),
    ("θ′ (θ + CPT on Python source)", "smollm2-py"),
    ("θ_post (θ + addition SFT)", "sft"),
    *[(f"ParamΔ θ′ + {a}·(θ_post − θ)", f"paramdelta-{a}") for a in ALPHAS],
    ("θ′ + addition SFT (target)", "py-sft"),
]


def measure(
    url: str, tokenizer_dir: Path, n_task: int, n_windows: int, window: int, log=print
) -> list[tuple]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    held = addition_split(n_task, seed=1234, held_out=True)
    code = chunks(tok, python_files(held_out=True), window, n_windows)
    general = chunks(tok, general_files(), window, n_windows)
    rows = []
    for label, model in ROWS:
        start = time.perf_counter()
        acc = task_accuracy(url, model, held)
        ppl_code, ppl_general = perplexity(url, model, code), perplexity(url, model, general)
        rows.append((label, model, acc, ppl_code, ppl_general))
        log(f"{model}: acc {acc:.3f} code ppl {ppl_code:.3f} general ppl {ppl_general:.3f} "
            f"({time.perf_counter() - start:.0f}s)")  # fmt: skip
    return rows


def to_markdown(rows: list[tuple], n_task: int, n_windows: int, window: int) -> str:
    lines = [
        f"| model | served as | addition exact match (n={n_task}) | Python ppl (held-out, "
        f"{n_windows}×{window} tok) | general ppl (licenses, {n_windows}×{window} tok) |",
        "|---|---|---|---|---|",
    ]
    for label, model, acc, pc, pg in rows:
        lines.append(f"| {label} | `{model}` | {acc:.1%} | {pc:.3f} | {pg:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--tasks", type=int, default=60, help="held-out addition problems")
    parser.add_argument("--windows", type=int, default=10, help="held-out text windows per corpus")
    parser.add_argument("--window-len", type=int, default=128, help="tokens per window")
    args = parser.parse_args()
    paths = build(args.cache)
    work = args.cache / "paramdelta-gateway"
    work.mkdir(parents=True, exist_ok=True)
    proc, url = serve(paths, work)
    try:
        rows = measure(url, paths["base"], args.tasks, args.windows, args.window_len)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    print(to_markdown(rows, args.tasks, args.windows, args.window_len))


if __name__ == "__main__":
    main()
