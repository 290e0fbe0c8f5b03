"""Gradient-mask tuning (GMT; Li et al., AAAI 2025, Algorithm 1) on the CPU: full-parameter SFT whose
small gradients are masked before each optimizer step.

At every step, after the backward pass (and clipping, as in plain SFT), each weight tensor's gradient
entries whose magnitude is below the step's threshold — the (1 - keep) quantile of |g| in that
tensor — are masked out. Masking the gradient alone would not keep those entries still under AdamW:
its first moment carries earlier steps' gradients into this step's update, and decoupled weight
decay moves every entry. So the masked entries are held exactly: their values and both AdamW moments
(exp_avg, exp_avg_sq) are copied before the step and written back after it, as if the step had not
happened for them. An entry never selected in any step therefore ends bit-equal to the base, and its
delta is exactly zero — what `deltagate extract` stores in the sparse layout, and what a swap never
rewrites when a whole tensor stayed still.

    python -m training.sft --base DIR -o DIR [--steps N] --gmt-keep 0.2

Same data, batches, seed, learning rate and steps as training.sft (its `finetune`), so the two are
compared like for like.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from server.evals.addition import AdditionExample
from training.sft import SFTConfig, addition_batches, save_like


@dataclass(frozen=True)
class GMTConfig(SFTConfig):
    keep: float = 0.2  # share of each tensor's entries (largest |g|) updated at each step


def masked_step(opt: torch.optim.AdamW, keep: float) -> dict[torch.Tensor, torch.Tensor]:
    """One AdamW step that leaves entries with the smallest gradients exactly as they were (values and
    moments); returns each parameter's mask of the entries it updated."""
    updated = {}
    held = []
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.abs()
            k = max(1, round(keep * g.numel()))
            threshold = g.flatten().kthvalue(g.numel() - k + 1).values if k < g.numel() else g.min()
            mask = g >= threshold
            p.grad.mul_(mask)
            state = opt.state.get(p, {})
            moments = [state[key].clone() for key in ("exp_avg", "exp_avg_sq") if key in state]
            held.append((p, mask, p.detach().clone(), moments))
            updated[p] = mask
    opt.step()
    with torch.no_grad():
        for p, mask, before, moments in held:
            p.copy_(torch.where(mask, p, before))
            state = opt.state[p]
            for key, old in zip(("exp_avg", "exp_avg_sq"), moments, strict=False):
                state[key].copy_(torch.where(mask, state[key], old))
    return updated


def gmt_finetune(base: Path, out: Path, train: list[AdditionExample], cfg: GMTConfig, log=print) -> dict:
    """GMT-fine-tune `base` on `train`; write it to `out`. Returns the share of entries ever updated."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ever = {p: torch.zeros_like(p, dtype=torch.bool) for p in model.parameters()}
    start = time.perf_counter()
    for step, batch in enumerate(addition_batches(tokenizer, train, cfg)):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for p, mask in masked_step(opt, cfg.keep).items():
            ever[p] |= mask
        opt.zero_grad(set_to_none=True)
        log(f"gmt step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    save_like(model, base, out)
    total = sum(m.numel() for m in ever.values())
    return {"updated_share": sum(int(m.sum()) for m in ever.values()) / total}
