"""`deltagate alias` and `deltagate rebase`: public names over variants, and moving a fleet of
variants to an updated base through a gateway's admin API (with progress, a report and a plot)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.app import (
    GATEWAY,
    StateDir,
    Token,
    Url,
    admin_client,
    app,
    call,
    console,
    fail,
    progress_bar,
    show_result,
)

alias_app = typer.Typer(
    help="Aliases: stable model names over one variant or a weighted split.", no_args_is_help=True
)
app.add_typer(alias_app, name="alias")


@alias_app.command("set")
def alias_set(
    name: str,
    targets: Annotated[list[str], typer.Argument(help="VARIANT or VARIANT=WEIGHT, e.g. v1=95 v2=5")],
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
) -> None:
    """Point NAME at one variant, or split it over several (atomic; `rollback` undoes it)."""
    body = {"targets": [_target(t) for t in targets]}
    _show_alias(call(admin_client(url, admin_token, state_dir).put(f"/v1/aliases/{name}", json=body)))


@alias_app.command("rollback")
def alias_rollback(
    name: str, url: Url = GATEWAY, admin_token: Token = None, state_dir: StateDir = None
) -> None:
    """Point NAME back at its targets before the last change."""
    _show_alias(call(admin_client(url, admin_token, state_dir).post(f"/v1/aliases/{name}/rollback")))


@alias_app.command("list")
def alias_list(url: Url = GATEWAY, admin_token: Token = None, state_dir: StateDir = None) -> None:
    """Every alias and its shares."""
    for alias in call(admin_client(url, admin_token, state_dir).get("/v1/aliases"))["data"]:
        _show_alias(alias)


@alias_app.command("delete")
def alias_delete(
    name: str, url: Url = GATEWAY, admin_token: Token = None, state_dir: StateDir = None
) -> None:
    call(admin_client(url, admin_token, state_dir).delete(f"/v1/aliases/{name}"))
    console.print(f"deleted alias {name}")


def _target(text: str) -> dict:
    variant, _, weight = text.partition("=")
    try:
        return {"variant": variant, "weight": float(weight) if weight else 1.0}
    except ValueError:
        raise fail(f"{text!r}: a target is VARIANT or VARIANT=WEIGHT") from None


def _show_alias(alias: dict) -> None:
    shares = ", ".join(f"{v} {100 * s:.1f}%" for v, s in alias["shares"].items())
    print(f"{alias['name']} -> {shares}")


@app.command("rebase")
def rebase_cmd(
    from_base: Annotated[str, typer.Option("--from", help="The base the variants are on (θ)")],
    to_base: Annotated[str, typer.Option("--to", help="The updated base (θ′), registered already")],
    eval_id: Annotated[str, typer.Option("--eval", help="An eval holding its items (POST /v1/evals)")],
    holdout: Annotated[int, typer.Option(help="Items of the held-out split (the gate)")],
    variant: Annotated[list[str] | None, typer.Option(help="A variant of θ (repeat; default: all)")] = None,
    alpha: Annotated[list[float] | None, typer.Option(help="α to try (repeat: a search; default 1)")] = None,
    validation: Annotated[int, typer.Option(help="Items of the validation split (α search)")] = 0,
    criterion: Annotated[str | None, typer.Option(help="Grader or metric of the gate")] = None,
    min_difference: Annotated[
        float | None, typer.Option(help="Gate: paired 95% lower bound of candidate − θ variant ≥ this")
    ] = None,
    min_ratio: Annotated[float | None, typer.Option(help="Gate: candidate ≥ this × θ variant")] = None,
    steps: Annotated[str, typer.Option(help="Canary percentages, e.g. 5,50,100")] = "100",
    hold: Annotated[float, typer.Option(help="Seconds at each canary step")] = 0.0,
    seed: int = 0,
    concurrency: Annotated[int, typer.Option(help="Eval requests in flight")] = 2,
    max_tokens: int = 256,
    url: Url = GATEWAY,
    admin_token: Token = None,
    state_dir: StateDir = None,
    plot: Annotated[Path | None, typer.Option(help="Write the report as a PNG")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rebase as JSON")] = False,
) -> None:
    """Move variants of one base to an updated base: search α, gate each on an eval, promote the
    passing ones by moving their aliases; prints the report (and plots it)."""
    import httpx

    try:
        canary = [float(s) for s in steps.split(",")]
    except ValueError:
        raise fail(f"--steps {steps!r}: comma-separated percentages, e.g. 5,50,100") from None
    gate = {"criterion": criterion, "min_difference": min_difference, "min_ratio": min_ratio}
    body = {
        "from_base": from_base,
        "to_base": to_base,
        "variants": variant or None,
        "eval_id": eval_id,
        "alphas": alpha or [1.0],
        "validation": validation,
        "holdout": holdout,
        "seed": seed,
        "gate": gate,
        "promote": {"steps": canary, "hold_seconds": hold},
        "concurrency": concurrency,
        "max_tokens": max_tokens,
    }
    client = admin_client(url, admin_token, state_dir)
    try:
        job = call(client.post("/v1/rebases", json=body))
        with progress_bar() as bar:
            task = bar.add_task(f"rebase {job['id']}", total=None)
            while job["status"] in ("queued", "in_progress"):
                time.sleep(1)
                job = call(client.get(f"/v1/rebases/{job['id']}"))
                progress = job["progress"]
                bar.update(
                    task,
                    description=f"rebase {job['id']}: {job['report']['phase']}",
                    completed=progress["done"],
                    total=progress["total"] or None,
                )
    except httpx.HTTPError as exc:
        raise fail(f"gateway at {url} unreachable: {exc}") from None
    show_result(job, as_json, print_report, plot, plot_report)
    if job["status"] != "completed":
        raise fail(f"rebase {job['id']} ended {job['status']}: {job['error']}")


def print_report(job: dict) -> None:
    """Per variant: α chosen, held-out scores with intervals, the paired difference, the gate."""
    report = job["report"]
    unit = _unit(report)
    table = Table(
        "variant", "α", f"θ variant ({unit})", "θ′ + α·Δ", "θ′ alone", "difference [95%]", "gate", "promoted"
    )
    for name, entry in report["variants"].items():
        scores, diff = entry["scores"], entry["difference"]
        cells = [_fmt(scores.get(k), report) for k in ("from", "candidate", "to_base")]
        gap = (
            f"{_num(diff['value'], report, sign=True)} [{_num(diff['ci95'][0], report, sign=True)}, "
            f"{_num(diff['ci95'][1], report, sign=True)}]"
            if diff
            else "–"
        )
        verdict = "–" if entry["gate"] is None else ("pass" if entry["gate"]["passed"] else "fail")
        alpha = f"{entry['alpha']:g}" if entry["alpha"] is not None else "–"
        promoted = ", ".join(entry["aliases"]) if entry["promoted"] else "no"
        table.add_row(name, alpha, *cells, gap, verdict, promoted)
    console.print(table)
    for name, entry in report["variants"].items():  # plain lines: never wrapped, for scripts
        verdict = "–" if entry["gate"] is None else ("pass" if entry["gate"]["passed"] else "fail")
        moved = f"aliases {', '.join(entry['aliases'])} moved" if entry["promoted"] else "no alias moved"
        print(f"{name} -> {entry['variant']} (α = {entry['alpha']}): gate {verdict}, {moved}")
        if entry["validation"]:
            tried = ", ".join(f"α={a}: {_fmt(s, report)}" for a, s in entry["validation"].items())
            print(f"{name} validation ({report['criterion']}): {tried}")
        if entry["gate"]:
            print(f"{name} gate: {'; '.join(entry['gate']['reasons'])}")


def _unit(report: dict) -> str:
    return report["criterion"] + ("" if report["lower_is_better"] else ", %")


def _num(value: float, report: dict, sign: bool = False) -> str:
    """Pass rates in percent (points), metrics in their own units."""
    if report["lower_is_better"] or report["criterion"] in ("token_agreement",):
        return format(value, "+.4g" if sign else ".4g")
    return format(100 * value, "+.1f" if sign else ".1f")


def _bars(ax, labels: list[str], scores: list[dict], scale: float) -> None:
    """Bars of scores with their 95% intervals (clipped at 0: a value on its interval's edge)."""
    values = [scale * s["value"] for s in scores]
    lows = [max(0.0, v - scale * s["ci95"][0]) for v, s in zip(values, scores, strict=True)]
    highs = [max(0.0, scale * s["ci95"][1] - v) for v, s in zip(values, scores, strict=True)]
    ax.bar(range(len(values)), values, yerr=[lows, highs], capsize=4)
    ax.set_xticks(range(len(values)), labels, fontsize=8)


def _fmt(score: dict | None, report: dict) -> str:
    if score is None:
        return "–"
    low, high = (_num(x, report) for x in score["ci95"])
    return f"{_num(score['value'], report)} [{low}, {high}]"


def plot_report(job: dict, path: Path) -> None:
    """One row per variant: held-out scores (θ variant, θ′ + α·Δ, θ′) with 95% intervals, and the
    validation score of each α tried (the chosen one highlighted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = job["report"]
    entries = [(n, e) for n, e in report["variants"].items() if e["scores"]]
    if not entries:
        raise fail("the rebase has no held-out scores to plot yet")
    scale = 1 if report["lower_is_better"] or report["criterion"] == "token_agreement" else 100
    unit = f"{report['criterion']}{'' if scale == 1 else ' (%)'} with 95% interval"
    fig, axes = plt.subplots(len(entries), 2, figsize=(10, 4 * len(entries)), squeeze=False)
    for (held, tried), (name, entry) in zip(axes, entries, strict=True):
        labels = {"from": name, "candidate": f"θ′ + {entry['alpha']:g}·Δ", "to_base": "θ′ alone"}
        keys = [k for k in labels if k in entry["scores"]]
        _bars(held, [labels[k] for k in keys], [entry["scores"][k] for k in keys], scale)
        passed = entry["gate"] and entry["gate"]["passed"]
        for bar, color in zip(
            held.patches, ["tab:gray", "tab:green" if passed else "tab:red", "tab:blue"], strict=False
        ):
            bar.set_color(color)
        verdict = "gate passed" if passed else "gate failed"
        held.set(title=f"{name}, held out (n = {entry['scores']['from']['n']}): {verdict}", ylabel=unit)
        alphas = sorted(entry["validation"], key=float)
        if alphas:
            _bars(tried, [f"α = {a}" for a in alphas], [entry["validation"][a] for a in alphas], scale)
            for bar, a in zip(tried.patches, alphas, strict=True):
                bar.set_color("tab:orange" if float(a) == entry["alpha"] else "tab:olive")
            n = entry["validation"][alphas[0]]["n"]
            tried.set(title=f"θ′ + α·Δ, validation (n = {n}): α = {entry['alpha']:g} chosen", ylabel=unit)
        else:
            tried.axis("off")
    request = job["request"]
    fig.suptitle(f"rebase {request['from_base']} → {request['to_base']} ({job['id']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
