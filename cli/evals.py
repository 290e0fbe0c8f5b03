"""`deltagate eval`: define an eval and run it on variants through a gateway's evals API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.app import StateDir, admin_client, app, call, console, fail, progress_bar, show_result


@app.command("eval")
def eval_cmd(
    variant: Annotated[list[str], typer.Option(help="Variant to evaluate (repeat for a paired comparison)")],
    task: Annotated[
        str | None,
        typer.Option(help="Built-in task: gsm8k, humaneval (server needs --allow-code-execution), addition"),
    ] = None,
    jsonl: Annotated[
        Path | None,
        typer.Option(help="Items as JSONL (with --prompt and --criteria; prompts for --reference)"),
    ] = None,
    perplexity: Annotated[
        str | None, typer.Option(help="Perplexity of a corpus: gsm8k_test, or a JSONL file of {text}")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Fidelity against this variant: token agreement and KL")
    ] = None,
    fidelity_tokens: Annotated[int, typer.Option(help="Fidelity: reference continuation length")] = 32,
    prompt: Annotated[str | None, typer.Option(help="Prompt template over {{item.*}} (JSONL items)")] = None,
    criteria: Annotated[Path | None, typer.Option(help="JSON file: a list of graders (JSONL items)")] = None,
    shots: Annotated[int, typer.Option(help="gsm8k: worked examples in the prompt")] = 5,
    style: Annotated[
        str, typer.Option(help="humaneval: completion (continue the code) or instruct (ask in chat)")
    ] = "completion",
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded sample of this many items")] = None,
    max_tokens: int = 256,
    seed: int = 0,
    concurrency: int = 4,
    url: Annotated[str, typer.Option(help="The gateway")] = "http://127.0.0.1:8000",
    admin_token: Annotated[str | None, typer.Option(envvar="DELTAGATE_ADMIN_TOKEN")] = None,
    state_dir: StateDir = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG comparing the variants per criterion")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON")] = False,
) -> None:
    """Run an eval on one or more variants and show scores with 95% intervals (and paired differences)."""
    import httpx

    client = admin_client(url, admin_token, state_dir)
    body = _eval_body(task, jsonl, prompt, criteria, shots, perplexity, reference, fidelity_tokens)
    if task == "humaneval":
        body["data_source"]["style"] = style
    try:
        ev = call(client.post("/v1/evals", json=body))
        run = call(
            client.post(
                f"/v1/evals/{ev['id']}/runs",
                json={
                    "variants": variant,
                    "limit": limit,
                    "max_tokens": max_tokens,
                    "seed": seed,
                    "concurrency": concurrency,
                },
            )
        )
        run = _follow(client, ev["id"], run)
    except httpx.HTTPError as exc:
        raise fail(f"gateway at {url} unreachable: {exc}") from None
    show_result(run, as_json, _print, plot, plot_run)
    if run["status"] != "completed":
        error = (run["error"] or {}).get("message") or "no error recorded"
        raise fail(f"run {run['id']} ended {run['status']}: {error}")


def _eval_body(task, jsonl, prompt, criteria, shots, perplexity, reference, fidelity_tokens) -> dict:
    """The eval definition the options describe."""
    if sum(x is not None for x in (task, perplexity, reference or jsonl)) != 1:
        raise fail("give exactly one of --task, --perplexity, --reference and --jsonl")
    if task:
        return {"name": task, "data_source": {"type": "builtin", "task": task, "shots": shots}}
    if perplexity:
        if perplexity == "gsm8k_test":
            return {"name": "perplexity", "data_source": {"type": "perplexity", "corpus": perplexity}}
        source = {"type": "perplexity", "content": _read(Path(perplexity))}
        return {"name": f"perplexity-{Path(perplexity).stem}", "data_source": source}
    if reference:
        source = {"type": "fidelity", "reference": reference, "max_tokens": fidelity_tokens}
        if jsonl:
            source["content"] = _read(jsonl)
        return {"name": f"fidelity-vs-{reference}", "data_source": source}
    if not prompt or not criteria:
        raise fail("--jsonl needs --prompt and --criteria")
    try:
        graders = json.loads(_read(criteria))
    except ValueError as exc:
        raise fail(f"{criteria}: {exc}") from None
    return {
        "name": jsonl.stem,
        "data_source": {"type": "jsonl", "content": _read(jsonl)},
        "prompt": prompt,
        "testing_criteria": graders,
    }


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise fail(f"cannot read {path}: {exc.strerror}") from None


def _follow(client, eval_id: str, run: dict) -> dict:
    """Poll the run with a progress bar until it ends."""
    with progress_bar() as bar:
        task = bar.add_task(f"eval run {run['id']}", total=run["progress"]["total"])
        while run["status"] in ("queued", "in_progress"):
            time.sleep(1)
            run = call(client.get(f"/v1/evals/{eval_id}/runs/{run['id']}"))
            bar.update(task, completed=run["progress"]["done"])
    return run


def _print(run: dict) -> None:
    table = Table("variant", "criterion", "score", "95% interval", "n", "errored")
    for variant, result in run["per_variant"].items():
        for name, c in result["criteria"].items():
            table.add_row(
                variant,
                name,
                f"{100 * c['score']:.1f}%",
                f"{100 * c['ci95'][0]:.1f}–{100 * c['ci95'][1]:.1f}%",
                str(c["n"]),
                str(result["errored"]),
            )
    if table.row_count:
        console.print(table)
    metrics = Table("variant", "metric", "value", "95% interval (bootstrap)", "n")
    for variant, result in run["per_variant"].items():
        for name, m in result.get("metrics", {}).items():
            metrics.add_row(
                variant, name, f"{m['value']:.4g}", f"{m['ci95'][0]:.4g}–{m['ci95'][1]:.4g}", str(m["n"])
            )
    if metrics.row_count:
        console.print(metrics)
    rates = set(next(iter(run["per_variant"].values()))["criteria"]) if run["per_variant"] else set()
    for c in run["comparisons"]:
        fmt, scale, unit = ("+.1f", 100, " points") if c["criterion"] in rates else ("+.4g", 1, "")
        lo, hi = (format(scale * x, fmt) for x in c["ci95"])
        console.print(
            f"{c['variant']} − {c['baseline']} ({c['criterion']}, n={c['n']} paired): "
            f"{format(scale * c['difference'], fmt)}{unit}, 95% [{lo}, {hi}]"
        )


def plot_run(run: dict, path: Path) -> None:
    """Bars per criterion and variant, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(run["per_variant"])
    # pass rates in %, or (perplexity, fidelity) the metrics in their own units
    rates = sorted({c for r in run["per_variant"].values() for c in r["criteria"]})
    key, scale = ("criteria", 100) if rates else ("metrics", 1)
    names = rates or sorted({m for r in run["per_variant"].values() for m in r.get("metrics", {})})
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(5, 2 + 1.6 * len(names) * len(variants) / 2), 4))
    for k, variant in enumerate(variants):
        cs = [run["per_variant"][variant][key][c] for c in names]
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(names))]
        values = [scale * c.get("score", c.get("value")) for c in cs]
        errors = [  # clipped at 0: a score on its interval's edge may sit a rounding error outside it
            [max(0.0, v - scale * c["ci95"][0]) for v, c in zip(values, cs, strict=True)],
            [max(0.0, scale * c["ci95"][1] - v) for v, c in zip(values, cs, strict=True)],
        ]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=variant)
    ax.set_xticks(range(len(names)), names)
    ax.set(
        ylabel="score (%) with 95% interval" if rates else "value with 95% interval",
        title=f"{run['measured']['task_version']}: n = {run['measured']['item_count']} items",
    )
    if rates:
        ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
