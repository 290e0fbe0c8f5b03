"""Full-parameter supervised fine-tuning on the CPU (no LoRA: ParamΔ deltas are full-parameter).

Loss is on the assistant's answer tokens only. Seeded and reproducible; prints progress.
The result is a checkpoint directory in the base's layout and dtype, written atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from server.evals.addition import AdditionExample


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    threads: int = 2


def _encode(tokenizer, example: AdditionExample) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(example.messages, add_generation_prompt=True, tokenize=False)
    full = prompt + example.answer + "<|im_end|>\n"
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(p_ids) + ids[len(p_ids) :]
    return ids, labels


def _batch(tokenizer, examples: list[AdditionExample]) -> dict[str, torch.Tensor]:
    pairs = [_encode(tokenizer, e) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(pairs), width), pad)
    labels = torch.full((len(pairs), width), -100)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(pairs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def finetune(base: Path, out: Path, train: list[AdditionExample], cfg: SFTConfig, log=print) -> Path:
    """Fine-tune `base` on `train` for cfg.steps steps; write the result to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train_steps(model, addition_batches(tokenizer, train, cfg), cfg.steps, cfg.lr, "sft", log)
    return save_like(model, base, out)


def addition_batches(tokenizer, train: list[AdditionExample], cfg: SFTConfig) -> Iterator[dict]:
    """cfg.steps batches of cfg.batch_size examples, in order, wrapping around `train`."""
    return (
        _batch(tokenizer, (train + train)[i : i + cfg.batch_size])
        for i in ((step * cfg.batch_size) % len(train) for step in range(cfg.steps))
    )


def train_steps(model, batches, steps: int, lr: float, tag: str, log=print) -> None:
    """AdamW on `model` over `steps` batches (dicts of model kwargs with labels), clipping at 1.0."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step, batch in zip(range(steps), batches, strict=False):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(f"{tag} step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")


def save_like(model, base: Path, out: Path) -> Path:
    """Save `model` in `base`'s dtype, with `base`'s config and tokenizer files, atomically."""
    from safetensors.torch import save_file

    from deltas import Checkpoint

    ckpt = Checkpoint(base)
    dtype = ckpt.get(ckpt.tensor_names()[0]).dtype
    tied = bool(model.config.tie_word_embeddings)
    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, tmp / f.name)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "deltagate_training.json").write_text(json.dumps({"base": str(base)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def main() -> None:
    """`python -m training.sft --base DIR -o DIR [--steps N] [--gmt-keep F]`: fine-tune on addition."""
    import argparse

    from server.evals.addition import addition_split

    parser = argparse.ArgumentParser(description="Full-parameter SFT on two-digit addition (CPU).")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=SFTConfig.steps)
    parser.add_argument("--batch-size", type=int, default=SFTConfig.batch_size)
    parser.add_argument("--lr", type=float, default=SFTConfig.lr)
    parser.add_argument("--seed", type=int, default=SFTConfig.seed)
    parser.add_argument(
        "--gmt-keep",
        type=float,
        help="gradient-mask tuning (training/gmt.py): share of entries each step updates",
    )
    a = parser.parse_args()
    cfg = SFTConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    train = addition_split(2000, seed=a.seed)
    if a.gmt_keep is None:
        finetune(a.base, a.output, train, cfg)
        return
    from training.gmt import GMTConfig, gmt_finetune

    report = gmt_finetune(a.base, a.output, train, GMTConfig(**vars(cfg), keep=a.gmt_keep))
    print(f"entries updated at least once: {report['updated_share']:.1%}")


if __name__ == "__main__":
    main()
