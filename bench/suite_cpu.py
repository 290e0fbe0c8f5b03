"""Where a command's CPU time goes, by process kind and by pytest fixture directory: the figure to
move when the test suite is over its time budget (on 2 cores it is CPU-bound, so only less CPU
work makes it shorter).

    .venv/bin/python bench/suite_cpu.py [--interval 2] [--json FILE] -- make fresh-clone-test
    .venv/bin/python bench/suite_cpu.py --from-json FILE     # the report again, from a saved run

Every `--interval` seconds it reads every process that started after it (psutil): its CPU seconds
so far, parent, process group and command line. A process is counted with its last reading, so
one that lived less than an interval is missed; the machine's own busy CPU seconds over the run
are printed beside the accounted total to show how much that is.

Kinds: a vLLM API server, a vLLM EngineCore or worker (processes in an engine's process group),
the gateway (`cli serve`), the mock engine, Ray's processes, pytest, other. Where: the first
`popen-gwN/<dir>` (a pytest-xdist worker's fixture directory) in the command line of the process
or of its nearest ancestor that names one, e.g. `fleet0` (the shared stack and its references),
`real0` (SmolLM2), `cluster0` (the Ray cluster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import psutil

WHERE = re.compile(r"/popen-(gw\d+)/([^/\s]+)")


@dataclass
class Seen:
    pid: int
    ppid: int
    pgid: int
    name: str
    cmdline: str
    cpu_s: float


def _busy(times) -> float:
    return sum(getattr(times, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def sample(seen: dict[tuple[int, float], Seen], before: set[tuple[int, float]]) -> None:
    """Update the reading of every process that started after the run began."""
    for proc in psutil.process_iter(["pid", "ppid", "name", "create_time"]):
        key = (proc.info["pid"], proc.info["create_time"])
        if key in before:
            continue
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                entry = seen.get(key)
                if entry is None:
                    cmdline = " ".join(proc.cmdline())
                    entry = Seen(
                        proc.pid, proc.info["ppid"], os.getpgid(proc.pid), proc.info["name"], cmdline, 0.0
                    )
                    seen[key] = entry
                entry.name = proc.info["name"]  # vLLM renames its processes after they start
                entry.cpu_s = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue


def kind(entry: Seen, by_pid: dict[int, Seen]) -> str:
    """What a process is, from its own command line and its process group leader's."""
    leader = by_pid.get(entry.pgid)
    head = leader.cmdline if leader else entry.cmdline
    if "EngineCore" in entry.name or "VLLM" in entry.name:
        return "vllm enginecore/worker"
    if "vllm.entrypoints" in entry.cmdline:
        return "vllm api server"
    if "vllm.entrypoints" in head:
        return "vllm enginecore/worker"
    if " cli serve" in entry.cmdline or "-m cli " in entry.cmdline:
        return "gateway"
    if "loaders.mock_engine" in entry.cmdline:
        return "mock engine"
    if entry.name.startswith(("ray::", "raylet", "gcs_server")) or "/ray/" in entry.cmdline:
        return "ray"
    if "pytest" in entry.name or any(w in entry.cmdline for w in ("pytest", "xdist", "execnet")):
        return "pytest"  # xdist workers rename themselves "[pytest-xdist running] <test>"
    return "other"


def where(entry: Seen, by_pid: dict[int, Seen]) -> str:
    """The fixture directory of the gateway the process runs under (its state dir), else the first
    one named by the process or an ancestor (a stock engine: its --model); "-" if none."""
    chain, current = [], entry
    while current is not None and len(chain) < 20:
        chain.append(current)
        current = by_pid.get(current.ppid)
    for proc in chain:
        if kind(proc, by_pid) == "gateway" and (match := WHERE.search(proc.cmdline)):
            return match.group(2)
    return next((m.group(2) for proc in chain if (m := WHERE.search(proc.cmdline))), "-")


def report(seen: dict[tuple[int, float], Seen], busy: float, wall: float) -> dict:
    """CPU seconds by kind and by fixture directory, printed as plain tables (one line per row)."""
    by_pid = {e.pid: e for e in seen.values()}
    kinds, places, both, engines = Counter(), Counter(), Counter(), Counter()
    for entry in seen.values():
        k, w = kind(entry, by_pid), where(entry, by_pid)
        kinds[k] += entry.cpu_s
        places[w] += entry.cpu_s
        both[(w, k)] += entry.cpu_s
        engines[w] += k == "vllm api server"
    accounted = sum(kinds.values())
    print(f"wall_s {wall:.0f}  machine_busy_cpu_s {busy:.0f}  accounted_cpu_s {accounted:.0f}")
    print("\nkind                        cpu_s   share")
    for k, s in kinds.most_common():
        print(f"{k:26s} {s:7.0f}  {s / accounted:6.1%}")
    print("\nwhere                       cpu_s   share")
    for w, s in places.most_common(25):
        print(f"{w:26s} {s:7.0f}  {s / accounted:6.1%}")
    print("\nwhere / kind                                          cpu_s")
    for (w, k), s in both.most_common(30):
        print(f"{w + ' / ' + k:50s} {s:7.0f}")
    started = ", ".join(f"{w} {n}" for w, n in engines.most_common() if n)
    print(f"\nvLLM API servers started, by where: {started}")
    return {
        "wall_s": wall,
        "machine_busy_cpu_s": busy,
        "kinds": dict(kinds),
        "where": dict(places),
        "processes": [asdict(e) for e in seen.values()],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--json", help="also write every process's reading here")
    parser.add_argument("--from-json", help="report on a run written with --json instead of running")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            run = json.load(f)
        seen = {(p["pid"], i): Seen(**p) for i, p in enumerate(run["processes"])}
        report(seen, run["machine_busy_cpu_s"], run["wall_s"])
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    before = {(p.pid, p.info["create_time"]) for p in psutil.process_iter(["create_time"])}
    seen: dict[tuple[int, float], Seen] = {}
    start, busy0 = time.monotonic(), _busy(psutil.cpu_times())
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen, before)
        time.sleep(args.interval)
    wall, busy = time.monotonic() - start, _busy(psutil.cpu_times()) - busy0
    print(f"\ncommand exited {proc.returncode}", flush=True)
    result = report(seen, busy, wall)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
