"""The default served set: SmolLM2-135M-Instruct and a real skill delta trained on this CPU.

First run: download + convert the model (~1 min), fine-tune it on two-digit addition and
extract the delta (a few minutes on 2 cores). Everything is cached; later runs reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltas import extract_delta
from loaders.smollm2 import smollm2_checkpoint
from server.evals.addition import addition_split
from training.sft import SFTConfig, finetune

DEFAULT_SFT = SFTConfig(steps=40, batch_size=8, lr=1e-4, seed=0)


@dataclass(frozen=True)
class DefaultModels:
    base: Path
    post: Path
    delta: Path


def prepare_default(cache: Path, log=print, sft: SFTConfig = DEFAULT_SFT) -> DefaultModels:
    """SmolLM2 and its addition-skill delta, built once under `cache`."""
    base = smollm2_checkpoint(cache / "models", log)
    tag = f"{base.name}-addition-s{sft.steps}-b{sft.batch_size}-seed{sft.seed}"  # cache key
    delta = cache / "deltas" / f"{tag}.safetensors"
    post = cache / "models" / tag
    if not delta.is_file():
        if not (post / "model.safetensors").is_file():
            log(f"fine-tuning SmolLM2 on two-digit addition ({sft.steps} steps, cached afterwards)")
            finetune(base, post, addition_split(2000, seed=sft.seed), sft, log)
        log("extracting the skill delta")
        extract_delta(base, post, delta)
    return DefaultModels(base, post, delta)
