"""Merge methods for variants with several deltas: one class per method, mergekit-style, each with
its own parameters (a pydantic model), in one registry that recipes validate against."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationError

from deltas.errors import MergeMethodError
from deltas.merge_methods.base import MergeMethod, MergeTerm, MethodParams
from deltas.merge_methods.dare import DareLinearMerge, DareTiesMerge
from deltas.merge_methods.linear import LinearMerge
from deltas.merge_methods.ties import TiesMerge

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (LinearMerge, TiesMerge, DareLinearMerge, DareTiesMerge)
}
# The names recipes accept, from the registry (an enum in the OpenAPI schema).
MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]

__all__ = ["METHODS", "MergeMethod", "MergeTerm", "MethodName", "MethodParams", "check_terms", "get_method"]


def _method(name: str) -> type[MergeMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise MergeMethodError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


def get_method(name: str, **params: object) -> MergeMethod:
    """The merge method `name` with `params` (see its Params); MergeMethodError naming the problem."""
    cls = _method(name)
    try:
        return cls(cls.Params.model_validate(params))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise MergeMethodError(f"merge method {name!r}: bad parameters ({problems})") from None


def check_terms(name: str, densities: list[float], seed: int) -> None:
    """ValueError when a recipe sets what its method would ignore (a density, a seed)."""
    cls = _method(name)
    users = [m.name for m in METHODS.values() if m.uses_density]
    if not cls.uses_density and any(d != 1 for d in densities):
        raise ValueError(f"{name} ignores density (it keeps every entry); density is for {', '.join(users)}")
    seeded = [m.name for m in METHODS.values() if "seed" in m.Params.model_fields]
    if seed and "seed" not in cls.Params.model_fields:
        raise ValueError(f"{name} ignores seed; seed applies to {', '.join(seeded)}")
