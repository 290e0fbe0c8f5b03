"""The typer app every `deltagate` command registers on, and the helpers they share."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="deltagate: serve base + Σ α·Δ weight-delta variants through vLLM.",
    no_args_is_help=True,
    add_completion=False,
)
# soft_wrap: a message keeps only the line breaks its author put there, whatever the terminal
# width (or none, when stderr is a pipe), so logs and tests can match it. Tables still fit the width.
console = Console(stderr=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        from deltas import __version__

        print(f"deltagate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    """deltagate: serve base + Σ α·Δ weight-delta variants through vLLM."""


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; raise the returned Exit (code 2)."""
    console.print("[red]error:[/red] " + escape(message), highlight=False)
    return typer.Exit(code=2)


@contextmanager
def cli_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn the library's expected errors (and `extra`) into a clean CLI error (exit 2)."""
    from deltas import DeltaError

    try:
        yield
    except (DeltaError, OSError, *extra) as exc:
        raise fail(str(exc)) from None


# The admin commands' --state-dir: where a gateway on this machine wrote its admin token.
StateDir = Annotated[
    Path | None,
    typer.Option(
        envvar="DELTAGATE_STATE_DIR",
        help="Where to read the admin token if not given (default: the gateway's, ~/.local/state/deltagate)",
    ),
]


Url = Annotated[str, typer.Option(help="The gateway")]
Token = Annotated[str | None, typer.Option(envvar="DELTAGATE_ADMIN_TOKEN", help="Its admin token")]
GATEWAY = "http://127.0.0.1:8000"


def read_admin_token(state_dir: Path | None) -> str:
    """The admin token a gateway wrote into `state_dir` (default: the gateway's default state dir)."""
    from server.settings import default_state_dir

    path = (state_dir or default_state_dir()) / "admin_token"
    if not path.is_file():
        raise fail(f"no --admin-token and no {path}: pass the gateway's admin token (or its --state-dir)")
    return path.read_text().strip()


@app.command("admin-token")
def admin_token(state_dir: StateDir = None) -> None:
    """Print the admin token of a gateway on this machine (for `Authorization: Bearer …`)."""
    print(read_admin_token(state_dir))


def admin_client(url: str, admin_token: str | None, state_dir: Path | None):
    """An HTTP client on the gateway at `url` with its admin token (given, or read from the state dir)."""
    import httpx

    token = admin_token if admin_token is not None else read_admin_token(state_dir)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def call(resp) -> dict:
    """The JSON of a gateway answer; a CLI error naming the gateway's message for a 4xx/5xx."""
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        raise fail(f"HTTP {resp.status_code}: {message}")
    return resp.json() if resp.content else {}


def show_result(
    result: dict,
    as_json: bool,
    show: Callable[[dict], None],
    plot: Path | None,
    draw: Callable[[dict, Path], None],
) -> None:
    """Print a finished job (as JSON, or with `show`) and, with `plot`, draw it there."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    if plot:
        draw(result, plot)
        console.print(f"wrote {plot}")


def progress_bar() -> Progress:
    """A transient bar: description, bar, done/total, elapsed time."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=console, transient=True)


@contextmanager
def tensor_progress(verb: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient progress bar fed with (tensor name, index, total) callbacks."""
    with progress_bar() as bar:
        task = bar.add_task(verb, total=None)

        def progress(name: str, i: int, total: int) -> None:
            bar.update(task, total=total, completed=i, description=f"{verb} {name}")

        yield progress
