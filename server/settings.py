"""Gateway settings: CLI flags or DELTAGATE_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from deltas.recipe import MethodName
from deltas.store import NodeCache


class BaseSpec(BaseModel):
    """A base model the gateway serves: a checkpoint dir, and optionally an engine to attach."""

    name: str
    path: str
    engine_url: str | None = None
    tool_parser: str | None = None  # vLLM's --tool-call-parser for its engine (tools, tool_choice "auto")


class StartupTerm(BaseModel):
    """One delta of a --variant flag: a registered delta name or an artifact path."""

    ref: str
    alpha: float = 1.0
    density: float = 1.0


class StartupVariant(BaseModel):
    """A variant given on the command line (or in a YAML recipe); defined (or redefined) at start-up."""

    name: str
    terms: list[StartupTerm]
    base: str | None = None
    method: MethodName = "linear"
    normalize: bool | None = None
    seed: int = 0


class GatewaySettings(BaseSettings):
    """Everything `create_app` needs; no import-time globals."""

    model_config = SettingsConfigDict(env_prefix="DELTAGATE_")

    state_dir: Path = Path(".deltagate")
    state_db: str | None = None  # SQLAlchemy URL shared by several gateways (postgresql://…); None: state dir
    state_poll_seconds: float = 2.0  # how often a gateway on a shared database reads others' changes
    run_lease_seconds: float = 15.0  # an eval run whose gateway renewed nothing this long is taken over
    admin_token: str | None = None
    api_keys: list[str] = Field(default_factory=list)
    bases: list[BaseSpec] = Field(default_factory=list)
    variants: list[StartupVariant] = Field(default_factory=list)
    max_model_len: int | None = None
    kv_cache_gib: float = 1.0
    engine_start_timeout: float = 900.0
    supervise_seconds: float = 2.0  # 0: no supervision (Ray Serve replaces a replica instead)
    engine_wait: float = (
        60.0  # seconds a request may wait for an engine (restarting, or a Ray replica), then 503
    )
    engine_args: list[str] = Field(default_factory=list)
    allow_code_execution: bool = False  # HumanEval: run model-written programs (sandboxed)
    swap_quantum: float = 2.0  # seconds a busy variant stays resident while others wait (server/policy.py)
    lora_slots: int = 0  # >0: engines with vLLM multi-LoRA; low-rank variants served as adapters
    max_lora_rank: int = 16  # the largest adapter rank engines accept (vLLM's --max-lora-rank)
    swap_max_wait: float = 30.0  # seconds any request may wait for its variant before the quantum ends
    engine_read_timeout: float = 3600.0  # seconds an engine may send nothing mid-answer, then 502 (0: none)
    max_body_bytes: int = 32 * 2**20  # any request body but an upload (0: no limit)
    max_upload_bytes: int = 64 * 2**30  # an uploaded artifact (0: no limit)
    upload_idle_seconds: float = 60.0  # an upload that sends nothing for this long is dropped (408)
    stream_write_timeout: float = 60.0  # a stream whose client reads nothing this long is ended (0: never)
    swap_residency: Literal["host", "device", "none"] = "host"  # where engines keep the base for swaps
    delta_cache_mib: float = 1024.0  # decoded deltas each engine worker keeps between swaps
    artifact_store: str | None = None  # directory or s3:// URI of all registered deltas (deltas/store.py)
    artifact_cache_mib: float = 0.0  # each node's cache of stored artifacts (0: no budget)
    mock_engine_tps: float | None = None  # benches: managed engines are mock engines at this tok/s
    responses_store: bool = False  # engines keep Responses-API responses (retrieve, continue; memory grows)

    def engine_flags(self, tool_parser: str | None = None) -> tuple[str, ...]:
        """vLLM flags of managed engines: the operator's, multi-LoRA for the adapter lane, and the
        tool-call parser of the base an engine is started on."""
        lora = tools = ()
        if self.lora_slots and "--enable-lora" not in self.engine_args:
            lora = ("--enable-lora", "--max-loras", str(self.lora_slots),
                    "--max-lora-rank", str(self.max_lora_rank))  # fmt: skip
        if tool_parser and "--tool-call-parser" not in self.engine_args:
            tools = ("--enable-auto-tool-choice", "--tool-call-parser", tool_parser)
        return (*self.engine_args, *lora, *tools)

    def engine_env(self) -> dict[str, str]:
        """Environment of managed engines: how their workers keep what swaps need (loaders/resident.py)."""
        env = {
            "DELTAGATE_SWAP_RESIDENCY": self.swap_residency,
            "DELTAGATE_DELTA_CACHE_MIB": str(self.delta_cache_mib),
            "DELTAGATE_ARTIFACT_CACHE_MIB": str(self.artifact_cache_mib),
        }
        env["DELTAGATE_ARTIFACT_CACHE"] = str(self.artifact_cache().directory)  # one cache on a node
        if self.responses_store:
            env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
        return env

    def artifact_cache(self) -> NodeCache:
        """This node's cache of stored artifacts (DELTAGATE_ARTIFACT_CACHE, else in the state dir)."""
        directory = os.environ.get("DELTAGATE_ARTIFACT_CACHE") or self.state_dir / "artifact-cache"
        return NodeCache(Path(directory).resolve(), int(self.artifact_cache_mib * 2**20))

    @property
    def store_dir(self) -> Path:
        return self.state_dir / "deltas"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
