"""Run untrusted Python (HumanEval programs) contained: namespaces, an unprivileged user, rlimits.

Each program runs as `python -I` under `unshare`, in new PID, network and mount namespaces:
- PID namespace: the program is PID 1's child there; when the run ends or times out the whole
  namespace is killed (SIGKILL to the process group; the kernel kills every process left in a PID
  namespace whose init dies), so a fork bomb or a daemonised child cannot outlive it;
- network namespace: only a loopback device that is down; no route anywhere;
- mount namespace: every mount remounted read-only, then fresh size-capped tmpfs on /tmp, /var/tmp
  and /dev/shm, so the only writable places are private and vanish with the run; the program
  starts in an empty dir on that tmpfs;
- an unprivileged user (`nobody`): no capabilities, so it cannot undo the above;
- rlimits: CPU seconds, address space, processes of that user, file size, open files;
- a wall-clock limit enforced from the gateway.
Not contained (say so in docs): reading world-readable files, CPU/memory pressure up to the limits.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

NOBODY = 65534


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    processes: int = 64
    file_bytes: int = 16 << 20
    tmpfs: str = "64m"


@dataclass(frozen=True)
class Outcome:
    """How a program ended: `passed` is exit status 0 within the limits."""

    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    output: str


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (no unshare, or namespaces not permitted)."""


def interpreter() -> str:
    """A Python user `nobody` can run: the system one (a venv under /root is not readable to it)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _command(limits: Limits) -> list[str]:
    inner = " && ".join(
        [
            # every mount read-only (in this namespace only), then private writable tmpfs on top
            "for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do "
            'mount -o remount,bind,ro "$mp" || exit 97; done',
            f"mount -t tmpfs -o size={limits.tmpfs},mode=1777 tmpfs /tmp",
            "{ [ ! -d /var/tmp ] || mount -t tmpfs -o size=1m,mode=1777 tmpfs /var/tmp; }",
            "{ [ ! -d /dev/shm ] || mount -t tmpfs -o size=1m,mode=1777 tmpfs /dev/shm; }",
            f"mkdir /tmp/work && chown {NOBODY}:{NOBODY} /tmp/work && cd /tmp/work",
            "exec "
            + shlex.join(
                [
                    "setpriv",
                    f"--reuid={NOBODY}",
                    f"--regid={NOBODY}",
                    "--clear-groups",
                    "--no-new-privs",
                    "prlimit",
                    f"--cpu={limits.cpu_seconds}",
                    f"--as={limits.memory_bytes}",
                    f"--nproc={limits.processes}",
                    f"--fsize={limits.file_bytes}",
                    "--nofile=64",
                    "--core=0",
                    interpreter(),
                    "-I",
                    "-",
                ]
            ),
        ]
    )
    return ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", "--", "/bin/sh", "-c", inner]


def check_available() -> None:
    """Raise SandboxUnavailable with the reason if programs cannot be contained here."""
    missing = [tool for tool in ("unshare", "setpriv", "prlimit") if shutil.which(tool) is None]
    if missing:
        raise SandboxUnavailable(f"missing tools: {', '.join(missing)} (Debian package util-linux)")
    if os.geteuid() != 0:
        raise SandboxUnavailable("the sandbox needs root to create namespaces and drop to user nobody")
    probe = subprocess.run(
        _command(Limits()), input=b"print('ok')", capture_output=True, timeout=60, check=False
    )
    if probe.returncode != 0 or probe.stdout.strip() != b"ok":
        reason = probe.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SandboxUnavailable(f"namespaces are not permitted here: {reason[0]}")


async def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run `source` contained; never raises for what the program does."""
    proc = await asyncio.create_subprocess_exec(
        *_command(limits),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, killed as one
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(source.encode()), limits.wall_seconds)
    except TimeoutError:
        _kill_group(proc.pid)
        await proc.wait()
        return Outcome(False, "timeout", None, f"killed after {limits.wall_seconds:g} s wall clock")
    finally:
        if proc.returncode is None:  # cancelled: never leave a program behind
            _kill_group(proc.pid)
    tail = out.decode(errors="replace")[-2000:]
    return Outcome(
        proc.returncode == 0, "passed" if proc.returncode == 0 else "failed", proc.returncode, tail
    )


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
