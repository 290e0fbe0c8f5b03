"""What the load benchmarks share: start a mock engine or a gateway, and drive load at a URL.

Streaming load is vLLM's own generator (`vllm bench serve`, through bench/vllm_bench.py, in a
process of its own so the client does not share an interpreter with anything measured). It has no
non-streaming mode, so `nonstream` is a small aiohttp client of ours (run as
`python bench/loadgen.py nonstream ...`, also in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loaders.engine import EngineError, free_port, wait_healthy  # noqa: E402
from loaders.mock_engine import mock_engine_command  # noqa: E402
from server.launch import gateway_command  # noqa: E402

PY = sys.executable


@dataclass
class Service:
    """A process serving HTTP on loopback."""

    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float = 900) -> Service:
        try:
            wait_healthy(self.url, self.proc, timeout, self.name, self.log)
        except EngineError as exc:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise SystemExit(f"{exc}\n{tail}") from None
        return self

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the process has used so far."""
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(name: str, cmd: list[str], port: int, log: Path) -> Service:
    proc = subprocess.Popen(
        cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
    )
    return Service(name, f"http://127.0.0.1:{port}", proc, log)


def start_mock(served_name: str, work: Path, tokens_per_second: float, swap_seconds: float = 0.0) -> Service:
    """A mock engine (loaders/mock_engine.py) on a free loopback port."""
    port = free_port()
    cmd = mock_engine_command(port, served_name, tokens_per_second, swap_seconds)
    return _spawn("mock engine", cmd, port, work / "mock-engine.log").wait(60)


def start_gateway(args: list[str], work: Path, admin_token: str = "bench-admin") -> Service:
    """`deltagate serve ARGS` on a free port with a state dir under `work`."""
    port = free_port()
    cmd = gateway_command(port, work / "state", admin_token, *args)
    return _spawn("gateway", cmd, port, work / "gateway.log")


def _all_cpus() -> None:
    """In the load client before exec: every core, and a little more priority than the engine.

    Beside a busy CPU engine (bench/load.py --scenarios eval) the client was seen with the mask of
    the one core vLLM's worker threads are bound to, runnable but starved for minutes. This rules
    out the mask and the priority; the stall was seen again with both set (README, not solved)."""
    os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        os.nice(-5)
    except PermissionError:  # not root: the mask alone
        pass


def vllm_bench(
    url: str,
    model: str,
    tokenizer: str,
    out: Path,
    *,
    num_prompts: int,
    concurrency: int | None,
    output_len: int,
    input_len: int = 32,
    prompts: Path | None = None,
    request_rate: float = float("inf"),
    models: list[str] | None = None,
    seed: int = 0,
    warmups: int = 0,
    api_key: str | None = None,
) -> dict:
    """Run `vllm bench serve` (ignore_eos, greedy) and return its detailed result.

    Prompts: random ones of `input_len` tokens, or the `prompts` JSONL file ({"prompt"} per line,
    sent as written and in order). `models`: the model name of each request in order (vLLM's
    `--lora-modules` with round-robin assignment over a list as long as the run is exactly that
    schedule). `api_key`: sent as `Authorization: Bearer` (vLLM's bench reads OPENAI_API_KEY).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    if prompts is None:
        dataset = [
            "--dataset-name",
            "random",
            "--random-input-len",
            str(input_len),
            "--random-output-len",
            str(output_len),
        ]
    else:
        dataset = [
            "--dataset-name",
            "custom",
            "--dataset-path",
            str(prompts),
            "--custom-output-len",
            str(output_len),
            "--skip-chat-template",
            "--disable-shuffle",
        ]
    cmd = [
        PY,
        str(ROOT / "bench" / "vllm_bench.py"),
        "--backend",
        "openai",
        "--base-url",
        url,
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        *dataset,
        "--num-prompts",
        str(num_prompts),
        "--request-rate",
        str(request_rate),
        "--seed",
        str(seed),
        "--ignore-eos",
        "--temperature",
        "0",
        "--disable-tqdm",
        "--num-warmups",
        str(warmups),
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(out.parent),
        "--result-filename",
        out.name,
    ]
    if concurrency:
        cmd += ["--max-concurrency", str(concurrency)]
    if models:
        cmd += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    out.unlink(missing_ok=True)
    env = {**os.environ, "OPENAI_API_KEY": api_key} if api_key else None
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, preexec_fn=_all_cpus, env=env)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(
            f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def nonstream_bench(
    url: str,
    model: str,
    out: Path,
    *,
    num_prompts: int,
    concurrency: int,
    output_len: int,
    api_key: str | None = None,
) -> dict:
    """Non-streaming completions at fixed concurrency, in a process of its own (`api_key`: sent as
    `Authorization: Bearer`, through OPENAI_API_KEY)."""
    cmd = [
        PY,
        __file__,
        "nonstream",
        "--url",
        url,
        "--model",
        model,
        "--num-prompts",
        str(num_prompts),
        "--concurrency",
        str(concurrency),
        "--output-len",
        str(output_len),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OPENAI_API_KEY": api_key} if api_key else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"non-streaming client failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


async def _nonstream(url: str, model: str, num_prompts: int, concurrency: int, output_len: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    tokens = failed = 0
    queue = list(range(num_prompts))
    body = {
        "model": model,
        "prompt": "hello " * 32,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
    }

    async def warmup(session: aiohttp.ClientSession) -> None:  # one request per connection, untimed
        async with session.post(url + "/v1/completions", json=body) as resp:
            await resp.read()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, failed
        while queue:
            queue.pop()
            start = time.perf_counter()
            async with session.post(url + "/v1/completions", json=body) as resp:
                data = await resp.json()
            if resp.status != 200:
                failed += 1
                continue
            latencies.append(time.perf_counter() - start)
            tokens += data["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=concurrency)
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else None
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as s:
        await asyncio.gather(*(warmup(s) for _ in range(concurrency)))
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "completed": len(latencies),
        "failed": failed,
        "duration": duration,
        "output_throughput": tokens / duration,
        "median_ttft_ms": 1000 * statistics.median(latencies),
        "p99_ttft_ms": 1000 * q[98],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    ns = sub.add_parser("nonstream", help="non-streaming load (latency reported as TTFT)")
    ns.add_argument("--url", required=True)
    ns.add_argument("--model", required=True)
    ns.add_argument("--num-prompts", type=int, default=512)
    ns.add_argument("--concurrency", type=int, default=64)
    ns.add_argument("--output-len", type=int, default=64)
    ns.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = asyncio.run(
        _nonstream(args.url, args.model, args.num_prompts, args.concurrency, args.output_len)
    )
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
