"""`dare_linear` and `dare_ties`: drop delta entries at random (seeded), rescale by 1/density, merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from deltas.merge_methods.base import MergeMethod, MergeTerm, SeededParams, weighted_sum
from deltas.mix import Delta
from deltas.sparsify import random_mask


class DareLinearMerge(MergeMethod):
    """Yu et al. 2024 (DARE) followed by a weighted sum."""

    name = "dare_linear"
    Params = SeededParams
    uses_density = True
    sign_consensus = False

    def combine(self, name: str, terms: Sequence[MergeTerm]) -> list[tuple[Delta, float]]:
        dropped = [self.drop(name, i, t) for i, t in enumerate(terms)]
        mixed = weighted_sum(
            dropped, [t.weight for t in terms], sign_consensus=self.sign_consensus, normalize=self.normalize
        )
        return [(Delta.of(mixed), 1.0)]

    def drop(self, name: str, index: int, term: MergeTerm) -> torch.Tensor:
        """Term `index` of tensor `name` with entries dropped (seeded per tensor and term)."""
        full = term.delta.full()
        if term.density >= 1:
            return full
        keep = random_mask(full.shape, term.density, self.params.seed, f"{name}#{index}")
        return full * keep / term.density


class DareTiesMerge(DareLinearMerge):
    """DARE's random drop with TIES's sign election."""

    name = "dare_ties"
    sign_consensus = True
