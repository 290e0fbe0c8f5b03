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

    def to(self, device: torch.device | str) -> Delta:
        """This delta on `device` (copies start without waiting where the source is pinned)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Delta(move(self.dense), move(self.extra_idx), move(self.extra_val))

    def narrow(self, dim: int, start: int, size: int) -> Delta:
        """The delta of the slice [start, start + size) along `dim` (a tensor-parallel rank's shard)."""
        dense = self.dense.narrow(dim, start, size).contiguous()
        if self.extra_idx is None:
            return Delta(dense)
        coords = list(torch.unravel_index(self.extra_idx, self.dense.shape))
        keep = (coords[dim] >= start) & (coords[dim] < start + size)
        coords = [c[keep] for c in coords]
        coords[dim] = coords[dim] - start
        flat = torch.zeros_like(coords[0])
        for c, extent in zip(coords, dense.shape, strict=True):
            flat = flat * extent + c
        return Delta(dense, flat, self.extra_val[keep])

    @property
    def nbytes(self) -> int:
        """Bytes held (dense and sparse terms)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.dense, self.extra_idx, self.extra_val)
            if t is not None
        )

    def full(self) -> torch.Tensor:
        """One fp32 tensor (the sparse term folded in; exact to fp32 rounding, not to the bit)."""
        if self.extra_idx is None:
            return self.dense
        out = self.dense.clone()
        out.view(-1)[self.extra_idx] += self.extra_val
        return out


# Elements merged per step: bounds the fp32 accumulator on a device (64 MiB), and is large
# enough that per-chunk overhead does not show on small tensors (one chunk each).
CHUNK_ELEMENTS = 1 << 24


def merge_tensor(
    base: torch.Tensor,
    deltas: Sequence[tuple[Delta, float]],
    out_dtype: torch.dtype,
    *,
    out: torch.Tensor | None = None,
    chunk: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """base + Σ alpha·delta, accumulated in fp32 chunk by chunk, cast to `out_dtype` (into `out` if given).

    Runs on the device of its inputs (host or GPU, all on one device). Every step is one correctly
    rounded IEEE operation per element — alpha·Δ is a separate multiply, never a fused multiply-add
    — so the host and a GPU give the same bits (checked by bench/swap_device.py).
    """
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    flat_base, flat_out = base.reshape(-1), out.view(-1)
    n = flat_base.numel()
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        target = flat_out[lo:hi]
        acc = target if out_dtype == torch.float32 else torch.empty(hi - lo, device=base.device)
        if not deltas:
            acc.copy_(flat_base[lo:hi])
        for i, (delta, alpha) in enumerate(deltas):
            term = delta.dense.reshape(-1)[lo:hi]
            if i == 0:  # one pass: fp32(base) + term, the same bits as a copy and then an add
                torch.add(flat_base[lo:hi], term if alpha == 1.0 else term * alpha, out=acc)
            else:
                _add(acc, term, alpha)
            if delta.extra_idx is not None:
                idx, val = delta.extra_idx, delta.extra_val
                if lo or hi < n:
                    inside = (idx >= lo) & (idx < hi)
                    idx, val = idx[inside], val[inside]
                part = acc[idx - lo]
                _add(part, val, alpha)
                acc[idx - lo] = part
        if acc is not target:
            target.copy_(acc)
    return out


def _add(acc: torch.Tensor, term: torch.Tensor, alpha: float) -> None:
    acc.add_(term if alpha == 1.0 else term * alpha)
