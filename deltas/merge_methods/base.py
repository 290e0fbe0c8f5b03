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
from pydantic import BaseModel, ConfigDict, Field

from deltas.mix import Delta


@dataclass(frozen=True)
class MergeTerm:
    """One delta of a variant with its weight and density (fraction kept by TIES/DARE)."""

    delta: Delta
    weight: float
    density: float = 1.0


class MethodParams(BaseModel):
    """Method-wide parameters every method takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    normalize: bool = Field(False, description="divide by the weights that contributed")


class SeededParams(MethodParams):
    seed: int = Field(0, ge=0, description="seed of the random drops (per tensor and term)")


class MergeMethod(ABC):
    """Turns the terms of one tensor into (Delta, coefficient) pairs for `merge_tensor`."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    uses_density: ClassVar[bool] = False  # whether a term's density means anything to this method

    def __init__(self, params: MethodParams | None = None):
        self.params = params if params is not None else self.Params()

    @property
    def normalize(self) -> bool:
        return self.params.normalize

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
