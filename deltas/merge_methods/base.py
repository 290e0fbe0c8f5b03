"""The merge-method interface: how several deltas of one tensor become what is added to the base.

Methods follow mergekit's generalized task arithmetic: optionally sparsify each delta
(magnitude trim for TIES, seeded random drop + rescale for DARE), weight it, optionally
keep only entries agreeing with the elected sign, sum, and optionally normalise by the
weights that contributed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from deltas.mix import Delta


@dataclass(frozen=True)
class MergeTerm:
    """One delta of a variant with its weight and density (fraction kept by TIES/DARE)."""

    delta: Delta
    weight: float
    density: float = 1.0


class MergeMethod(ABC):
    """Turns the terms of one tensor into (Delta, coefficient) pairs for `merge_tensor`."""

    name: ClassVar[str]
    default_normalize: ClassVar[bool] = False

    def __init__(self, *, normalize: bool | None = None, seed: int = 0):
        self.normalize = self.default_normalize if normalize is None else normalize
        self.seed = seed

    @abstractmethod
    def combine(self, name: str, terms: Sequence[MergeTerm]) -> list[tuple[Delta, float]]:
        """What to add to base tensor `name`."""


def weighted_sum(
    trimmed: list[torch.Tensor], weights: list[float], *, sign_consensus: bool, normalize: bool
) -> torch.Tensor:
    """Σ wᵢ·τᵢ, optionally only over entries agreeing with the elected sign, optionally normalised.

    The elected sign is that of Σ wᵢ·τᵢ (mergekit's `sum` consensus, ties at zero count as +).
    """
    stacked = torch.stack(trimmed)
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if sign_consensus:
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0)
        mask = weighted.sign() == elected
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1.0
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1.0
    return mixed / divisor if normalize else mixed
