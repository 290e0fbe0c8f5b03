"""`deltagate eval`: define an eval and run it on variants through a gateway's evals API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from server.cli.app import app, console, fail, progress_bar


@app.command("eval")
def eval_cmd(
    variant: Annotated[list[str], typer.Option(help="Variant to evaluate (repeat for a paired comparison)")],
    task: Annotated[str | None, typer.Option(help="Built-in task: gsm8k or addition")] = None,
    jsonl: Annotated[Path | None, typer.Option(help="Items as JSONL (with --prompt and --criteria)")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt template over {{item.*}} (JSONL items)")] = None,
    criteria: Annotated[Path | None, typer.Option(help="JSON file: a list of graders (JSONL items)")] = None,
    shots: Annotated[int, typer.Option(help="gsm8k: worked examples in the prompt")] = 5,
    limit: Annotated[int | None, typer.Option(help="Evaluate a seeded sample of this many items")] = None,
    max_tokens: int = 256,
    seed: int = 0,
    concurrency: int = 4,
    url: Annotated[str, typer.Option(help="The gateway")] = "http://127.0.0.1:8000",
    admin_token: Annotated[str | None, typer.Option(envvar="DELTAGATE_ADMIN_TOKEN")] = None,
    state_dir: Annotated[Path, typer.Option(help="Where to read the admin token if not given")] = Path(
        ".deltagate"
    ),
    plot: Annotated[
        Path | None, typer.Option(help="Write a PNG comparing the variants per criterion")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON")] = False,
) -> None:
    """Run an eval on one or more variants and show scores with 95% intervals (and paired differences)."""
    import httpx

    token = admin_token or _stored_token(state_dir)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    body = _eval_body(task, jsonl, prompt, criteria, shots)
    try:
        ev = _call(client.post("/v1/evals", json=body))
        run = _call(
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
    if as_json:
        print(json.dumps(run, indent=2))
    else:
        _print(run)
    if plot:
        plot_run(run, plot)
        console.print(f"wrote {plot}")
    if run["status"] != "completed":
        raise fail(f"run {run['id']} ended {run['status']}: {run['error'] or 'no error recorded'}")


def _stored_token(state_dir: Path) -> str:
    path = state_dir / "admin_token"
    if not path.is_file():
        raise fail(f"no --admin-token and no {path}; pass the gateway's admin token")
    return path.read_text().strip()


def _eval_body(task, jsonl, prompt, criteria, shots) -> dict:
    if (task is None) == (jsonl is None):
        raise fail("give exactly one of --task and --jsonl")
    if task:
        return {"name": task, "data_source": {"type": "builtin", "task": task, "shots": shots}}
    if not prompt or not criteria:
        raise fail("--jsonl needs --prompt and --criteria")
    try:
        graders = json.loads(criteria.read_text())
        content = jsonl.read_text()
    except (OSError, ValueError) as exc:
        raise fail(str(exc)) from None
    return {
        "name": jsonl.stem,
        "data_source": {"type": "jsonl", "content": content},
        "prompt": prompt,
        "testing_criteria": graders,
    }


def _call(resp) -> dict:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise fail(f"HTTP {resp.status_code}: {message}")
    return resp.json()


def _follow(client, eval_id: str, run: dict) -> dict:
    """Poll the run with a progress bar until it ends."""
    with progress_bar() as bar:
        task = bar.add_task(f"eval run {run['id']}", total=run["progress"]["total"])
        while run["status"] in ("queued", "in_progress"):
            time.sleep(1)
            run = _call(client.get(f"/v1/evals/{eval_id}/runs/{run['id']}"))
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
    console.print(table)
    for c in run["comparisons"]:
        console.print(
            f"{c['variant']} − {c['baseline']} ({c['criterion']}, n={c['n']} paired): "
            f"{100 * c['difference']:+.1f} points, 95% [{100 * c['ci95'][0]:+.1f}, "
            f"{100 * c['ci95'][1]:+.1f}]"
        )


def plot_run(run: dict, path: Path) -> None:
    """Bars per criterion and variant, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(run["per_variant"])
    criteria = sorted({c for r in run["per_variant"].values() for c in r["criteria"]})
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(5, 2 + 1.6 * len(criteria) * len(variants) / 2), 4))
    for k, variant in enumerate(variants):
        cs = [run["per_variant"][variant]["criteria"][c] for c in criteria]
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(criteria))]
        scores = [100 * c["score"] for c in cs]
        errors = [  # clipped at 0: a score on its interval's edge may sit a rounding error outside it
            [max(0.0, 100 * (c["score"] - c["ci95"][0])) for c in cs],
            [max(0.0, 100 * (c["ci95"][1] - c["score"])) for c in cs],
        ]
        ax.bar(xs, scores, width, yerr=errors, capsize=3, label=variant)
    ax.set_xticks(range(len(criteria)), criteria)
    ax.set(
        ylabel="score (%) with 95% interval",
        ylim=(0, 100),
        title=f"{run['measured']['task_version']}: n = {run['measured']['item_count']} items",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
