"""Request and response bodies of the gateway's own (non-OpenAI) API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.aliases import AliasRecord, AliasTarget, distinct
from server.errors import InvalidBodyError
from server.registry import DeltaRecord, VariantRecord, VariantTerm, check_name


class InferenceBody(BaseModel):
    """The part of an OpenAI request the gateway reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False


def parse_inference_body(raw: bytes) -> InferenceBody:
    """Validate a raw OpenAI request body; errors become the gateway's 422."""
    try:
        return InferenceBody.model_validate_json(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        raise InvalidBodyError("; ".join(parts)) from None


class DeltaCreate(BaseModel):
    """Register an artifact that is already on the gateway's disk."""

    name: str
    path: str

    _check = field_validator("name")(check_name)


class DeltaPublic(BaseModel):
    name: str
    path: str
    size_bytes: int
    tensors: int
    encodings: list[str]
    lossless: bool
    base_architecture: str
    base_content_hash: str
    uploaded: bool

    @classmethod
    def of(cls, record: DeltaRecord) -> DeltaPublic:
        return cls.model_validate(record.model_dump())


class DeltasPublic(BaseModel):
    data: list[DeltaPublic]


class VariantCreate(VariantRecord):
    """{name, base, deltas: [{delta, alpha, density}], method, normalize, seed}: a variant to define."""

    model_config = ConfigDict(extra="forbid")

    deltas: list[VariantTerm] = Field(min_length=1)

    @field_validator("deltas")
    @classmethod
    def _finite_alphas(cls, terms: list[VariantTerm]) -> list[VariantTerm]:
        import math

        for term in terms:
            if not math.isfinite(term.alpha):
                raise ValueError(f"alpha of {term.delta!r} must be a finite number")
        return terms


class VariantTermPublic(VariantTerm):
    provenance: Literal["exact", "transferred"] = Field(
        description="exact: extracted on this variant's base; transferred: on another base (ParamΔ)"
    )


class VariantPublic(VariantRecord):
    deltas: list[VariantTermPublic] = Field(default_factory=list)
    resident: bool = False
    serving_lane: Literal["swap", "adapter"] = Field("swap", description="how requests for it are served now")
    lane_note: str | None = Field(None, description="why it is not served as an adapter, where it asked")


class VariantsPublic(BaseModel):
    data: list[VariantPublic]


class SwapPublic(BaseModel):
    """One swap attempt; `started_monotonic` is the host's CLOCK_MONOTONIC, for aligning timelines."""

    variant: str
    started_at: float
    started_monotonic: float
    seconds: float = Field(description="how long the engine was paused")
    ok: bool
    tensors: int = Field(0, description="checkpoint tensors rewritten (a partial swap rewrites fewer)")
    of_tensors: int = Field(0, description="the checkpoint's tensors")
    bytes: int = Field(0, description="bytes of the tensors rewritten")
    staged: bool = Field(False, description="merged while the previous variant still served")
    staging_seconds: float = Field(0.0, description="the background merge's time, when staged")
    prepared_modules: int = Field(0, description="modules committed from their prepared kernel form")
    fallback_modules: int = Field(0, description="modules vLLM's reload rewrote in the pause instead")
    prepared_bytes: int = Field(0, description="memory the prepared modules held while staged")
    fallback_reason: str = Field("", description="why nothing was prepared (over the budget, an error)")


class EngineWarmPublic(BaseModel):
    """One engine asked to read a variant's inputs into memory ahead of its first swap."""

    engine: str
    warming: bool = Field(description="false: the engine keeps nothing between swaps (--swap-residency none)")
    memory: dict = Field(description="what the engine's workers hold for swaps as of the request")


class VariantWarmPublic(BaseModel):
    """A variant's inputs being read on the engines of its base (at registration too)."""

    variant: str
    engines: list[EngineWarmPublic] = Field(description="none for a variant served as an adapter")


class BaseCreate(BaseModel):
    """Register a base checkpoint (a directory on the gateway's disk) while serving."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str
    tool_parser: str | None = Field(
        None, description="vLLM tool-call parser (hermes, llama3_json, ...) of the engine that serves it"
    )

    _check = field_validator("name")(check_name)


class BasePublic(BaseModel):
    name: str
    path: str
    tool_parser: str | None = Field(description="the tool-call parser its engine runs (tool_choice 'auto')")
    group: str = Field(
        description="the engine group serving it: its own name, or the base whose engines hot-load it"
    )
    runtime: bool = Field(description="registered through the API; DELETE-able")
    state: Literal["ready", "starting", "no engine"]
    architecture: str
    content_hash: str
    engine_url: str
    resident_variant: str | None
    inflight: int
    last_swap_seconds: float | None
    recent_swaps: list[SwapPublic] = []
    swap_memory: dict = Field(
        default_factory=dict, description="bytes an engine keeps for swaps: resident base, delta cache, stage"
    )


class EnginePublic(BaseModel):
    id: str = Field(description="unique among the gateway's engines; answers name it in X-Deltagate-Engine")
    base: str = Field(description="the base it was started on")
    url: str
    node: str = Field(description="where it runs: a Ray node id, or empty for this machine")
    pid: int | None = Field(description="its API server's process id, where known")
    resident_variant: str | None
    inflight: int
    queued: int = Field(description="requests waiting for a swap on it")
    swaps: int = Field(description="swaps it made (the last 256 are kept)")


class EnginesPublic(BaseModel):
    data: list[EnginePublic]


class BasesPublic(BaseModel):
    data: list[BasePublic]


class AliasUpdate(BaseModel):
    """Where an alias sends requests: one variant, or several with weights (a canary: 95 and 5)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[AliasTarget] = Field(min_length=1, max_length=16)

    _distinct = field_validator("targets")(distinct)


class AliasCreate(AliasUpdate):
    name: str

    _check = field_validator("name")(check_name)


class AliasPublic(AliasRecord):
    shares: dict[str, float] = Field(description="each target's fraction of requests")

    @classmethod
    def of(cls, record: AliasRecord) -> AliasPublic:
        return cls(**record.model_dump(), shares=record.split())


class AliasesPublic(BaseModel):
    data: list[AliasPublic]
