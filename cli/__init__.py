"""The `deltagate` command: serve, demo, extract, compress, inspect, merge, export-lora, fidelity, eval,
alias, rebase, keys."""

from __future__ import annotations

from cli import artifacts, evals, fidelity, keys, rebase, serve  # noqa: F401  (registers the commands)
from cli.app import app


def main() -> None:
    app()
