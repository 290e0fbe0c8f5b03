"""Artifact commands: extract, compress, inspect, merge, export-lora, push."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.app import app, cli_errors, console, fail, tensor_progress

CodecOpt = Annotated[
    str | None,
    typer.Option(
        help="Codec for matrices: dense | int8 | int4[:group=N] | sparse[:density=F] | "
        "dare[:density=F,seed=N] | bitdelta | lowrank[:rank=N]"
    ),
]
CodecRecipeOpt = Annotated[
    Path | None,
    typer.Option(help="YAML codec recipe: default, vectors, rules [{match, codec}], exclude, zstd"),
]
ZstdOpt = Annotated[bool, typer.Option("--zstd", help="Add a lossless zstd layer over every payload")]
SelectOpt = Annotated[
    str | None, typer.Option(help="sparse selection: magnitude (default) or gradient (needs --calib)")
]
CalibOpt = Annotated[
    Path | None,
    typer.Option(help="Calibration JSONL ({'text'} or {'prompt','completion'}) for --select gradient"),
]


def build_plan(codec: str | None, codec_recipe: Path | None, zstd: bool, select: str | None):
    """The CodecPlan from the command-line options (a recipe file, or one codec for all matrices)."""
    from deltas import CodecPlan

    if codec and codec_recipe:
        raise fail("give --codec or --codec-recipe, not both")
    plan = CodecPlan.from_file(codec_recipe) if codec_recipe else CodecPlan.uniform(codec or "dense")
    if zstd:
        plan = plan.model_copy(update={"zstd": True})
    if select:
        if select not in ("magnitude", "gradient"):
            raise fail(f"--select {select!r}: choose magnitude or gradient")
        if not plan.default.startswith("sparse"):
            raise fail("--select applies to the sparse codec: use --codec sparse[:density=F]")
        sep = "," if ":" in plan.default else ":"
        plan = plan.model_copy(update={"default": f"{plan.default}{sep}select={select}"})
        plan = CodecPlan.model_validate(plan.model_dump())  # re-validate the new spec
    return plan


def gradients_for(plan, calib: Path | None, model_dir: Path | None, artifact: Path | None):
    """∇L on the calibration texts if the plan selects by |Δ ⊙ ∇L| (None otherwise)."""
    if not plan.needs_gradients:
        return None
    if calib is None:
        raise fail("select=gradient needs --calib FILE.jsonl")
    from training.importance import calibration_gradients

    console.print(f"computing gradients on {calib} ...")
    return calibration_gradients(model_dir, calib, delta_artifact=artifact)


def report(report, verb: str) -> None:
    from deltas.extract import describe

    quality = (
        "verified base + Δ == post exactly"
        if report.lossless
        else (f"lossy: max per-tensor relative error {report.max_rel_error:.4f}")
    )
    unchanged = f"; {report.unchanged} tensors bit-equal to the base, not stored" if report.unchanged else ""
    console.print(
        f"{verb} {report.path} ({report.size_bytes / 1e6:.2f} MB, {report.tensors} tensors{unchanged}) "
        f"in {report.seconds:.1f}s; {quality}"
    )
    print(describe(report))


@app.command()
def extract(
    base: Annotated[Path, typer.Option(help="Base checkpoint directory")],
    post: Annotated[Path, typer.Option(help="Post-trained checkpoint directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Artifact file to write")],
    codec: CodecOpt = None,
    codec_recipe: CodecRecipeOpt = None,
    zstd: ZstdOpt = False,
    select: SelectOpt = None,
    calib: CalibOpt = None,
) -> None:
    """Extract Δ = post − base into a verified artifact (exact by default)."""
    from deltas import extract_delta

    with cli_errors():
        plan = build_plan(codec, codec_recipe, zstd, select)
        gradients = gradients_for(plan, calib, post, None)
        with tensor_progress("extracting") as progress:
            result = extract_delta(base, post, output, plan=plan, gradients=gradients, progress=progress)
    report(result, "wrote")


@app.command()
def compress(
    source: Annotated[Path, typer.Argument(help="Delta artifact to re-encode (ideally the exact one)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Artifact file to write")],
    codec: CodecOpt = None,
    codec_recipe: CodecRecipeOpt = None,
    zstd: ZstdOpt = False,
    select: SelectOpt = None,
    calib: CalibOpt = None,
    base: Annotated[
        Path | None, typer.Option(help="Base checkpoint for --select gradient (default: the one recorded)")
    ] = None,
) -> None:
    """Re-encode an artifact with other codecs (exact tensors the recipe keeps are copied)."""
    from deltas import compress_artifact, open_artifact

    with cli_errors():
        plan = build_plan(codec, codec_recipe, zstd, select)
        if plan.needs_gradients and base is None:
            base = Path(open_artifact(source).manifest.base.source)
        gradients = gradients_for(plan, calib, base, source)
        with tensor_progress("compressing") as progress:
            result = compress_artifact(source, output, plan, gradients=gradients, progress=progress)
    report(result, "wrote")


@app.command()
def inspect(
    artifact: Annotated[str, typer.Argument(help="Delta artifact file, or its artifact-store URI")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON")] = False,
    verify: Annotated[
        bool, typer.Option(help="Check every checksum, NaN/Inf, and that payloads decode")
    ] = True,
) -> None:
    """Print an artifact's manifest and per-tensor statistics."""
    from deltas import open_artifact

    with cli_errors():
        art = open_artifact(artifact, verify=verify)
    m = art.manifest
    if as_json:
        print(json.dumps(m.model_dump(), indent=2))
        return
    out = Console(width=max(Console().width, 170), soft_wrap=True)  # tensor names must not wrap
    summary = art.summary()
    out.print(
        f"[bold]{artifact}[/bold]  format v{m.format_version}, deltagate {m.tool_version}, {m.created_at}"
    )
    out.print(
        f"size {summary['size_bytes'] / 1e6:.2f} MB, {len(m.tensors)} tensors, "
        f"encodings {', '.join(summary['encodings'])}, lossless: {m.lossless}, "
        f"{m.total_corrections} exact corrections, verified: {verify}"
    )
    for role, ident in (("base", m.base), ("post", m.post)):
        out.print(
            f"{role}: {ident.architecture} {ident.source}\n  content {ident.content_hash[:16]}… "
            f"config {ident.config_fingerprint[:16]}…"
        )
    out.print(
        f"side files: {', '.join(m.files) or 'none'}; chat template: {'yes' if m.chat_template else 'no'}"
    )
    table = Table("tensor", "shape", "dtype", "codec", "‖Δ‖₂", "max|Δ|", "‖Δ‖/‖θ‖", "rel err", "corr")
    for t in m.tensors:
        rel = t.delta_l2 / t.base_l2 if t.base_l2 else float("nan")
        codec = t.encoding + (":" + ",".join(f"{k}={v}" for k, v in t.params.items()) if t.params else "")
        codec += "+zstd" if t.compression == "zstd" else ""
        numbers = (t.delta_l2, t.delta_max_abs, rel, t.rel_error)
        table.add_row(
            t.name,
            "×".join(map(str, t.shape)),
            t.dtype,
            codec,
            *(f"{x:.4g}" for x in numbers),
            str(t.corrections),
        )
    out.print(table)


@app.command()
def merge(
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint directory to write")],
    base: Annotated[Path | None, typer.Option(help="Base checkpoint directory")] = None,
    delta: Annotated[
        list[str] | None, typer.Option(help="DELTA_FILE or store URI[:ALPHA[:DENSITY]] (repeatable)")
    ] = None,
    method: Annotated[str, typer.Option(help="linear | ties | dare_linear | dare_ties")] = "linear",
    normalize: Annotated[
        bool | None, typer.Option(help="Divide by the summed weights (default: per method)")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of dare_* drops")] = 0,
    recipe: Annotated[
        Path | None, typer.Option(help="YAML recipe instead of --base/--delta/--method")
    ] = None,
) -> None:
    """Write a variant's weights as a standalone checkpoint (the offline reference of a variant)."""
    from pydantic import ValidationError

    from deltas import Recipe, RecipeFile
    from loaders.merge import check_recipe, write_merged_checkpoint

    with cli_errors(ValidationError):
        if recipe is not None:
            if delta:
                raise fail("give --recipe or --delta, not both")
            spec = RecipeFile.load(recipe)
            plan = spec.to_recipe(str(base.resolve()) if base else None, relative_to=recipe.parent)
        else:
            if base is None or not delta:
                raise fail("give --base and at least one --delta (or --recipe)")
            terms = [_parse_term(item) for item in delta]
            plan = Recipe(
                base=str(base.resolve()), deltas=terms, method=method, normalize=normalize, seed=seed
            )
        check_recipe(plan)
        with tensor_progress("merging"):
            write_merged_checkpoint(plan, output)
    console.print(f"wrote {output} ({plan.method}, {len(plan.deltas)} deltas)")


def _parse_term(item: str):
    from deltas import DeltaTerm

    scheme, sep, rest = item.rpartition("://")  # an artifact-store URI keeps its own colon
    path, *numbers = rest.split(":")
    path = scheme + sep + path
    try:
        values = [float(x) for x in numbers]
    except ValueError:
        raise fail(f"--delta {item!r}: expected DELTA_FILE[:ALPHA[:DENSITY]]") from None
    if len(values) > 2:
        raise fail(f"--delta {item!r}: expected DELTA_FILE[:ALPHA[:DENSITY]]")
    keys = ["alpha", "density"][: len(values)]
    return DeltaTerm(path=path, **dict(zip(keys, values, strict=True)))


@app.command("export-lora")
def export_lora_cmd(
    artifact: Annotated[Path, typer.Argument(help="Delta artifact (lowrank-encoded, or any with --rank)")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory to write")],
    rank: Annotated[int | None, typer.Option(help="SVD rank for tensors not already lowrank")] = None,
) -> None:
    """Write the delta's projections as a PEFT LoRA adapter for vLLM's multi-LoRA serving."""
    from deltas.lora import export_lora

    with cli_errors():
        result = export_lora(artifact, output, rank=rank)
    console.print(f"wrote {result.path}: rank {result.rank}, {len(result.modules)} modules")
    if result.left_out:
        console.print(
            f"[yellow]left out[/yellow] (vLLM LoRA cannot carry them): {', '.join(result.left_out)} — "
            f"{100 * result.left_out_energy:.1f}% of ‖Δ‖²; serve the full delta through a swap instead"
        )


@app.command()
def push(
    artifact: Annotated[Path, typer.Argument(help="Delta artifact file")],
    store: Annotated[str, typer.Option(help="Artifact store: a directory or s3://bucket/prefix")],
) -> None:
    """Verify an artifact and put it into an artifact store; prints its URI (for --variant NAME=URI)."""
    from deltas import ArtifactStore, open_artifact

    with cli_errors():
        open_artifact(artifact, verify=True)
        stored = ArtifactStore(store).put(artifact)
    print(stored.uri)
