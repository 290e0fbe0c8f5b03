"""Gateway settings: CLI flags or DELTAGATE_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from deltas.merge_methods import MethodName
from deltas.store import CACHE_ENV, CACHE_MIB_ENV, NodeCache
from loaders.resident import ResidencyConfig


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


_WORKER = ResidencyConfig()  # the engine workers' defaults (loaders/resident.py), declared there
# vLLM's --max-lora-rank accepts only these (vllm/config/lora.py MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _setting(default, help: str, *, flag: str | None = None, cli: bool = True, hidden: bool = False, **kw):
    """A gateway setting: its default, its help (the CLI's and the docs'), and its flag when that is
    not the field's name (`flag`), or none (`cli=False`: set from other flags)."""
    extra = {"flag": flag, "cli": cli, "hidden": hidden}
    factory = kw.pop("default_factory", None)
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=extra, **kw)
    return Field(default, description=help, json_schema_extra=extra, **kw)


def default_state_dir() -> Path:
    """Where a gateway keeps its state unless told: DELTAGATE_STATE_DIR, else the user's state
    directory ($XDG_STATE_HOME/deltagate, by default ~/.local/state/deltagate). Not the working
    directory: a gateway started in a repository must neither write into it nor pick up a state
    dir someone committed there."""
    if os.environ.get("DELTAGATE_STATE_DIR"):
        return Path(os.environ["DELTAGATE_STATE_DIR"])
    root = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(root) / "deltagate"


def _words(value):
    """DELTAGATE_API_KEYS="k1 k2": keys separated by spaces or commas (a list passes through)."""
    return value.replace(",", " ").split() if isinstance(value, str) else value


class GatewaySettings(BaseSettings):
    """Everything `create_app` needs; no import-time globals. The one declaration of each setting:
    `deltagate serve`'s options (cli/options.py) and docs/reference/settings.md come from here."""

    model_config = SettingsConfigDict(env_prefix="DELTAGATE_")

    state_dir: Path = _setting(
        None,
        "Registry, uploaded deltas, logs and the admin token (default: $XDG_STATE_HOME/deltagate, "
        "else ~/.local/state/deltagate)",
        default_factory=default_state_dir,
    )
    state_db: str | None = _setting(
        None,
        "A database shared by several gateways for the registry and the evals "
        "(postgresql://user:password@host/db; DELTAGATE_STATE_DB keeps the password off the command "
        "line). They need the same --admin-token and an --artifact-store all reach. Default: a SQLite "
        "file in the state dir",
    )
    state_poll_seconds: float = _setting(
        2.0, "With --state-db: how often other gateways' changes are read (s)", ge=0.1
    )
    run_lease_seconds: float = _setting(
        15.0,
        "With --state-db: an eval run or rebase whose gateway renewed nothing this long (s) is "
        "taken over by another gateway",
        gt=0,
    )
    admin_token: str | None = _setting(
        None, "Bearer token of the admin API; default: generated once, kept in the state dir (admin_token)"
    )
    api_keys: Annotated[list[str], NoDecode] = _setting(
        None,
        "Inference key (repeatable; DELTAGATE_API_KEYS: separated by spaces); none: inference is open",
        flag="api-key",
        default_factory=list,
    )
    bases: list[BaseSpec] = _setting(
        None, "From --base, --engine-url, --tool-parser", cli=False, default_factory=list
    )
    variants: list[StartupVariant] = _setting(
        None, "From --variant, --recipe", cli=False, default_factory=list
    )
    max_model_len: int | None = _setting(
        None, "Context length of the engines; default: from the model config"
    )
    kv_cache_gib: float = _setting(1.0, "KV cache per engine (GiB; vLLM CPU: VLLM_CPU_KVCACHE_SPACE)", gt=0)
    engine_start_timeout: float = _setting(900.0, "Seconds an engine may take to start", gt=0)
    supervise_seconds: float = _setting(
        2.0,
        "How often engines are checked, a dead one restarted (s; 0: no supervision, e.g. under Ray "
        "Serve, which replaces a replica instead)",
        ge=0,
    )
    engine_wait: float = _setting(
        60.0,
        "Seconds a request waits for an engine that is restarting (or, with --ray, for a replica "
        "able to serve it), then 503 with Retry-After",
        ge=0,
    )
    engine_args: list[str] = _setting(
        None,
        "A vLLM flag for every managed engine (repeatable: --engine-arg=--enforce-eager; "
        "DELTAGATE_ENGINE_ARGS: a JSON list)",
        flag="engine-arg",
        default_factory=list,
    )
    allow_code_execution: bool = _setting(
        False,
        "Let evals run model-written code (HumanEval), each program sandboxed (docs/guides/evaluate.md)",
    )
    swap_quantum: float = _setting(
        2.0,
        "Seconds a busy variant stays resident while other variants wait (the swap policy; 2 s was the "
        "best of 0/2/5 s measured)",
        ge=0,
    )
    swap_max_wait: float = _setting(
        30.0, "Seconds a request may wait for its variant before the quantum ends", ge=0
    )
    background_max_wait: float = _setting(
        120.0,
        "Seconds a background request (keys of priority batch, batches, eval runs, rebases) may wait for "
        "its variant while interactive requests are served first; then its variant goes next",
        ge=0,
    )
    background_gap: float = _setting(
        1.0,
        "Seconds the resident variant must have had nothing in flight before a variant only background "
        "work wants is swapped to (the gaps background work runs in: closed-loop traffic empties the "
        "engine for milliseconds between waves)",
        ge=0,
    )
    priority_scheduling: bool = _setting(
        False,
        "Start managed engines with vLLM's priority scheduling (--scheduling-policy priority) and send "
        "each request's priority (interactive 0, background 1; a client's own is replaced); attached "
        "engines must be started with it",
    )
    lora_slots: int = _setting(
        0,
        "Adapter lane: engines run vLLM multi-LoRA with this many adapters per batch, and variants whose "
        "deltas are all lowrank projections are served as adapters beside the base, no swap (0: off; "
        "attached engines must be started with --enable-lora)",
        ge=0,
    )
    max_lora_rank: int = _setting(16, f"Largest adapter rank (vLLM's --max-lora-rank: {VLLM_RANKS})")
    engine_read_timeout: float = _setting(
        3600.0,
        "Seconds an engine may send nothing mid-answer (a long prefill included) before the relay "
        "gives up: 502, or an error event in a stream (0: wait forever)",
        ge=0,
    )
    max_body_bytes: int = _setting(
        32 * 2**20, "Largest request body but an upload; larger gets 413 (0: no limit)", ge=0
    )
    max_upload_bytes: int = _setting(
        64 * 2**30, "Largest uploaded artifact; larger gets 413 (0: no limit)", ge=0
    )
    upload_idle_seconds: float = _setting(
        60.0, "An upload sending nothing for this long (s) is dropped with 408", ge=0
    )
    keep_alive_seconds: int = _setting(
        75,
        "Seconds the gateway keeps an idle client connection open. Longer than clients and load "
        "balancers keep theirs (the openai SDK 5 s, AWS ALB 60 s), so that they, not the gateway, hang up "
        "first: a request sent as the server closes fails (bench/keepalive.py)",
        gt=0,
    )
    stream_write_timeout: float = _setting(
        60.0,
        "A stream whose client reads nothing for this long (s) is ended and its variant's admission "
        "released, so it cannot hold off other variants' swaps (0: never)",
        ge=0,
    )
    swap_residency: Literal["host", "device", "none"] = _setting(
        _WORKER.residency,
        "Where each engine keeps the base weights swaps merge onto: host (memory; pinned on GPUs), "
        "device (GPU memory: fastest, one more copy of the base there) or none (re-read from the checkpoint "
        "at every swap)",
    )
    delta_cache_mib: float = _setting(
        _WORKER.delta_cache_bytes / 2**20, "Decoded deltas each engine worker keeps between swaps (MiB)", ge=0
    )
    kv_across_swaps: bool = _setting(
        True,
        "Keep each engine's prefix cache across swaps: every request carries a cache_salt naming the "
        "weights it runs on (with the client's own salt, if any), so KV is only reused under the same "
        "weights and a variant that comes back finds its prefixes cached; off: reset at every swap",
    )
    warm_on_register: bool = _setting(
        True,
        "Have the engines of a variant registered while serving read its base tensors and decoded deltas "
        "into memory right away, in the background, so its first swap does not (POST "
        "/v1/variants/{name}/warm does it on demand)",
    )
    prepare_mib: float = _setting(
        _WORKER.prepare_bytes / 2**20,
        "Memory each engine worker may hold for a staged swap's modules in kernel form, so the commit "
        "only re-binds them (MiB); a swap needing more is reloaded by vLLM in the pause, as with 0",
        ge=0,
    )
    swap_mode: Literal["incremental", "full"] = _setting(
        "incremental",
        "Benchmarks: full merges every tensor inside the engine's pause (the baseline "
        "incremental swaps are measured against)",
        hidden=True,
    )
    artifact_store: str | None = _setting(
        None,
        "Keep every registered delta in this artifact store, by sha256: a directory or an s3:// URI "
        "(any S3-compatible endpoint: AWS_ENDPOINT_URL and the usual AWS_* credentials); engines read "
        "deltas through a verified node-local cache. Default: the state dir",
    )
    artifact_cache_mib: float = _setting(
        0.0, "Each node's cache of stored artifacts, evicted LRU (MiB; 0: no budget)", ge=0
    )
    mock_engine_tps: float | None = _setting(
        None,
        "Benchmarks: managed engines are mock engines streaming this many tokens/s",
        flag="mock-engine",
        hidden=True,
    )
    responses_store: bool = _setting(
        False,
        "Engines keep the Responses-API responses they make (vLLM's VLLM_ENABLE_RESPONSES_API_STORE), "
        "so clients can retrieve and continue them (previous_response_id) on the engine that made them; "
        "kept in the engines' memory until they restart",
    )

    # Ray Serve (`serve --ray`): engines as replicas of one deployment per base (server/cluster/)
    ray: bool = _setting(
        False,
        "Engines on Ray Serve: one deployment per base, one vLLM engine per replica, placed by Ray on the "
        "cluster's nodes; this process serves the same API in front of them (a local Ray unless "
        "--ray-address)",
    )
    ray_address: str | None = _setting(
        None, "--ray: join this Ray cluster (its GCS address HEAD:6379, or auto)"
    )
    replicas: int = _setting(2, "--ray: engine replicas per base (each one vLLM engine)", ge=1)
    replicas_per_node: int | None = _setting(
        None, "--ray: at most this many engine replicas of a base on one node", ge=1
    )
    max_replicas: int | None = _setting(
        None,
        "--ray: autoscale each base's engines between --replicas and this, by the requests its engines "
        "hold (running + waiting)",
        ge=1,
    )
    target_requests: float = _setting(8.0, "--ray autoscaling: requests per engine to aim at", ge=0.1)
    scale_down_delay: float = _setting(
        60.0, "--ray autoscaling: seconds of low load before an engine is removed", ge=0
    )

    _api_keys = field_validator("api_keys", mode="before")(_words)

    @field_validator("max_lora_rank")
    @classmethod
    def _vllm_rank(cls, value: int) -> int:
        if value not in VLLM_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, VLLM_RANKS))} (vLLM's choices)")
        return value

    @model_validator(mode="after")
    def _together(self) -> GatewaySettings:
        """The rules that hold between settings (each one's own bounds are on its field)."""
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        if self.state_db and not (self.admin_token and self.artifact_store):
            raise ValueError(
                "--state-db: gateways sharing a database need the same --admin-token and an "
                "--artifact-store every one of them reaches (s3://…)"
            )
        return self

    def engine_flags(self, tool_parser: str | None = None, lora: bool = True) -> tuple[str, ...]:
        """vLLM flags of managed engines: the operator's, multi-LoRA for the adapter lane (unless
        `lora` is False: the base's engines cannot run it), and the tool-call parser of the base
        an engine is started on."""
        adapters = tools = ()
        if lora and self.lora_slots and "--enable-lora" not in self.engine_args:
            adapters = (
                "--enable-lora",
                "--max-loras",
                str(self.lora_slots),
                "--max-lora-rank",
                str(self.max_lora_rank),
            )
        if tool_parser and "--tool-call-parser" not in self.engine_args:
            tools = ("--enable-auto-tool-choice", "--tool-call-parser", tool_parser)
        priority = ()
        if self.priority_scheduling and "--scheduling-policy" not in self.engine_args:
            priority = ("--scheduling-policy", "priority")
        return (*self.engine_args, *adapters, *tools, *priority)

    def engine_env(self) -> dict[str, str]:
        """Environment of managed engines: how their workers keep what swaps need (loaders/resident.py)."""
        worker = ResidencyConfig(
            self.swap_residency,
            int(self.delta_cache_mib * 2**20),
            full_swaps=self.swap_mode == "full",
            prepare_bytes=int(self.prepare_mib * 2**20),
        )
        cache = self.artifact_cache()  # one cache on a node: the gateway's and its engines'
        env = worker.to_env() | {CACHE_ENV: str(cache.directory), CACHE_MIB_ENV: str(self.artifact_cache_mib)}
        if self.responses_store:
            env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"
        return env

    def artifact_cache(self) -> NodeCache:
        """This node's cache of stored artifacts (DELTAGATE_ARTIFACT_CACHE, else in the state dir)."""
        return NodeCache.from_env(self.state_dir / "artifact-cache", self.artifact_cache_mib)

    @property
    def store_dir(self) -> Path:
        return self.state_dir / "deltas"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
