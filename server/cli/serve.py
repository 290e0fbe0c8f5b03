"""`deltagate serve` and `deltagate demo`: start engines and the gateway."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from deltas.recipe import RecipeFile
from server.cli.app import app, cli_errors, console, fail
from server.settings import BaseSpec, StartupTerm, StartupVariant


def parse_base(value: str) -> BaseSpec:
    """`DIR` or `NAME=DIR`."""
    name, _, path = value.rpartition("=")
    path = path or value
    return BaseSpec(name=name or Path(path).resolve().name, path=path)


def parse_variant(value: str) -> StartupVariant:
    """`NAME=DELTA[:ALPHA][,DELTA[:ALPHA]]...`; DELTA is a registered name, a file path or an
    artifact-store URI."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise fail(f"--variant {value!r}: expected NAME=DELTA[:ALPHA][,DELTA[:ALPHA]...]")
    terms = []
    for part in rest.split(","):
        ref, colon, alpha = part.rpartition(":")
        if not colon or "/" in alpha:  # no alpha, or that colon was a URI's (s3://…)
            ref, alpha = part, "1.0"
        try:
            terms.append(StartupTerm(ref=ref, alpha=float(alpha)))
        except ValueError:
            raise fail(f"--variant {value!r}: alpha {alpha!r} is not a number") from None
    return StartupVariant(name=name, terms=terms)


def parse_recipe_file(path: Path) -> StartupVariant:
    """A YAML recipe (deltas.recipe.RecipeFile) as a start-up variant named by `name:` or the file."""
    with cli_errors():
        spec = RecipeFile.load(path)

    def ref(delta: str) -> str:  # a registered name, or a path relative to the YAML file
        candidate = path.parent / delta
        return str(candidate) if candidate.exists() else delta

    terms = [StartupTerm(ref=ref(t.delta), alpha=t.parameters.weight, density=t.parameters.density)
             for t in spec.deltas]  # fmt: skip
    return StartupVariant(
        name=spec.name or path.stem,
        terms=terms,
        base=spec.base_model,
        method=spec.merge_method,
        normalize=spec.parameters.normalize,
        seed=spec.seed,
    )


def parse_engine_url(value: str) -> tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep:
        raise fail(f"--engine-url {value!r}: expected BASE_NAME=URL")
    return name, url


def parse_tool_parser(value: str) -> tuple[str, str]:
    """`BASE_NAME=PARSER`, PARSER one of vLLM's tool-call parsers."""
    from loaders.engine import check_tool_parser

    name, sep, parser = value.partition("=")
    if not sep or not name or not parser:
        raise fail(f"--tool-parser {value!r}: expected BASE_NAME=PARSER (e.g. mybase=hermes)")
    try:
        return name, check_tool_parser(parser)
    except ValueError as exc:
        raise fail(f"--tool-parser {value!r}: {exc}") from None


@app.command()
def serve(
    base: Annotated[list[str], typer.Option(help="Base checkpoint: DIR or NAME=DIR (repeatable)")],
    variant: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DELTA[:ALPHA][,DELTA[:ALPHA]...] (repeatable); DELTA: path or name"),
    ] = None,
    recipe: Annotated[
        list[Path] | None,
        typer.Option(help="Variant from a YAML recipe (merge method, weights, densities; repeatable)"),
    ] = None,
    engine_url: Annotated[
        list[str] | None,
        typer.Option(help="Attach BASE_NAME=URL to a running engine instead of starting one"),
    ] = None,
    tool_parser: Annotated[
        list[str] | None,
        typer.Option(
            help="BASE_NAME=PARSER (repeatable): the base's engine parses tool calls with this vLLM "
            "parser (hermes, llama3_json, mistral, ...), so requests with tools and tool_choice 'auto' "
            "work on it and its variants (vLLM's --enable-auto-tool-choice --tool-call-parser)"
        ),
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: Annotated[Path, typer.Option(help="Registry, uploaded deltas, logs")] = Path(".deltagate"),
    state_db: Annotated[
        str | None,
        typer.Option(
            envvar="DELTAGATE_STATE_DB",
            help="A database shared by several gateways for the registry and the evals "
            "(postgresql://user:password@host/db; also from DELTAGATE_STATE_DB, which keeps the password "
            "off the command line). They need the same --admin-token and an --artifact-store all reach. "
            "Default: a SQLite file in the state dir",
        ),
    ] = None,
    state_poll_seconds: Annotated[
        float, typer.Option(help="With --state-db: how often other gateways' changes are read (s)", min=0.1)
    ] = 2.0,
    admin_token: Annotated[str | None, typer.Option(envvar="DELTAGATE_ADMIN_TOKEN")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(envvar="DELTAGATE_API_KEYS", help="Inference key (repeatable)")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Default: from the model config")] = None,
    kv_cache_gib: float = 1.0,
    access_log: Annotated[
        bool, typer.Option(help="Log every HTTP request (costs throughput under load; see bench/relay.py)")
    ] = False,
    allow_code_execution: Annotated[
        bool,
        typer.Option(help="Let evals run model-written code (HumanEval), each program sandboxed; see README"),
    ] = False,
    swap_quantum: Annotated[
        float, typer.Option(help="Seconds a busy variant stays resident while other variants wait", min=0)
    ] = 2.0,
    swap_max_wait: Annotated[
        float, typer.Option(help="Seconds a request may wait for its variant before the quantum ends", min=0)
    ] = 30.0,
    lora_slots: Annotated[
        int,
        typer.Option(
            help="Adapter lane: engines run vLLM multi-LoRA with this many adapters per batch, and variants "
            "whose deltas are all lowrank projections are served as adapters beside the base, no swap "
            "(0: off; attached engines must be started with --enable-lora)",
            min=0,
        ),
    ] = 0,
    max_lora_rank: Annotated[
        int, typer.Option(help="Largest adapter rank (vLLM's --max-lora-rank: 1, 8, 16, 32, 64, ...)")
    ] = 16,
    ray: Annotated[
        bool,
        typer.Option(
            help="Engines on Ray Serve: one deployment per base, one vLLM engine per replica, placed by "
            "Ray on the cluster's nodes; this process serves the same API in front of them (a local "
            "Ray unless --ray-address)"
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option(help="--ray: engine replicas per base (each one vLLM engine)", min=1)
    ] = 2,
    replicas_per_node: Annotated[
        int | None, typer.Option(help="--ray: at most this many engine replicas of a base on one node", min=1)
    ] = None,
    max_replicas: Annotated[
        int | None,
        typer.Option(
            help="--ray: autoscale each base's engines between --replicas and this, by the requests its "
            "engines hold (running + waiting)",
            min=1,
        ),
    ] = None,
    target_requests: Annotated[
        float, typer.Option(help="--ray autoscaling: requests per engine to aim at", min=0.1)
    ] = 8.0,
    scale_down_delay: Annotated[
        float, typer.Option(help="--ray autoscaling: seconds of low load before an engine is removed", min=0)
    ] = 60.0,
    ray_address: Annotated[
        str | None, typer.Option(help="--ray: join this Ray cluster (its GCS address HEAD:6379, or auto)")
    ] = None,
    engine_wait: Annotated[
        float,
        typer.Option(
            help="Seconds a request waits for an engine that is restarting (or, with --ray, for a "
            "replica able to serve it), then 503 with Retry-After",
            min=0,
        ),
    ] = 60.0,
    engine_read_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds an engine may send nothing mid-answer (a long prefill included) before "
            "the relay gives up: 502, or an error event in a stream (0: wait forever); a non-streamed "
            "answer sends nothing until it is complete",
            min=0,
        ),
    ] = 3600.0,
    max_body_bytes: Annotated[
        int, typer.Option(help="Largest request body but an upload; larger gets 413 (0: no limit)", min=0)
    ] = 32 * 2**20,
    max_upload_bytes: Annotated[
        int, typer.Option(help="Largest uploaded artifact; larger gets 413 (0: no limit)", min=0)
    ] = 64 * 2**30,
    upload_idle_seconds: Annotated[
        float, typer.Option(help="An upload sending nothing for this long is dropped with 408", min=0)
    ] = 60.0,
    stream_write_timeout: Annotated[
        float,
        typer.Option(
            help="A stream whose client reads nothing for this long (its writes block) is ended and "
            "its variant's admission released, so it cannot hold off other variants' swaps (0: never)",
            min=0,
        ),
    ] = 60.0,
    swap_residency: Annotated[
        str,
        typer.Option(
            help="Where each engine keeps the base weights swaps merge onto: host (memory; pinned on "
            "GPUs), device (GPU memory: fastest, costs one more copy of the base there) or none "
            "(re-read from the checkpoint at every swap; no extra memory)",
        ),
    ] = "host",
    delta_cache_mib: Annotated[
        float, typer.Option(help="Decoded deltas each engine worker keeps between swaps (MiB)", min=0)
    ] = 1024.0,
    artifact_store: Annotated[
        str | None,
        typer.Option(
            help="Keep every registered delta in this artifact store, by sha256: a directory or an "
            "s3:// URI (any S3-compatible endpoint: AWS_ENDPOINT_URL and the usual AWS_* credentials); "
            "engines read deltas through a verified node-local cache. Default: the state dir",
        ),
    ] = None,
    artifact_cache_mib: Annotated[
        float,
        typer.Option(help="Each node's cache of stored artifacts, evicted LRU (MiB; 0: no budget)", min=0),
    ] = 0.0,
    responses_store: Annotated[
        bool,
        typer.Option(
            help="Engines keep the Responses-API responses they make (vLLM's "
            "VLLM_ENABLE_RESPONSES_API_STORE), so clients can retrieve them and continue them with "
            "previous_response_id, on the engine and variant that made them; kept in the engines' "
            "memory until they restart"
        ),
    ] = False,
    mock_engine: Annotated[
        float | None,
        typer.Option(hidden=True, help="Benchmarks: managed engines are mock engines streaming this tok/s"),
    ] = None,
) -> None:
    """Start engines for the bases and serve the OpenAI-compatible gateway."""
    import uvicorn

    from server.app import create_app, ensure_admin_token
    from server.settings import GatewaySettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bases = [parse_base(b) for b in base]
    urls = dict(parse_engine_url(u) for u in engine_url or [])
    for spec in bases:
        spec.engine_url = urls.pop(spec.name, None)
    if urls:
        raise fail(f"--engine-url names unknown bases {sorted(urls)}")
    parsers = dict(parse_tool_parser(t) for t in tool_parser or [])
    for spec in bases:
        spec.tool_parser = parsers.pop(spec.name, None)
    if parsers:
        raise fail(f"--tool-parser names unknown bases {sorted(parsers)}")
    from server.adapters import VLLM_RANKS

    if swap_residency not in ("host", "device", "none"):
        raise fail(f"--swap-residency {swap_residency!r}: use host, device or none")
    if max_lora_rank not in VLLM_RANKS:
        raise fail(f"--max-lora-rank must be one of {', '.join(map(str, VLLM_RANKS))} (vLLM's choices)")
    if allow_code_execution:
        from server.evals.sandbox import SandboxUnavailable, check_available

        try:
            check_available()
        except SandboxUnavailable as exc:
            raise fail(f"--allow-code-execution: cannot sandbox programs on this machine: {exc}") from None
    if state_db and not (admin_token and artifact_store):
        raise fail("--state-db: gateways sharing a database need the same --admin-token and an "
                   "--artifact-store every one of them reaches (s3://…)")  # fmt: skip
    settings = GatewaySettings(
        state_dir=state_dir,
        state_db=state_db,
        state_poll_seconds=state_poll_seconds,
        admin_token=admin_token,
        api_keys=api_key or [],
        bases=bases,
        variants=[parse_variant(v) for v in variant or []] + [parse_recipe_file(r) for r in recipe or []],
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
        allow_code_execution=allow_code_execution,
        swap_quantum=swap_quantum,
        swap_max_wait=swap_max_wait,
        lora_slots=lora_slots,
        max_lora_rank=max_lora_rank,
        engine_wait=engine_wait,
        engine_read_timeout=engine_read_timeout,
        max_body_bytes=max_body_bytes,
        max_upload_bytes=max_upload_bytes,
        upload_idle_seconds=upload_idle_seconds,
        stream_write_timeout=stream_write_timeout,
        swap_residency=swap_residency,
        delta_cache_mib=delta_cache_mib,
        artifact_store=artifact_store,
        artifact_cache_mib=artifact_cache_mib,
        mock_engine_tps=mock_engine,
        responses_store=responses_store,
    )
    ensure_admin_token(settings)
    if ray:
        from server.cluster.pool import Scaling
        from server.cluster.run import serve_on_ray
        from server.errors import BadRequestError

        if max_replicas is not None and max_replicas < replicas:
            raise fail(f"--max-replicas {max_replicas} is below --replicas {replicas}")
        scaling = Scaling(replicas, max_replicas, target_requests, scale_down_delay, replicas_per_node)
        try:
            serve_on_ray(settings, host, port, scaling, ray_address, access_log=access_log)
        except BadRequestError as exc:
            raise fail(f"--ray: {exc}") from None
        return
    models = [b.name for b in bases] + [v.name for v in settings.variants]
    print(how_to_call(host, port, models, state_dir, bool(settings.api_keys), given=bool(admin_token)))
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=access_log)


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="smollm2 (real model, default) or pico (tiny, instant)")
    ] = "smollm2",
    cache_dir: Annotated[Path, typer.Option(help="Where models and deltas are cached")] = Path(".cache"),
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: Path = Path(".deltagate"),
) -> None:
    """Serve a ready model and a real delta variant of it (first run builds and caches them)."""
    if model == "smollm2":
        from training.default import prepare_default

        models = prepare_default(cache_dir, log=console.print)
        base, variant = f"smollm2={models.base}", f"smollm2-addition={models.delta}"
    elif model == "pico":
        from loaders.demo import prepare_demo

        models = prepare_demo(cache_dir / "demo", log=console.print)
        base, variant = f"pico={models.base}", f"pico-inst={models.delta}"
    else:
        raise fail(f"--model {model!r}: choose smollm2 or pico")
    serve(
        base=[base],
        variant=[variant],
        recipe=None,
        engine_url=None,
        host=host,
        port=port,
        state_dir=state_dir,
        admin_token=None,
        api_key=None,
        max_model_len=None,
        kv_cache_gib=1.0,
        access_log=False,
        allow_code_execution=False,
        swap_quantum=2.0,
        swap_max_wait=30.0,
    )


def how_to_call(host: str, port: int, models: list[str], state_dir: Path, keys: bool, given: bool) -> str:
    """The banner `serve` prints: how to reach each model, with curl and with the openai client."""
    url = f"http://{host}:{port}"
    auth = ' -H "Authorization: Bearer $KEY"' if keys else ""
    lines = [f"deltagate starting on {url} (each engine takes about a minute to start)"]
    for model in models:
        lines += [
            f"model {model}:",
            f"  curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d "
            f'\'{{"model": "{model}", "messages": [{{"role": "user", "content": '
            '"What is the capital of France?"}]}\'',
        ]
    lines += [
        "with the openai client:",
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='x'); "
        f"print(c.chat.completions.create(model='{models[-1]}', messages=[{{'role': 'user', "
        "'content': 'What is 12 + 30?'}]).choices[0].message.content)\"",
        "admin API (/v1/deltas, /v1/variants, /v1/bases): 'Authorization: Bearer <admin token>', "
        + ("the token you gave" if given else f"the token stored in {state_dir / 'admin_token'}"),
    ]
    return "\n".join(lines)
