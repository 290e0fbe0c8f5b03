"""`deltagate serve` and `deltagate demo`: start engines and the gateway."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, cli_errors, console, fail
from cli.options import with_settings
from deltas import RecipeFile
from server.settings import BaseSpec, GatewaySettings, StartupTerm, StartupVariant


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

    terms = [
        StartupTerm(ref=ref(t.delta), alpha=t.parameters.weight, density=t.parameters.density)
        for t in spec.deltas
    ]
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
@with_settings
def serve(
    settings: GatewaySettings,
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
    access_log: Annotated[
        bool, typer.Option(help="Log every HTTP request (costs throughput under load; see bench/relay.py)")
    ] = False,
) -> None:
    """Start engines for the bases and serve the OpenAI-compatible gateway."""
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
    settings.bases = bases
    settings.variants = [parse_variant(v) for v in variant or []] + [
        parse_recipe_file(r) for r in recipe or []
    ]
    if not settings.ray:
        run_gateway(settings, host, port, access_log)
        return
    from server.cluster.run import serve_on_ray
    from server.errors import BadRequestError

    check_settings(settings)
    try:
        serve_on_ray(settings, host, port, access_log=access_log)
    except BadRequestError as exc:
        raise fail(f"--ray: {exc}") from None


def check_settings(settings: GatewaySettings) -> None:
    """What only the machine or the combination of flags can tell; then the admin token is ensured."""
    from server.app import ensure_admin_token

    if settings.allow_code_execution:
        from server.evals.sandbox import SandboxUnavailable, check_available

        try:
            check_available()
        except SandboxUnavailable as exc:
            raise fail(f"--allow-code-execution: cannot sandbox programs on this machine: {exc}") from None
    ensure_admin_token(settings)


def run_gateway(settings: GatewaySettings, host: str, port: int, access_log: bool) -> None:
    """Check the settings, print how to call the models, and serve until interrupted."""
    from server.app import serve_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    given = bool(settings.admin_token)
    check_settings(settings)
    models = [b.name for b in settings.bases] + [v.name for v in settings.variants]
    print(how_to_call(host, port, models, settings.state_dir, bool(settings.api_keys), given=given))
    serve_app(settings, host, port, access_log)


@app.command()
@with_settings
def demo(
    settings: GatewaySettings,
    model: Annotated[
        str, typer.Option(help="smollm2 (real model, default) or pico (tiny, instant)")
    ] = "smollm2",
    cache_dir: Annotated[Path, typer.Option(help="Where models and deltas are cached")] = Path(".cache"),
    host: str = "127.0.0.1",
    port: int = 8000,
) -> None:
    """Serve a ready model and a real delta variant of it (first run builds and caches them); every
    `serve` setting applies."""
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
    settings.bases = [parse_base(base)]
    settings.variants = [parse_variant(variant)]
    run_gateway(settings, host, port, access_log=False)


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
