"""`ties` (TIES-Merging): trim each delta to its top-density magnitudes, elect signs, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from deltas.merge_methods.base import MergeMethod, MergeTerm, MethodParams, weighted_sum
from deltas.mix import Delta
from deltas.sparsify import topk_mask


class TiesParams(MethodParams):
    normalize: bool = Field(True, description="divide by the weights that contributed (mergekit's default)")


class TiesMerge(MergeMethod):
    """Yadav et al. 2023; normalised by the contributing weights by default, as in mergekit."""

    name = "ties"
    Params = TiesParams
    uses_density = True

    def combine(self, name: str, terms: Sequence[MergeTerm]) -> list[tuple[Delta, float]]:
        trimmed = []
        for t in terms:
            full = t.delta.full()
            trimmed.append(full * topk_mask(full.abs(), t.density) if t.density < 1 else full)
        mixed = weighted_sum(
            trimmed, [t.weight for t in terms], sign_consensus=True, normalize=self.normalize
        )
        return [(Delta.of(mixed), 1.0)]
