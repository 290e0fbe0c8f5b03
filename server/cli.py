"""The `deltagate` command: serve, extract, inspect, merge."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deltas.errors import DeltaError
from server.settings import BaseSpec, StartupTerm, StartupVariant

app = typer.Typer(
    help="deltagate: serve base + Σ α·Δ weight-delta variants through vLLM.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


def parse_base(value: str) -> BaseSpec:
    """`DIR` or `NAME=DIR`."""
    name, _, path = value.rpartition("=")
    path = path or value
    return BaseSpec(name=name or Path(path).resolve().name, path=path)


def parse_variant(value: str) -> StartupVariant:
    """`NAME=DELTA[:ALPHA][,DELTA[:ALPHA]]...`; DELTA is a registered name or a file path."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise fail(f"--variant {value!r}: expected NAME=DELTA[:ALPHA][,DELTA[:ALPHA]...]")
    terms = []
    for part in rest.split(","):
        ref, colon, alpha = part.rpartition(":")
        if not colon:
            ref, alpha = part, "1.0"
        try:
            terms.append(StartupTerm(ref=ref, alpha=float(alpha)))
        except ValueError:
            raise fail(f"--variant {value!r}: alpha {alpha!r} is not a number") from None
    return StartupVariant(name=name, terms=terms)


def parse_engine_url(value: str) -> tuple[str, str]:
    name, sep, url = value.partition("=")
    if not sep:
        raise fail(f"--engine-url {value!r}: expected BASE_NAME=URL")
    return name, url


@app.command()
def serve(
    base: Annotated[list[str], typer.Option(help="Base checkpoint: DIR or NAME=DIR (repeatable)")],
    variant: Annotated[
        list[str] | None,
        typer.Option(help="NAME=DELTA[:ALPHA][,DELTA[:ALPHA]...] (repeatable); DELTA: path or name"),
    ] = None,
    engine_url: Annotated[
        list[str] | None,
        typer.Option(help="Attach BASE_NAME=URL to a running engine instead of starting one"),
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    state_dir: Annotated[Path, typer.Option(help="Registry, uploaded deltas, logs")] = Path(".deltagate"),
    admin_token: Annotated[str | None, typer.Option(envvar="DELTAGATE_ADMIN_TOKEN")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(envvar="DELTAGATE_API_KEYS", help="Inference key (repeatable)")
    ] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Default: from the model config")] = None,
    kv_cache_gib: float = 1.0,
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
    settings = GatewaySettings(
        state_dir=state_dir,
        admin_token=admin_token,
        api_keys=api_key or [],
        bases=bases,
        variants=[parse_variant(v) for v in variant or []],
        max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib,
    )
    ensure_admin_token(settings)
    models = [b.name for b in bases] + [v.name for v in settings.variants]
    print(how_to_call(host, port, models, state_dir, bool(settings.api_keys), given=bool(admin_token)))
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


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
        engine_url=None,
        host=host,
        port=port,
        state_dir=state_dir,
        admin_token=None,
        api_key=None,
        max_model_len=None,
        kv_cache_gib=1.0,
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


@app.command()
def extract(
    base: Annotated[Path, typer.Option(help="Base checkpoint directory")],
    post: Annotated[Path, typer.Option(help="Post-trained checkpoint directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Artifact file to write")],
) -> None:
    """Extract Δ = post − base into a verified artifact."""
    from deltas.extract import describe, extract_delta

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("extracting", total=None)

            def progress(name: str, i: int, total: int) -> None:
                bar.update(task, total=total, completed=i, description=f"extracting {name}")

            report = extract_delta(base, post, output, progress=progress)
    except (DeltaError, OSError) as exc:
        raise fail(str(exc)) from None
    console.print(
        f"wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, {report.tensors} tensors) in "
        f"{report.seconds:.1f}s; verified base + Δ == post exactly; "
        f"{report.corrections} of {report.elements} elements needed an exact correction"
    )
    print(describe(report))


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Delta artifact file")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
    verify: Annotated[bool, typer.Option(help="Check every checksum and NaN/Inf")] = True,
) -> None:
    """Print an artifact's manifest and per-tensor statistics."""
    from deltas.artifact import open_artifact

    try:
        art = open_artifact(artifact, verify=verify)
    except (DeltaError, OSError) as exc:
        raise fail(str(exc)) from None
    m = art.manifest
    if as_json:
        print(json.dumps(m.model_dump(), indent=2))
        return
    out = Console(width=max(Console().width, 160))  # tensor names must not wrap
    summary = art.summary()
    out.print(
        f"[bold]{artifact}[/bold]  format v{m.format_version}, deltagate {m.tool_version}, {m.created_at}"
    )
    out.print(f"size {summary['size_bytes'] / 1e6:.2f} MB, {len(m.tensors)} tensors, "
              f"{m.total_corrections} exact corrections, verified: {verify}")  # fmt: skip
    for role, ident in (("base", m.base), ("post", m.post)):
        out.print(f"{role}: {ident.architecture} {ident.source}\n  content {ident.content_hash[:16]}… "
                  f"config {ident.config_fingerprint[:16]}…")  # fmt: skip
    out.print(
        f"side files: {', '.join(m.files) or 'none'}; chat template: {'yes' if m.chat_template else 'no'}"
    )
    table = Table("tensor", "shape", "dtype", "enc", "‖Δ‖₂", "max|Δ|", "‖Δ‖/‖θ‖", "corr")
    for t in m.tensors:
        rel = t.delta_l2 / t.base_l2 if t.base_l2 else float("nan")
        table.add_row(t.name, "×".join(map(str, t.shape)), t.dtype, t.encoding, f"{t.delta_l2:.4g}",
                      f"{t.delta_max_abs:.3g}", f"{rel:.3g}", str(t.corrections))  # fmt: skip
    out.print(table)


@app.command()
def merge(
    base: Annotated[Path, typer.Option(help="Base checkpoint directory")],
    delta: Annotated[list[str], typer.Option(help="DELTA_FILE[:ALPHA] (repeatable)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write")],
) -> None:
    """Write base + Σ α·Δ as a standalone checkpoint (the offline reference of a variant)."""
    from deltas.recipe import DeltaTerm, Recipe
    from loaders.merge import check_recipe, write_merged_checkpoint

    terms = []
    for item in delta:
        path, colon, alpha = item.rpartition(":")
        terms.append(DeltaTerm(path=path, alpha=float(alpha)) if colon else DeltaTerm(path=item))
    recipe = Recipe(base=str(base.resolve()), deltas=terms)
    try:
        check_recipe(recipe)
        write_merged_checkpoint(recipe, output)
    except (DeltaError, OSError) as exc:
        raise fail(str(exc)) from None
    console.print(f"wrote {output}")


def main() -> None:
    app()
