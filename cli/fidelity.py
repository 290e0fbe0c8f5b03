"""`deltagate fidelity`: what a compressed artifact costs against its exact original."""

from __future__ import annotations

import asyncio
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.app import app, cli_errors, console, fail
from loaders.engine import EngineError


def load_prompts(path: Path) -> list[str]:
    """Prompts from JSONL ({"prompt"} or {"text"} per line)."""
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if "prompt" in row else row["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise fail(f'{path}:{i}: expected a JSON object with "prompt" or "text"') from None
    if not prompts:
        raise fail(f"{path}: no prompts")
    return prompts


@app.command()
def fidelity(
    compressed: Annotated[Path, typer.Argument(help="Compressed delta artifact")],
    reference: Annotated[Path, typer.Option(help="The exact artifact it was made from")],
    base: Annotated[
        Path | None, typer.Option(help="Base checkpoint (default: the one the manifest names)")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="JSONL prompt set (default: 16 built-in prompts)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt compared")] = 32,
    task: Annotated[str, typer.Option(help="Task score too: addition | none")] = "none",
    task_examples: Annotated[int, typer.Option(help="Held-out examples for --task")] = 60,
    served: Annotated[bool, typer.Option(help="Measure on a served model (starts a vLLM engine)")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON")] = False,
    worst: Annotated[int, typer.Option(help="Tensors listed (largest error first)")] = 10,
) -> None:
    """Per-tensor relative error, then greedy token agreement, KL and task score on a served model."""
    from deltas import open_artifact
    from loaders import fidelity as fid

    if task not in ("addition", "none"):
        raise fail(f"--task {task!r}: choose addition or none")
    with cli_errors():
        comp, ref = open_artifact(compressed, verify=True), open_artifact(reference, verify=True)
        errors = fid.tensor_errors(comp, ref)
    result = {"tensors": [asdict(e) for e in errors], "served": None}
    if served:
        base_dir = base or Path(ref.manifest.base.source)
        if not (base_dir / "config.json").is_file():
            raise fail(f"base checkpoint {base_dir} not found; pass --base DIR")
        prompt_set = load_prompts(prompts) if prompts else list(fid.DEFAULT_PROMPTS)
        scorer = _task_scorer(task_examples) if task == "addition" else None
        logs = Path(tempfile.mkdtemp(prefix="deltagate-fidelity-"))
        console.print(f"starting a vLLM engine on {base_dir} (log: {logs}) ...")
        try:
            engine = fid.start_engine(str(base_dir.resolve()), logs)
        except EngineError as exc:
            raise fail(f"{exc} (log: {logs / 'fidelity-engine.log'})") from None
        try:
            measured = asyncio.run(
                fid.measure_served(
                    engine.url,
                    "fidelity",
                    str(base_dir.resolve()),
                    reference.resolve(),
                    compressed.resolve(),
                    prompt_set,
                    max_tokens,
                    scorer,
                )
            )
        finally:
            engine.stop()
        result["served"] = asdict(measured)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print(errors, result["served"], worst)


def _task_scorer(n: int):
    from server.evals.addition import addition_split
    from training.evaluate import task_accuracy

    examples = addition_split(n, seed=1234, held_out=True)
    return lambda url, model: task_accuracy(url, model, examples)


def _print(errors, served: dict | None, worst: int) -> None:
    table = Table("tensor", "codec", "relative error ‖Δc − Δ‖/‖Δ‖")
    for e in sorted(errors, key=lambda e: -e.rel_error)[:worst]:
        table.add_row(e.name, e.encoding, f"{e.rel_error:.4g}")
    console.print(table)
    rel = [e.rel_error for e in errors]
    console.print(f"{len(errors)} tensors: mean relative error {sum(rel) / len(rel):.4g}, max {max(rel):.4g}")
    if served:
        console.print(
            f"served, {served['positions']} positions: greedy token agreement "
            f"{100 * served['agreement']:.2f}%, mean KL(exact ‖ compressed) {served['mean_kl']:.3g} nats"
        )
        if served["task_score"] is not None:
            console.print(
                f"task score: exact {100 * served['reference_task_score']:.1f}%, "
                f"compressed {100 * served['task_score']:.1f}%"
            )
