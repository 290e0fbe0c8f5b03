"""Mixing: base + Σ αᵢ·Δᵢ for one tensor, accumulated in fp32 and cast to the model dtype.

Every place that merges (extraction's verification, the engine-side swap, offline
`deltagate merge`) calls `merge_tensor`, so they agree to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Delta:
    """A decoded fp32 delta: a dense term plus an optional sparse second term.

    The sparse term is added after the dense one. It exists for exactness: where the
    weights cross zero, fp32(base) + Δ cancels catastrophically and no single fp32 Δ
    rebuilds the bf16 post value; a second, small term added to that sum does.
    """

    dense: torch.Tensor
    extra_idx: torch.Tensor | None = None
    extra_val: torch.Tensor | None = None

    @classmethod
    def of(cls, dense: torch.Tensor) -> Delta:
        return cls(dense)

    def full(self) -> torch.Tensor:
        """One fp32 tensor (the sparse term folded in; exact to fp32 rounding, not to the bit)."""
        if self.extra_idx is None:
            return self.dense
        out = self.dense.clone()
        out.view(-1)[self.extra_idx] += self.extra_val
        return out


def merge_tensor(
    base: torch.Tensor, deltas: Sequence[tuple[Delta, float]], out_dtype: torch.dtype
) -> torch.Tensor:
    """base + Σ alpha·delta, accumulated in fp32, cast to `out_dtype`."""
    acc = base.to(torch.float32, copy=True)
    for delta, alpha in deltas:
        _add(acc, delta.dense, alpha)
        if delta.extra_idx is not None:
            flat = acc.view(-1)
            part = flat[delta.extra_idx]
            _add(part, delta.extra_val, alpha)
            flat[delta.extra_idx] = part
    return acc.to(out_dtype)


def _add(acc: torch.Tensor, term: torch.Tensor, alpha: float) -> None:
    if alpha == 1.0:
        acc.add_(term)
    else:
        acc.add_(term, alpha=alpha)
