"""The gateway's own cost on the request path: a mock engine directly vs through deltagate.

    .venv/bin/python bench/relay.py                    # 64 and 256 streams, stream + non-stream, 2 repeats
    .venv/bin/python bench/relay.py --concurrency 64 --repeats 3 --modes stream

The mock engine (loaders/mock_engine.py) streams --tokens-per-second per request and does no
model work, so what differs between the two columns is the relay. `deltagate serve --engine-url`
attaches to that same mock. Direct and gateway runs alternate (A B, then B A, ...) and the
figures are medians over repeats. Streaming load is `vllm bench serve` (random 32-token prompts,
--output-len tokens); non-streaming load is bench/loadgen.py's client (latency counted as TTFT).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from loadgen import nonstream_bench, start_gateway, start_mock, vllm_bench  # noqa: E402

from loaders.pico import make_pico_base  # noqa: E402

SERVED = "mock"


def run_once(url: str, mode: str, concurrency: int, args, tokenizer: Path, out: Path) -> dict:
    num_prompts = args.requests_per_stream * concurrency
    if mode == "stream":
        # warm-up requests open the client's connections on both sides before the timed part
        r = vllm_bench(url, SERVED, str(tokenizer), out, num_prompts=num_prompts, concurrency=concurrency,
                       input_len=32, output_len=args.output_len, warmups=concurrency)  # fmt: skip
        return {
            "tok_s": r["output_throughput"],
            "ttft_p50": r["median_ttft_ms"],
            "ttft_p99": r["p99_ttft_ms"],
            "failed": r["num_prompts"] - r["completed"],
        }
    r = nonstream_bench(url, SERVED, out, num_prompts=num_prompts, concurrency=concurrency,
                        output_len=args.output_len)  # fmt: skip
    return {"tok_s": r["output_throughput"], "ttft_p50": r["median_ttft_ms"], "ttft_p99": r["p99_ttft_ms"],
            "failed": r["failed"]}  # fmt: skip


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
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps logs and JSON (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="deltagate-relay-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}", flush=True)
    base = make_pico_base(work / "pico") if not (work / "pico" / "config.json").exists() else work / "pico"
    mock = start_mock(SERVED, work, args.tokens_per_second)
    gateway = start_gateway(["--base", f"{SERVED}={base}", "--engine-url", f"{SERVED}={mock.url}"], work)
    rows = []
    try:
        gateway.wait(120)
        for concurrency in args.concurrency:
            for mode in args.modes:
                runs: dict[str, list[dict]] = {"direct": [], "gateway": []}
                for rep in range(args.repeats):
                    order = ("direct", "gateway") if rep % 2 == 0 else ("gateway", "direct")
                    for target in order:
                        url = mock.url if target == "direct" else gateway.url
                        out = work / f"{mode}-c{concurrency}-{target}-{rep}.json"
                        before = clocks(mock, gateway)
                        r = run_once(url, mode, concurrency, args, base, out)
                        requests = (args.requests_per_stream + 1) * concurrency  # one warm-up per stream
                        r |= cpu_use(before, clocks(mock, gateway), requests)
                        runs[target].append(r)
                        print(f"  {mode:9s} c={concurrency:<4d} rep {rep + 1}/{args.repeats} {target:7s} "
                              f"{r['tok_s']:8.0f} tok/s  TTFT p50 {r['ttft_p50']:7.1f} ms  "
                              f"p99 {r['ttft_p99']:7.1f} ms  failed {r['failed']}  CPU per request: "
                              f"engine {r['engine_us_per_request']:.0f} µs, gateway "
                              f"{r['gateway_us_per_request']:.0f} µs", flush=True)  # fmt: skip
                rows.append(summarise(mode, concurrency, runs))
    finally:
        gateway.stop()
        mock.stop()
    print_table(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def clocks(mock, gateway) -> tuple[float, float]:
    """CPU seconds so far of the mock engine and the gateway."""
    return mock.cpu_seconds(), gateway.cpu_seconds()


def cpu_use(before: tuple, after: tuple, requests: int) -> dict:
    """CPU per request (warm-ups included) of the mock engine and the gateway over one run: what each
    side costs the two cores it shares with the load generator."""
    engine, gateway = (a - b for a, b in zip(after, before, strict=True))
    return {
        "engine_us_per_request": 1e6 * engine / requests,
        "gateway_us_per_request": 1e6 * gateway / requests,
    }


def summarise(mode: str, concurrency: int, runs: dict[str, list[dict]]) -> dict:
    keys = ("tok_s", "ttft_p50", "ttft_p99", "engine_us_per_request", "gateway_us_per_request")
    med = {t: {k: statistics.median(r[k] for r in rs) for k in keys} for t, rs in runs.items()}
    return {"mode": mode, "concurrency": concurrency, "direct": med["direct"], "gateway": med["gateway"],
            "throughput_ratio": med["gateway"]["tok_s"] / med["direct"]["tok_s"],
            "ttft_p50_added_ms": med["gateway"]["ttft_p50"] - med["direct"]["ttft_p50"],
            "ttft_p99_added_ms": med["gateway"]["ttft_p99"] - med["direct"]["ttft_p99"],
            "failed": sum(r["failed"] for rs in runs.values() for r in rs), "runs": runs}  # fmt: skip


def print_table(rows: list[dict], args) -> None:
    print(f"\nrelay overhead, mock engine at {args.tokens_per_second:g} tok/s per stream, "
          f"{args.output_len}-token outputs, medians of {args.repeats} alternating repeats")  # fmt: skip
    print(
        "| mode | streams | direct tok/s | gateway tok/s | ratio | TTFT p50 direct → gateway (ms) "
        "| added p50 | TTFT p99 direct → gateway (ms) | added p99 | failed | engine CPU µs/request "
        "| gateway CPU µs/request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, g = r["direct"], r["gateway"]
        print(f"| {r['mode']} | {r['concurrency']} | {d['tok_s']:.0f} | {g['tok_s']:.0f} | "
              f"{100 * r['throughput_ratio']:.1f}% | {d['ttft_p50']:.1f} → {g['ttft_p50']:.1f} | "
              f"{r['ttft_p50_added_ms']:+.1f} | {d['ttft_p99']:.1f} → {g['ttft_p99']:.1f} | "
              f"{r['ttft_p99_added_ms']:+.1f} | {r['failed']} | "
              f"{g['engine_us_per_request']:.0f} | {g['gateway_us_per_request']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
