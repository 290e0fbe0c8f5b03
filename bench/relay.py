"""The gateway's own cost on the request path: a mock engine directly vs through deltagate.

    .venv/bin/python bench/relay.py                    # 64 and 256 streams, stream + non-stream, 2 repeats
    .venv/bin/python bench/relay.py --concurrency 64 --repeats 3 --modes stream
    .venv/bin/python bench/relay.py --concurrency 256 --scoped-key   # + a project's key with a limit

The mock engine (loaders/mock_engine.py) streams --tokens-per-second per request and does no
model work, so what differs between the two columns is the relay. `deltagate serve --engine-url`
attaches to that same mock. With --ray, a third target: `deltagate serve --ray --replicas 1
--mock-engine TPS` (a local Ray; the replica hosts a mock engine of its own). Targets alternate
(A B C, then C B A, ...) and the figures are medians over repeats. Streaming load is `vllm bench
serve` (random 32-token prompts, --output-len tokens); non-streaming load is bench/loadgen.py's
client (latency counted as TTFT). With --scoped-key, the gateway runs with an --api-key (its
"gateway" column sends it) and a fourth target, "scoped", sends a project's key scoped to the model
with a requests- and tokens-per-minute limit the run never reaches, and its project one too (docs:
"Share a gateway").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from loadgen import (  # noqa: E402
    nonstream_bench,
    process_cpu_seconds,
    start_gateway,
    start_mock,
    vllm_bench,
)

from loaders.pico import make_pico_base  # noqa: E402

SERVED = "mock"
LEGACY_KEY = "bench-key"  # with --scoped-key: the gateway's --api-key


def run_once(
    url: str, mode: str, concurrency: int, args, tokenizer: Path, out: Path, key: str | None
) -> dict:
    num_prompts = args.requests_per_stream * concurrency
    if mode == "stream":
        # warm-up requests open the client's connections on both sides before the timed part
        r = vllm_bench(
            url,
            SERVED,
            str(tokenizer),
            out,
            num_prompts=num_prompts,
            concurrency=concurrency,
            input_len=32,
            output_len=args.output_len,
            warmups=concurrency,
            api_key=key,
        )
        return {
            "tok_s": r["output_throughput"],
            "ttft_p50": r["median_ttft_ms"],
            "ttft_p99": r["p99_ttft_ms"],
            "failed": r["num_prompts"] - r["completed"],
        }
    r = nonstream_bench(
        url,
        SERVED,
        out,
        num_prompts=num_prompts,
        concurrency=concurrency,
        output_len=args.output_len,
        api_key=key,
    )
    return {
        "tok_s": r["output_throughput"],
        "ttft_p50": r["median_ttft_ms"],
        "ttft_p99": r["p99_ttft_ms"],
        "failed": r["failed"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--modes", nargs="+", default=["stream", "nonstream"], choices=["stream", "nonstream"]
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens-per-second", type=float, default=100.0, help="per stream; 0: no delay")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests = this x concurrency")
    parser.add_argument("--ray", action="store_true", help="also `serve --ray` (local Ray, one mock replica)")
    parser.add_argument(
        "--scoped-key",
        action="store_true",
        help="also through a project's scoped key with an unreached limit",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps logs and JSON (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="deltagate-relay-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    base = make_pico_base(work / "pico") if not (work / "pico" / "config.json").exists() else work / "pico"
    mock = start_mock(SERVED, work, args.tokens_per_second)
    keyed = ["--api-key", LEGACY_KEY] if args.scoped_key else []
    gateway = start_gateway(
        ["--base", f"{SERVED}={base}", "--engine-url", f"{SERVED}={mock.url}", *keyed], work
    )
    services = [mock, gateway]
    rows = []
    try:
        gateway.wait(120)
        # target: (URL, CPU seconds of its engine, CPU seconds of the gateway in front of it, API key)
        targets = {
            "direct": (mock.url, mock.cpu_seconds, lambda: 0.0, None),
            "gateway": (gateway.url, mock.cpu_seconds, gateway.cpu_seconds, LEGACY_KEY if keyed else None),
        }
        if args.scoped_key:
            targets["scoped"] = (gateway.url, mock.cpu_seconds, gateway.cpu_seconds, _scoped_key(gateway.url))
        if args.ray:
            targets["ray"] = _ray_target(base, work, args.tokens_per_second, services)
        for concurrency in args.concurrency:
            for mode in args.modes:
                runs: dict[str, list[dict]] = {t: [] for t in targets}
                for rep in range(args.repeats):
                    order = list(targets) if rep % 2 == 0 else list(reversed(targets))
                    for target in order:
                        url, engine_cpu, gateway_cpu, key = targets[target]
                        out = work / f"{mode}-c{concurrency}-{target}-{rep}.json"
                        before = (engine_cpu(), gateway_cpu())
                        r = run_once(url, mode, concurrency, args, base, out, key)
                        requests = (args.requests_per_stream + 1) * concurrency  # one warm-up per stream
                        r |= cpu_use(before, (engine_cpu(), gateway_cpu()), requests)
                        runs[target].append(r)
                        print(
                            f"  {mode:9s} c={concurrency:<4d} rep {rep + 1}/{args.repeats} {target:7s} "
                            f"{r['tok_s']:8.0f} tok/s  TTFT p50 {r['ttft_p50']:7.1f} ms  "
                            f"p99 {r['ttft_p99']:7.1f} ms  failed {r['failed']}  CPU per request: "
                            f"engine {r['engine_us_per_request']:.0f} µs, gateway "
                            f"{r['gateway_us_per_request']:.0f} µs",
                            flush=True,
                        )
                rows += [summarise(mode, concurrency, t, runs) for t in targets if t != "direct"]
    finally:
        for service in reversed(services):
            service.stop()
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _ray_target(base: Path, work: Path, tokens_per_second: float, services: list) -> tuple:
    """`deltagate serve --ray` with one replica hosting a mock engine: the Ray deployment's path."""
    import httpx

    (work / "ray").mkdir(exist_ok=True)
    ray = start_gateway(
        ["--ray", "--replicas", "1", "--base", f"{SERVED}={base}", "--mock-engine", str(tokens_per_second)],
        work / "ray",
    )
    services.append(ray)
    ray.wait(300)
    auth = {"Authorization": "Bearer bench-admin"}
    engine = httpx.get(ray.url + "/v1/engines", headers=auth, timeout=30).json()["data"][0]
    print(f"ray: gateway {ray.url}, mock engine {engine['id']} at {engine['url']}", flush=True)
    return ray.url, lambda: process_cpu_seconds(engine["pid"]), ray.cpu_seconds, None


def _scoped_key(url: str) -> str:
    """A key of project `bench`, scoped to the served model, with per-minute limits never reached,
    its project's too (each request counts in both windows)."""
    import httpx

    unreached = {"rpm": 10**9, "tpm": 10**12}
    auth = {"Authorization": "Bearer bench-admin"}
    httpx.put(f"{url}/v1/projects/bench/limits", json=unreached, headers=auth, timeout=30).raise_for_status()
    body = {"name": "relay", "models": [SERVED], "limits": unreached}
    r = httpx.post(f"{url}/v1/projects/bench/keys", json=body, headers=auth, timeout=30)
    r.raise_for_status()
    return r.json()["secret"]


def cpu_use(before: tuple, after: tuple, requests: int) -> dict:
    """CPU per request (warm-ups included) of the mock engine and the gateway over one run: what each
    side costs the two cores it shares with the load generator."""
    engine, gateway = (a - b for a, b in zip(after, before, strict=True))
    return {
        "engine_us_per_request": 1e6 * engine / requests,
        "gateway_us_per_request": 1e6 * gateway / requests,
    }


def summarise(mode: str, concurrency: int, target: str, runs: dict[str, list[dict]]) -> dict:
    keys = ("tok_s", "ttft_p50", "ttft_p99", "engine_us_per_request", "gateway_us_per_request")
    med = {t: {k: statistics.median(r[k] for r in rs) for k in keys} for t, rs in runs.items()}
    d, g = med["direct"], med[target]
    return {
        "mode": mode,
        "concurrency": concurrency,
        "target": target,
        "direct": d,
        "gateway": g,
        "throughput_ratio": g["tok_s"] / d["tok_s"],
        "ttft_p50_added_ms": g["ttft_p50"] - d["ttft_p50"],
        "ttft_p99_added_ms": g["ttft_p99"] - d["ttft_p99"],
        "failed": sum(r["failed"] for r in runs["direct"] + runs[target]),
        "runs": runs,
    }


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nrelay overhead, mock engine at {args.tokens_per_second:g} tok/s per stream, "
        f"{args.output_len}-token outputs, medians of {args.repeats} alternating repeats"
    )
    print(
        "| mode | streams | through | direct tok/s | gateway tok/s | ratio | TTFT p50 direct → gateway (ms) "
        "| added p50 | TTFT p99 direct → gateway (ms) | added p99 | failed | engine CPU µs/request "
        "| gateway CPU µs/request |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, g = r["direct"], r["gateway"]
        print(
            f"| {r['mode']} | {r['concurrency']} | {r['target']} | {d['tok_s']:.0f} | {g['tok_s']:.0f} | "
            f"{100 * r['throughput_ratio']:.1f}% | {d['ttft_p50']:.1f} → {g['ttft_p50']:.1f} | "
            f"{r['ttft_p50_added_ms']:+.1f} | {d['ttft_p99']:.1f} → {g['ttft_p99']:.1f} | "
            f"{r['ttft_p99_added_ms']:+.1f} | {r['failed']} | "
            f"{g['engine_us_per_request']:.0f} | {g['gateway_us_per_request']:.0f} |"
        )


if __name__ == "__main__":
    main()
