"""Try every bad input of the catalogue (tests/server/bad_inputs.py) for real, and print the table
docs/troubleshooting.md shows:

    .venv/bin/python -m tests.server.bad_input_runner       # prints the markdown table

Builds pico checkpoints and broken artifacts in a temporary directory, starts a mock engine and a
gateway attached to it (no vLLM: every check here happens in the gateway or the CLI; the engine's
own 400s are relayed as they are), then sends each input.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from tests.server.bad_inputs import ADMIN, CASES, KEY, MAX_BODY, MAX_UPLOAD, Case, Fixtures, make_fixtures


def run_case(case: Case, fx: Fixtures) -> tuple[int, str]:
    """(status or exit code, the message the user sees) for one case."""
    case.setup(fx)
    if case.cli is not None:
        done = subprocess.run([sys.executable, "-m", "cli", *case.cli(fx)], capture_output=True, text=True)
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        return done.returncode, lines[-1] if lines else ""
    kwargs = case.http(fx)
    r = httpx.request(kwargs.pop("method"), fx.url + kwargs.pop("url"), timeout=60, **kwargs)
    try:
        return r.status_code, r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.status_code, r.text


def start(fx: Fixtures) -> tuple[list[subprocess.Popen], str]:
    """A mock engine and a gateway attached to it, with small limits; returns (processes, url)."""
    from loaders.engine import free_port, wait_healthy
    from loaders.mock_engine import mock_engine_command
    from server import launch

    engine_port, port = free_port(), free_port()
    log = open(fx.tmp / "servers.log", "ab")
    mock = subprocess.Popen(
        mock_engine_command(engine_port, "pico", 0),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    gateway = launch.start_gateway(
        port,
        fx.tmp / "state",
        fx.tmp / "servers.log",
        ADMIN,
        "--api-key",
        KEY,
        "--base",
        f"pico={fx.base}",
        "--engine-url",
        f"pico=http://127.0.0.1:{engine_port}",
        "--variant",
        f"inst={fx.delta}",
        "--max-body-bytes",
        str(MAX_BODY),
        "--max-upload-bytes",
        str(MAX_UPLOAD),
    )

    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"http://127.0.0.1:{engine_port}", mock, 60, "mock engine")
    wait_healthy(url, gateway, 120, "gateway", fx.tmp / "servers.log")
    fx.url = url
    return [gateway, mock], url


def run_all(tmp: Path, log=print) -> list[tuple[Case, int, str]]:
    """Every case against a fresh gateway; (case, what came back, message)."""
    import os
    import signal

    fx = make_fixtures(tmp)
    procs, _ = start(fx)
    try:
        rows = []
        for case in CASES:
            status, message = run_case(case, fx)
            rows.append((case, status, message.replace(str(tmp), "<tmp>")))
            log(f"{case.kind:9} {status:4} {case.what}")
        return rows
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)


def to_markdown(rows: list[tuple[Case, int, str]]) -> str:
    lines = ["| kind | input | what the user gets |", "|---|---|---|"]
    for case, status, message in rows:
        shown = message.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")
        got = f"exit {status}" if case.cli else f"HTTP {status}"
        lines.append(f"| {case.kind} | {case.what} | {got}: {shown} |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_all(Path(tmp), log=lambda line: print(line, file=sys.stderr))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
