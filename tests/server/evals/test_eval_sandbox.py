"""The HumanEval sandbox: hostile programs are contained, honest ones pass, the gateway is unharmed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server.evals import sandbox
from server.evals.graders import ProgramPasses
from server.evals.sandbox import Limits, run_program
from server.evals.tasks import humaneval_problems

LIMITS = Limits(wall_seconds=6, cpu_seconds=5)


@pytest.fixture(scope="module", autouse=True)
def _needs_sandbox():
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as exc:  # CI machines are root with namespaces; say so if not
        pytest.fail(f"the sandbox cannot run here: {exc}")


def _nobody_processes() -> list[psutil.Process]:
    """Processes of user nobody left by this test process's sandboxes: its descendants, and orphans
    (adopted by init). Another test process's sandboxes, running meanwhile, are neither."""
    me = os.getpid()

    def ours(p: psutil.Process) -> bool:
        try:
            return p.ppid() == 1 or any(a.pid == me for a in p.parents())
        except psutil.NoSuchProcess:
            return False

    return [
        p
        for p in psutil.process_iter(["uids"])
        if p.info["uids"] and p.info["uids"].real == sandbox.NOBODY and ours(p)
    ]


def hostile(markers: list[Path]) -> dict[str, str]:
    """Programs that try to escape; each names what it would do if it could."""
    writes = "".join(
        f"\ntry:\n    open({str(m)!r}, 'w').write('escaped')\nexcept OSError as e:\n    print(e)\n"
        for m in markers
    )
    return {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",  # noqa: E501
        "allocate 8 GB": "x = bytearray(8 << 30)\nx[-1] = 1\nprint('allocated')\n",
        "open a socket": (
            "import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=3)\nprint('connected')\n"
        ),
        "write outside its dir": writes + "raise SystemExit(1)\n",
        "sleep forever": "import time\ntime.sleep(10**6)\n",
        "daemonise": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10**6)\n"),
        "burn CPU": "while True:\n    pass\n",
    }


async def test_hostile_programs_are_contained_and_the_gateway_keeps_serving(mock_stack, tmp_path):
    """All at once, beside live traffic: none succeeds, none survives, the gateway answers throughout."""
    # world-writable dirs, one in the host's /tmp and one beside the tests: only the sandbox stops the write
    outside = Path(__file__).parent / f".sandbox-{os.getpid()}"
    outside.mkdir()
    markers = [tmp_path / "escaped.txt", outside / "escaped.txt"]
    for d in (tmp_path, outside):
        os.chmod(d, 0o777)
    try:
        await _contained(mock_stack, markers)
    finally:
        for m in markers:
            m.unlink(missing_ok=True)
        outside.rmdir()


async def _contained(mock_stack, markers: list[Path]) -> None:
    programs = hostile(markers)
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=mock_stack.url, timeout=30) as client:

        async def traffic() -> list[int]:
            codes = []
            while time.monotonic() - start < LIMITS.wall_seconds + 1:
                r = await client.post(
                    "/v1/completions", json={"model": "mock-inst", "prompt": "hi", "max_tokens": 4}
                )
                codes.append(r.status_code)
            return codes

        outcomes, codes = await asyncio.gather(
            asyncio.gather(*(run_program(src, LIMITS) for src in programs.values())), traffic()
        )
    elapsed = time.monotonic() - start
    results = dict(zip(programs, outcomes, strict=True))
    for name, outcome in results.items():
        assert not outcome.passed or name == "daemonise", (name, outcome)
        assert "connected" not in outcome.output and "allocated" not in outcome.output, (name, outcome)
    assert results["fork bomb"].status == "timeout"
    assert results["sleep forever"].status == "timeout"
    assert results["burn CPU"].status in ("timeout", "failed")  # wall clock or RLIMIT_CPU, whichever first
    assert "MemoryError" in results["allocate 8 GB"].output
    assert "Network is unreachable" in results["open a socket"].output
    assert not any(m.exists() for m in markers)
    assert results["write outside its dir"].output.count("[Errno") == len(markers), results
    assert elapsed < LIMITS.wall_seconds + 5
    assert codes and set(codes) == {200}, codes
    deadline = time.monotonic() + 5  # the kernel reaps a killed namespace asynchronously
    while _nobody_processes() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _nobody_processes() == []


async def test_writes_land_in_a_private_tmpfs_that_vanishes():
    """/tmp inside the sandbox is its own; the host's /tmp never sees the file."""
    name = f"deltagate-sandbox-{os.getpid()}.txt"
    outcome = await run_program(
        f"import os\nopen('/tmp/{name}', 'w').write('x')\nprint(os.getcwd(), os.listdir('.'), os.getuid())\n",
        LIMITS,
    )
    assert outcome.passed, outcome
    assert outcome.output.split() == ["/tmp/work", "[]", str(sandbox.NOBODY)]
    assert not Path("/tmp", name).exists()


async def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    """HumanEval's own solutions pass all 164 problems in the sandbox; a wrong body fails them."""
    grader, problems = ProgramPasses(name="pass@1"), humaneval_problems()
    assert len(problems) == 164
    gate = asyncio.Semaphore(8)

    async def run(problem: dict, completion: str) -> bool:
        async with gate:
            program = grader.program(problem, {"output_text": completion})
            return (await run_program(program, LIMITS)).passed

    right = await asyncio.gather(*(run(p, p["canonical_solution"]) for p in problems))
    assert all(right), [p["task_id"] for p, ok in zip(problems, right, strict=True) if not ok]
    wrong = await asyncio.gather(*(run(p, "    return None\n") for p in problems[:20]))
    assert not any(wrong)
