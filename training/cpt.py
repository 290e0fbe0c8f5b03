"""Continued pre-training on the CPU: the "updated base" θ′ of the ParamΔ experiment."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from training.corpora import chunks, python_files
from training.sft import save_like, train_steps


@dataclass(frozen=True)
class CPTConfig:
    steps: int = 60
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 5e-5
    seed: int = 0
    threads: int = 2


def continue_pretraining(base: Path, out: Path, cfg: CPTConfig, log=print) -> Path:
    """Next-token training of `base` on Python stdlib source (training split) → `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    data = chunks(tokenizer, python_files(held_out=False), cfg.seq_len, cfg.steps * cfg.batch_size * 4)
    random.Random(cfg.seed).shuffle(data)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    batches = (
        {"input_ids": t, "labels": t}
        for t in (
            torch.tensor(data[i : i + cfg.batch_size])
            for i in range(0, cfg.steps * cfg.batch_size, cfg.batch_size)
        )
    )
    train_steps(model, batches, cfg.steps, cfg.lr, "cpt", log)
    return save_like(model, base, out)


def main() -> None:
    """`python -m training.cpt --base DIR -o DIR [--steps N]`: continue pre-training on Python."""
    import argparse

    parser = argparse.ArgumentParser(description="Continued pre-training on Python stdlib source (CPU).")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=CPTConfig.steps)
    parser.add_argument("--seed", type=int, default=CPTConfig.seed)
    a = parser.parse_args()
    continue_pretraining(a.base, a.output, CPTConfig(steps=a.steps, seed=a.seed))


if __name__ == "__main__":
    main()
