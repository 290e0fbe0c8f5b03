"""`deltagate serve` as a child process: the one way the tests, the benchmarks and the reports start
a gateway (its command line) and stop it (SIGINT to its process group: uvicorn shuts down and the
lifespan stops the engines it started)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def gateway_command(port: int, state_dir: Path, admin_token: str, *args: str) -> list[str]:
    """The command line of a gateway on loopback `port` with its state in `state_dir`."""
    return [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        "--admin-token",
        admin_token,
        *args,
    ]


def start_gateway(
    port: int, state_dir: Path, log: Path, admin_token: str, *args: str, env: dict | None = None, **popen
) -> subprocess.Popen:
    """Start a gateway in a process group of its own, its output appended to `log`."""
    return subprocess.Popen(
        gateway_command(port, state_dir, admin_token, *args),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


def stop_gateway(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Stop it gracefully (its engines too); kill the group if it does not stop in `timeout`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
