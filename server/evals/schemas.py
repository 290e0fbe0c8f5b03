"""Bodies of the evals API: OpenAI's Evals API as its SDK sends it (a custom data source config on
the eval, the model and items on each run), and deltagate's own sources (built-in tasks, JSONL,
multiple choice, perplexity, fidelity; several variants per run) as extra fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
Metadata = dict[str, str]


class CustomDataSourceConfig(BaseModel):
    """OpenAI's custom data source: each run brings its items, checked against `item_schema`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["custom"]
    item_schema: dict
    include_sample_schema: bool = False

    @field_validator("item_schema")
    @classmethod
    def _a_json_schema(cls, schema: dict) -> dict:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"item_schema is not a JSON schema: {exc.message}") from None
        return schema

    def public(self) -> dict:
        """As OpenAI answers it: the schema of the item (and sample) namespaces."""
        properties = {"item": self.item_schema}
        if self.include_sample_schema:
            properties["sample"] = {"type": "object", "properties": {"output_text": {"type": "string"}}}
        return {
            "type": "custom",
            "schema": {"type": "object", "properties": properties, "required": list(properties)},
        }


class EvalCreate(BaseModel):
    """An eval: testing criteria (graders), and either OpenAI's `data_source_config` (items come
    with each run) or one of deltagate's data sources (items held by the eval).

    Built-in tasks bring their prompt and graders (`testing_criteria` may add more); JSONL items
    need a `prompt` template over `{{item.*}}` and at least one grader.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field("eval", min_length=1, max_length=200)
    data_source_config: CustomDataSourceConfig | None = None
    data_source: DataSource | None = Field(None, description="deltagate: the eval's own items")
    prompt: str | None = None
    endpoint: Endpoint = "chat"
    testing_criteria: list[Grader] = Field(default_factory=list)
    metadata: Metadata | None = None

    @model_validator(mode="after")
    def _templates_name_real_fields(self) -> EvalCreate:
        source = self.data_source
        if (source is None) == (self.data_source_config is None):
            raise ValueError("give data_source_config (OpenAI's: items come with each run) or data_source")
        if self.data_source_config is not None:
            if self.prompt:
                raise ValueError("with data_source_config the prompt comes with each run (input_messages)")
            if not self.testing_criteria:
                raise ValueError("give at least one testing criterion")
            fields = self.data_source_config.item_schema.get("properties")
            items = [dict.fromkeys(fields)] if isinstance(fields, dict) else []
            check_templates(items, None, self.testing_criteria)
        elif isinstance(source, BuiltinSource | PerplexitySource | FidelitySource):
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
            check_templates(parse_jsonl(source.content), self.prompt, self.testing_criteria)
        names = [g.name for g in self.testing_criteria]
        if len(set(names)) != len(names):
            raise ValueError("testing criteria need distinct names")
        return self


def check_templates(items: list[dict], prompt: str | None, graders: list) -> None:
    """ValueError unless every `{{item.x}}` names a field every item has; `{{sample.x}}` is `output_text`."""
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
    data_source_config: dict | None = Field(description="OpenAI's {type: custom, schema}; None: own source")
    data_source: BuiltinSource | dict | None
    testing_criteria: list[dict]
    items: int = Field(description="items the eval holds (0: they come with each run)")
    metadata: Metadata | None = None


class InputText(BaseModel):
    type: Literal["input_text", "output_text"]
    text: str


class TemplateMessage(BaseModel):
    """One message of a run's prompt; `{{item.x}}` in its content is filled per item."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | InputText
    type: Literal["message"] = "message"

    def as_chat(self) -> dict:
        text = self.content if isinstance(self.content, str) else self.content.text
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TemplateInput(BaseModel):
    type: Literal["template"]
    template: list[TemplateMessage] = Field(min_length=1)


class ContentRow(BaseModel):
    item: dict
    sample: dict | None = None


class FileContent(BaseModel):
    type: Literal["file_content"]
    content: list[ContentRow] = Field(min_length=1, max_length=100_000)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(None, ge=0, le=2)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    response_format: dict | None = None


class CompletionsRunSource(BaseModel):
    """OpenAI's `completions` run data source: the model (a variant), the prompt messages, and
    the items; `models` (deltagate) runs several variants over the same items, paired."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["completions"]
    model: str | None = None
    models: list[str] | None = Field(None, min_length=1, max_length=8)
    input_messages: TemplateInput
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    source: FileContent

    @model_validator(mode="after")
    def _one_model_field(self) -> CompletionsRunSource:
        if (self.model is None) == (self.models is None):
            raise ValueError("name the variant as 'model' (or several as 'models')")
        return self


class RunCreate(BaseModel):
    """Run an eval on one variant, or on several over the same items (a paired comparison):
    OpenAI's shape (`data_source` with the model and the items), or deltagate's (`variants`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    data_source: CompletionsRunSource | None = None
    metadata: Metadata | None = None
    variants: list[str] = Field(default_factory=list, max_length=8)
    max_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = Field(0, ge=0, description="picks the items when `limit` is set; sampling seed")
    limit: int | None = Field(None, ge=1, description="evaluate a seeded sample of this many items")
    items: list[int] | None = Field(
        None, min_length=1, max_length=100_000, description="deltagate: evaluate exactly these item indices"
    )
    concurrency: int = Field(4, ge=1, le=32, description="requests in flight for this run")

    @model_validator(mode="after")
    def _variants(self) -> RunCreate:
        source = self.data_source
        if source is None:
            if not self.variants:
                raise ValueError("name the variants to run (or give an OpenAI data_source with a model)")
            return self
        named = source.models or [source.model]
        if self.variants and self.variants != named:  # (a stored body has both, the same)
            raise ValueError("name the variants in data_source.model(s), not in 'variants'")
        self.variants = named
        params = source.sampling_params
        self.temperature = params.temperature if params.temperature is not None else self.temperature
        self.max_tokens = params.max_completion_tokens or self.max_tokens
        self.top_p = params.top_p if params.top_p is not None else self.top_p
        self.seed = params.seed if params.seed is not None else self.seed
        return self


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


class EvalError(BaseModel):
    code: str
    message: str


class CriterionCounts(BaseModel):
    testing_criteria: str
    passed: int
    failed: int


class RunPublic(BaseModel):
    """OpenAI's run object; `progress`, `per_variant` (scores with 95% intervals), `comparisons`
    (paired differences) and `measured` (what exactly was run) are deltagate's."""

    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    name: str
    model: str = Field(description="the variant (several: comma-separated, as in per_variant)")
    status: RunStatus
    error: EvalError | None
    created_at: int
    data_source: dict
    metadata: Metadata | None = None
    result_counts: dict[str, int]
    per_testing_criteria_results: list[CriterionCounts]
    per_model_usage: list[dict] = Field(default_factory=list, description="not recorded: always empty")
    report_url: str | None = None
    progress: dict[str, int]
    per_variant: dict[str, VariantResult]
    comparisons: list[Comparison]
    measured: dict


class GraderResult(BaseModel):
    name: str
    type: str
    passed: bool
    score: float


class OutputItem(BaseModel):
    """OpenAI's output item (`datasource_item`, `results`, `sample`); `variant`, `index`, `input`,
    `output`, `grades`, `scores` and `error` are deltagate's flat view of the same."""

    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    eval_id: str
    run_id: str
    created_at: int
    status: Literal["pass", "fail", "error"]
    datasource_item_id: int
    datasource_item: dict
    results: list[GraderResult]
    sample: dict
    variant: str
    index: int
    input: str
    output: str | None
    grades: dict[str, bool]
    scores: dict[str, float] = Field(default_factory=dict)
    error: str | None


class OutputItems(BaseModel):
    object: Literal["list"] = "list"
    data: list[OutputItem]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
