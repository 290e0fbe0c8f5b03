"""`linear`: task arithmetic, base + Σ wᵢ·Δᵢ. The default, and the only bit-exact one."""

from __future__ import annotations

from collections.abc import Sequence

from deltas.merge_methods.base import MergeMethod, MergeTerm
from deltas.mix import Delta


class LinearMerge(MergeMethod):
    """Pass each delta through with its weight (exactness terms kept, see deltas.mix)."""

    name = "linear"

    def combine(self, name: str, terms: Sequence[MergeTerm]) -> list[tuple[Delta, float]]:
        if not self.normalize:
            return [(t.delta, t.weight) for t in terms]
        total = sum(t.weight for t in terms)
        scale = 1.0 / total if abs(total) >= 1e-8 else 1.0
        return [(t.delta, t.weight * scale) for t in terms]
