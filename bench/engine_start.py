"""What one vLLM engine start costs: wall time to /health and CPU seconds per process (API server,
EngineCore, worker), for a few engine configurations alternated (CONFIGS): as deltagate starts
engines (AOT compile cache off), with the AOT cache on, with --enforce-eager (no torch.compile, no
CUDA graphs), and with the worker inside the EngineCore process (as the test suite runs them).

The test suite's time is mostly engine starts (make test); this is the figure to move. Run on an idle
machine:

    .venv/bin/python bench/engine_start.py [--model DIR] [--repeats 2] [--configs default,inproc-worker]

Without --model a pico checkpoint is generated (loaders/pico.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from loaders.engine import EngineSpec, engine_command, free_port

INPROC = {"VLLM_USE_AOT_COMPILE": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CONFIGS = {  # name -> (environment, extra engine args)
    "default": ({"VLLM_USE_AOT_COMPILE": "0"}, ()),
    "aot": ({"VLLM_USE_AOT_COMPILE": "1"}, ()),
    "eager": ({"VLLM_USE_AOT_COMPILE": "0"}, ("--enforce-eager",)),
    # the worker in the EngineCore process (vLLM's CPU build otherwise spawns a process for it)
    "inproc-worker": (INPROC, ()),
    "inproc-eager": (INPROC, ("--enforce-eager",)),
}


def start_once(model: Path, config: str, log: Path) -> dict:
    """Start stock vLLM on `model` and stop it once healthy: wall seconds and CPU seconds by process."""
    config_env, extra = CONFIGS[config]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **config_env}
    port = free_port()
    spec = EngineSpec(model=str(model), served_name="ref", max_model_len=512, extra_args=extra)
    cmd = engine_command(spec, port, False)
    began = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    leader, cpu, role = psutil.Process(proc.pid), {}, {}
    try:
        while True:
            for p in [leader, *leader.children(recursive=True)]:
                try:
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                    spawned = "spawn_main" in " ".join(p.cmdline())  # EngineCore, its worker
                    role[p.pid] = "api" if p.pid == proc.pid else ("spawned" if spawned else "other")
                except psutil.Error:
                    pass
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"the engine exited; see {log}")
            time.sleep(0.3)
        wall = time.monotonic() - began
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    spawned = sorted((c for pid, c in cpu.items() if role[pid] == "spawned"), reverse=True)
    return {
        "wall": wall,
        "cpu": sum(cpu.values()),
        "api": sum(c for p, c in cpu.items() if role[p] == "api"),
        "spawned": spawned[:2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a checkpoint dir (default: a generated pico model)")
    parser.add_argument("--repeats", type=int, default=2)
    known = ", ".join(CONFIGS)
    parser.add_argument("--configs", default="default,inproc-worker", help=f"comma-separated, of {known}")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {known}")
    work = Path(tempfile.mkdtemp(prefix="engine-start-"))
    model = args.model
    if model is None:
        from loaders.pico import PicoSpec, make_pico_base

        model = make_pico_base(work / "pico", PicoSpec(tie_word_embeddings=True), seed=0)
    start_once(model, "default", log=work / "warm.log")  # fills the compile caches: not counted
    print(f"{'config':13} repeat  wall_s  cpu_s  api_server_cpu_s  engine_core_and_worker_cpu_s", flush=True)
    for repeat in range(args.repeats):
        for config in configs:  # alternated, so drift hits all alike
            r = start_once(model, config, work / f"{config}-{repeat}.log")
            spawned = " ".join(f"{c:.1f}" for c in r["spawned"])
            row = f"{config:13} {repeat:6d}  {r['wall']:6.1f}  {r['cpu']:5.1f}  {r['api']:16.1f}"
            print(f"{row}  {spawned}", flush=True)
    print(f"logs: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
