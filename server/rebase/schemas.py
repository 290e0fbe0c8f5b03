"""Bodies of the rebase API: move the variants of base θ to an updated base θ′, gated by an eval."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RebaseStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]
Phase = Literal["queued", "defining", "validating", "evaluating", "promoting", "done"]


class Gate(BaseModel):
    """When a transferred variant may replace its θ variant, on the held-out split. Differences are
    in the criterion's own units (a pass rate: −0.02 is −2 points) and signed so that better is
    positive (for perplexity or KL, lower is better)."""

    model_config = ConfigDict(extra="forbid")

    criterion: str | None = Field(None, description="a grader or metric of the eval (None: its first)")
    min_difference: float | None = Field(
        None, description="the paired difference's 95% lower bound (candidate − θ variant) must be ≥ this"
    )
    min_ratio: float | None = Field(
        None, gt=0, description="the candidate's score must be ≥ this × the θ variant's (lower-better: ≤ ÷)"
    )

    @model_validator(mode="after")
    def _a_rule(self) -> Gate:
        if self.min_difference is None and self.min_ratio is None:
            raise ValueError("state the gate: min_difference (paired lower bound) and/or min_ratio")
        return self


class Promotion(BaseModel):
    """How a passing variant takes over the aliases that route to its θ variant."""

    model_config = ConfigDict(extra="forbid")

    steps: list[float] = Field(
        default_factory=lambda: [100.0],
        min_length=1,
        max_length=10,
        description="canary percentages of the θ variant's share moved at each step, ending at 100",
    )
    hold_seconds: float = Field(0.0, ge=0, le=86_400, description="time at each step before the next")

    @field_validator("steps")
    @classmethod
    def _rising_to_100(cls, steps: list[float]) -> list[float]:
        if any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)) or steps[-1] != 100:
            raise ValueError("steps are rising percentages in (0, 100], ending at 100 (e.g. [5, 50, 100])")
        return steps


class RebaseCreate(BaseModel):
    """Define θ′ + α·Δ for each variant of `from_base`, pick α on a validation split, gate each
    against its θ variant on a held-out split, promote those that pass by moving their aliases."""

    model_config = ConfigDict(extra="forbid")

    from_base: str
    to_base: str
    variants: list[str] | None = Field(None, min_length=1, description="None: every variant of from_base")
    eval_id: str = Field(description="an eval holding its items (a built-in task, JSONL, perplexity, ...)")
    alphas: list[float] = Field(
        default_factory=lambda: [1.0],
        min_length=1,
        max_length=8,
        description="α grid; each scales every delta term of a variant",
    )
    validation: int = Field(0, ge=0, description="items of the validation split (α search)")
    holdout: int = Field(ge=1, description="items of the held-out split (the gate)")
    seed: int = Field(0, ge=0, description="shuffles the eval's items into the two splits")
    gate: Gate
    promote: Promotion = Field(default_factory=Promotion)
    concurrency: int = Field(2, ge=1, le=32, description="eval requests in flight (online traffic goes on)")
    max_tokens: int = Field(256, ge=1, le=4096)

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, alphas: list[float]) -> list[float]:
        if any(not math.isfinite(a) or a <= 0 for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError("alphas are distinct positive numbers")
        return alphas

    @model_validator(mode="after")
    def _search_needs_items(self) -> RebaseCreate:
        if len(self.alphas) > 1 and self.validation == 0:
            raise ValueError("searching α needs a validation split: set 'validation' (items)")
        if self.from_base == self.to_base:
            raise ValueError("from_base and to_base are the same base")
        return self


class Score(BaseModel):
    value: float
    ci95: tuple[float, float]
    n: int


class Verdict(BaseModel):
    passed: bool
    reasons: list[str]


class VariantReport(BaseModel):
    """One variant's way to θ′: its candidates, the scores, the gate, what was promoted."""

    candidates: dict[str, str] = Field(default_factory=dict, description="α → candidate variant")
    validation_run: str | None = None
    validation: dict[str, Score] = Field(default_factory=dict, description="α → validation score")
    alpha: float | None = Field(None, description="the α chosen")
    variant: str | None = Field(None, description="the transferred variant defined on θ′")
    holdout_run: str | None = None
    scores: dict[str, Score] = Field(
        default_factory=dict, description="on the held-out split: 'from' (θ variant), 'candidate', 'to_base'"
    )
    difference: Score | None = Field(None, description="candidate − θ variant, paired, raw sign")
    gate: Verdict | None = None
    aliases: list[str] = Field(default_factory=list, description="aliases routing to the θ variant")
    promoted: bool = False


class RebaseReport(BaseModel):
    phase: Phase = "queued"
    criterion: str | None = None
    lower_is_better: bool = False
    validation_items: list[int] = Field(default_factory=list)
    holdout_items: list[int] = Field(default_factory=list)
    variants: dict[str, VariantReport] = Field(default_factory=dict)
    aliases_before: dict[str, list[dict]] = Field(default_factory=dict, description="as found when promoting")
    promotion_step: int = Field(0, description="canary steps done")
    log: list[str] = Field(default_factory=list, description="what happened, in order")


class RebasePublic(BaseModel):
    id: str
    object: Literal["rebase"] = "rebase"
    created_at: int
    status: RebaseStatus
    error: str | None
    request: RebaseCreate
    progress: dict[str, int] = Field(description="eval items done / total of the current phase's runs")
    report: RebaseReport


class RebasesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[RebasePublic]
