"""A variant recipe: which base, which deltas with which coefficients."""

from __future__ import annotations

import math

from pydantic import BaseModel, Field, field_validator


class DeltaTerm(BaseModel):
    """One αᵢ·Δᵢ term: an artifact path and its coefficient."""

    path: str
    alpha: float = 1.0

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("alpha must be a finite number")
        return value


class Recipe(BaseModel):
    """θ = base + Σ αᵢ·Δᵢ, with paths the engine's workers can read."""

    base: str
    deltas: list[DeltaTerm] = Field(default_factory=list)

    def key(self) -> str:
        """A stable identity of the weights this recipe produces."""
        return self.model_dump_json()
