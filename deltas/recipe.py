"""A variant recipe: which base, which deltas with which coefficients, merged how.

`RecipeFile` is the YAML form, in the spirit of mergekit's merge configs:

    merge_method: ties            # linear (default) | ties | dare_linear | dare_ties
    base_model: /models/base      # a directory (or, for the gateway, a base name)
    parameters: {normalize: true} # optional, method-wide
    seed: 0                       # dare_* only
    deltas:
      - delta: math.safetensors   # a path (or, for the gateway, a registered delta name)
        parameters: {weight: 0.7, density: 0.5}
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deltas.errors import DeltaError
from deltas.merge_methods import MergeMethod, MethodName, check_terms, get_method


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("alpha must be a finite number")
    return value


class DeltaTerm(BaseModel):
    """One αᵢ·Δᵢ term: an artifact path, its coefficient and (TIES/DARE) density."""

    path: str
    alpha: float = 1.0
    density: float = Field(1.0, gt=0, le=1, description="fraction of entries kept by ties/dare_*")

    _finite_alpha = field_validator("alpha")(_finite)


class RecipeKey(NamedTuple):
    """The identity of the weights a recipe produces: recipes with equal keys give equal weights
    (paths normalised, the method's default `normalize` filled in). Hashable: admission queues and
    staging are keyed by it."""

    base: str
    terms: tuple[tuple[str, float, float], ...]  # (path, alpha, density) in merge order
    method: str
    normalize: bool
    seed: int


def _normal_path(path: str) -> str:
    """`a//b/./c` and `a/b/c` are one file; URIs (s3://…) are kept as written."""
    return path if "://" in path else os.path.normpath(path)


class Recipe(BaseModel):
    """θ = base + merge(Δ₁..Δₙ), with paths the engine's workers can read."""

    base: str
    deltas: list[DeltaTerm] = Field(default_factory=list)
    method: MethodName = "linear"
    normalize: bool | None = Field(None, description="None: the method's default (ties: true)")
    seed: int = Field(0, ge=0, description="seed of dare_* random drops")

    @model_validator(mode="after")
    def _method_takes_it(self) -> Recipe:
        check_terms(self.method, [t.density for t in self.deltas], self.seed)
        return self

    def key(self) -> RecipeKey:
        """The identity of the weights this recipe produces (see RecipeKey)."""
        terms = tuple((_normal_path(t.path), float(t.alpha), float(t.density)) for t in self.deltas)
        normalize = self.merge_method().normalize  # None is the method's default: spell it out
        return RecipeKey(_normal_path(self.base), terms, self.method, normalize, self.seed)

    def merge_method(self) -> MergeMethod:
        """The recipe's merge method with the parameters it sets."""
        params = {"normalize": self.normalize} if self.normalize is not None else {}
        return get_method(self.method, **params, **({"seed": self.seed} if self.seed else {}))


class TermParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0
    density: float = Field(1.0, gt=0, le=1)

    _finite_weight = field_validator("weight")(_finite)


class FileTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    delta: str
    parameters: TermParameters = Field(default_factory=TermParameters)


class MethodParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool | None = None


class RecipeFile(BaseModel):
    """The YAML recipe (see the module docstring). `name` names the variant when served."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    merge_method: MethodName = "linear"
    base_model: str | None = None
    parameters: MethodParameters = Field(default_factory=MethodParameters)
    seed: int = Field(0, ge=0)
    deltas: list[FileTerm] = Field(min_length=1)

    @model_validator(mode="after")
    def _method_takes_it(self) -> RecipeFile:
        check_terms(self.merge_method, [t.parameters.density for t in self.deltas], self.seed)
        return self

    @classmethod
    def load(cls, path: str | Path) -> RecipeFile:
        """Parse and validate a YAML recipe; DeltaError naming the file and field otherwise."""
        try:
            return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except OSError as exc:
            raise DeltaError(f"recipe {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:  # its str() spans lines (with a caret); errors stay on one line
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise DeltaError(f"recipe {path}: invalid YAML{where}: {problem}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in exc.errors()
            )
            raise DeltaError(f"recipe {path}: {problems}") from None

    def to_recipe(self, base: str | None = None, relative_to: Path | None = None) -> Recipe:
        """The Recipe with delta paths resolved against `relative_to` (the YAML's folder)."""
        base = base or self.base_model
        if base is None:
            raise DeltaError("recipe has no base_model and none was given")

        def resolve(p: str) -> str:
            path = Path(p).expanduser()
            return str(path if path.is_absolute() or relative_to is None else relative_to / path)

        return Recipe(
            base=resolve(base),
            deltas=[
                DeltaTerm(path=resolve(t.delta), alpha=t.parameters.weight, density=t.parameters.density)
                for t in self.deltas
            ],
            method=self.merge_method,
            normalize=self.parameters.normalize,
            seed=self.seed,
        )
