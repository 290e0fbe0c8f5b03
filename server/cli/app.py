"""The typer app every `deltagate` command registers on, and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


def fail(message: str) -> typer.Exit:
    """Print `message` as an error; raise the returned Exit (code 2)."""
    console.print("[red]error:[/red] " + escape(message), highlight=False)
    return typer.Exit(code=2)


@contextmanager
def cli_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn the library's expected errors (and `extra`) into a clean CLI error (exit 2)."""
    from deltas.errors import DeltaError

    try:
        yield
    except (DeltaError, OSError, *extra) as exc:
        raise fail(str(exc)) from None


def progress_bar() -> Progress:
    """A transient bar: description, bar, done/total, elapsed time."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())  # fmt: skip
    return Progress(*columns, console=console, transient=True)


@contextmanager
def tensor_progress(verb: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient progress bar fed with (tensor name, index, total) callbacks."""
    with progress_bar() as bar:
        task = bar.add_task(verb, total=None)

        def progress(name: str, i: int, total: int) -> None:
            bar.update(task, total=total, completed=i, description=f"{verb} {name}")

        yield progress
