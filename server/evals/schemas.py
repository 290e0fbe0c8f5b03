"""Bodies of the evals API (the shape of OpenAI's Evals API, where it has one)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.evals.graders import Grader, template_fields
from server.evals.tasks import (
    BuiltinSource,
    DataSource,
    Endpoint,
    FidelitySource,
    JsonlSource,
    PerplexitySource,
    parse_jsonl,
)

RunStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]


class EvalCreate(BaseModel):
    """An eval: a data source and testing criteria (graders).

    Built-in tasks bring their prompt and graders (`testing_criteria` may add more); JSONL items
    need a `prompt` template over `{{item.*}}` and at least one grader.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    data_source: DataSource
    prompt: str | None = None
    endpoint: Endpoint = "chat"
    testing_criteria: list[Grader] = Field(default_factory=list)

    @model_validator(mode="after")
    def _templates_name_real_fields(self) -> EvalCreate:
        source = self.data_source
        if isinstance(source, BuiltinSource | PerplexitySource | FidelitySource):
            if self.prompt:
                raise ValueError(f"{source.type} data sources bring their own prompt; omit 'prompt'")
            if self.testing_criteria and not isinstance(source, BuiltinSource):
                raise ValueError(f"{source.type} evals report built-in metrics; omit 'testing_criteria'")
        else:
            if isinstance(source, JsonlSource):
                if not self.prompt:
                    raise ValueError("a jsonl data source needs a prompt template, e.g. '{{item.question}}'")
                if not self.testing_criteria:
                    raise ValueError("a jsonl data source needs at least one testing criterion")
            _check_templates(parse_jsonl(source.content), self.prompt, self.testing_criteria)
        names = [g.name for g in self.testing_criteria]
        if len(set(names)) != len(names):
            raise ValueError("testing criteria need distinct names")
        return self


def _check_templates(items: list[dict], prompt: str | None, graders: list) -> None:
    """Every `{{item.x}}` names a field every item has; `{{sample.x}}` is `output_text`."""
    templates = [("prompt", prompt or "")]
    for grader in graders:
        templates += [
            (f"grader {grader.name!r}", getattr(grader, k))
            for k in ("input", "reference")
            if hasattr(grader, k)
        ]
    for where, template in templates:
        for scope, name in template_fields(template):
            if scope == "sample" and name != "output_text":
                known = "{{sample.output_text}}"
                raise ValueError(f"{where}: sample field {name!r} is unknown; use {known}")
            missing = [i + 1 for i, item in enumerate(items) if scope == "item" and name not in item]
            if missing:
                raise ValueError(f"{where}: item {missing[0]} has no field {name!r}")


class EvalPublic(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str
    created_at: int
    data_source: BuiltinSource | dict
    testing_criteria: list[dict]
    items: int


class RunCreate(BaseModel):
    """Run an eval on one variant, or on several over the same items (a paired comparison)."""

    model_config = ConfigDict(extra="forbid")

    variants: list[str] = Field(min_length=1, max_length=8)
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2)
    seed: int = Field(0, ge=0, description="picks the items when `limit` is set; sampling seed")
    limit: int | None = Field(None, ge=1, description="evaluate a seeded sample of this many items")
    concurrency: int = Field(4, ge=1, le=32, description="requests in flight for this run")


class CriterionResult(BaseModel):
    passed: int
    n: int
    score: float
    ci95: tuple[float, float]


class MetricResult(BaseModel):
    """A corpus-level metric (perplexity, token agreement, KL) with a bootstrap 95% interval."""

    value: float
    n: int
    ci95: tuple[float, float]


class VariantResult(BaseModel):
    criteria: dict[str, CriterionResult]
    metrics: dict[str, MetricResult] = Field(default_factory=dict)
    passed: int
    failed: int
    errored: int


class Comparison(BaseModel):
    """variant − baseline on the items both answered without error; ci95 is paired (normal for pass
    rates, bootstrap over the same items for metrics)."""

    criterion: str
    baseline: str
    variant: str
    n: int
    difference: float
    ci95: tuple[float, float]


class RunPublic(BaseModel):
    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    status: RunStatus
    error: str | None
    created_at: int
    progress: dict[str, int]
    result_counts: dict[str, int]
    per_variant: dict[str, VariantResult]
    comparisons: list[Comparison]
    measured: dict


class OutputItem(BaseModel):
    id: int
    variant: str
    index: int
    status: Literal["pass", "fail", "error"]
    input: str
    output: str | None
    grades: dict[str, bool]
    scores: dict[str, float] = Field(default_factory=dict)
    error: str | None


class OutputItems(BaseModel):
    object: Literal["list"] = "list"
    data: list[OutputItem]
    has_more: bool
