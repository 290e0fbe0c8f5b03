"""Merge methods for variants with several deltas: one class per method, mergekit-style."""

from __future__ import annotations

from deltas.merge_methods.base import MergeMethod, MergeTerm
from deltas.merge_methods.dare import DareLinearMerge, DareTiesMerge
from deltas.merge_methods.linear import LinearMerge
from deltas.merge_methods.ties import TiesMerge

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (LinearMerge, TiesMerge, DareLinearMerge, DareTiesMerge)
}

__all__ = ["METHODS", "MergeMethod", "MergeTerm", "get_method"]


def get_method(name: str, *, normalize: bool | None = None, seed: int = 0) -> MergeMethod:
    """The merge method `name` (one of METHODS)."""
    return METHODS[name](normalize=normalize, seed=seed)
