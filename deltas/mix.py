"""Mixing: base + Σ αᵢ·Δᵢ for one tensor, accumulated in fp32 and cast to the model dtype.

Every place that merges (extraction's verification, the engine-side swap, offline
`deltagate merge`) calls `merge_tensor`, so they agree to the bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_tensor(
    base: torch.Tensor, deltas: Sequence[tuple[torch.Tensor, float]], out_dtype: torch.dtype
) -> torch.Tensor:
    """base + Σ alpha·delta in fp32, cast to `out_dtype`. `deltas` are fp32 (delta, alpha)."""
    acc = base.to(torch.float32, copy=True)
    for delta, alpha in deltas:
        if alpha == 1.0:
            acc.add_(delta)
        else:
            acc.add_(delta, alpha=alpha)
    return acc.to(out_dtype)
