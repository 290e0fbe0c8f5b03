"""A returning variant's time to first token, with the prefix cache kept across swaps (every request
salted with its weights: `serve --kv-across-swaps`, the default) and reset at every swap
(`--no-kv-across-swaps`), side by side in one run.

    .venv/bin/python bench/kv_across_swaps.py                 # SmolLM2-135M fp32 + its addition delta
    .venv/bin/python bench/kv_across_swaps.py --model pico    # a generated pico model, seconds

Two gateways on the same base and delta (one engine each, used one at a time). Each round asks the
variant, then the base, then the variant again, every request with the same long system prompt
(--prompt-tokens) and its own short question; the figure is the TTFT of the variant coming back
(after a swap away and back), streamed, median over --rounds. Rounds alternate which gateway goes
first. The engine's prefix-cache hits are read from its metrics (through the gateway) to show the
returning variant hit its cached prefix only where the cache was kept, and the base never hit the
variant's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from loadgen import start_gateway  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

MODES = {"kept": "--kv-across-swaps", "reset": "--no-kv-across-swaps"}


def ttft(url: str, model: str, system: str, question: str) -> float:
    """Seconds to the first streamed token of a chat answer."""
    body = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - start
    raise RuntimeError("no token streamed")


def prefix_hits(url: str, base: str) -> float:
    text = httpx.get(f"{url}/metrics/engines/{base}", timeout=30).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples.get("vllm:prefix_cache_hits_total", 0.0)


def system_prompt(url: str, model: str, tokens: int) -> str:
    """A system prompt of about `tokens` tokens (counted by the gateway's tokenizer route)."""
    words = "A weight delta is what fine-tuning added to a base model; deltas add and mix. ".split()
    text = ""
    while True:
        text += " ".join(words) + " "
        count = httpx.post(url + "/tokenize", json={"model": model, "prompt": text}, timeout=60).json()[
            "count"
        ]
        if count >= tokens:
            return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "pico"], default="smollm2")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    if args.model == "smollm2":
        from training.default import prepare_default

        models = prepare_default(args.cache_dir)
    else:
        from loaders.demo import prepare_demo

        models = prepare_demo(args.cache_dir / "demo")
    work = (args.cache_dir / "bench" / "kv_across_swaps").resolve()
    for mode in MODES:
        (work / mode).mkdir(parents=True, exist_ok=True)
    flags = [
        "--base",
        f"base={models.base}",
        "--variant",
        f"variant={models.delta}",
        "--max-model-len",
        "2048",
    ]
    gateways = {mode: start_gateway([*flags, value], work / mode) for mode, value in MODES.items()}
    try:
        for gateway in gateways.values():
            gateway.wait()
        system = system_prompt(gateways["kept"].url, "base", args.prompt_tokens)
        print(
            f"model: {models.base}  delta: {models.delta}  system prompt: {args.prompt_tokens}+ tokens",
            flush=True,
        )
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        hits: dict[str, list[float]] = {mode: [] for mode in MODES}
        for rnd in range(args.rounds):
            order = list(MODES) if rnd % 2 == 0 else list(MODES)[::-1]
            for mode in order:
                url = gateways[mode].url
                ttft(url, "variant", system, f"Round {rnd}: what is 2 + {rnd}?")  # cached under the variant
                before = prefix_hits(url, "base")
                ttft(url, "base", system, f"Round {rnd}: and 3 + {rnd}?")  # a swap away
                base_hits = prefix_hits(url, "base") - before
                back = ttft(url, "variant", system, f"Round {rnd}: and 4 + {rnd}?")  # and back
                times[mode].append(back)
                hits[mode].append(prefix_hits(url, "base") - before - base_hits)
                print(
                    f"  round {rnd} {mode:>5}: returning variant TTFT {back:.3f} s, its prefix-cache hits "
                    f"{hits[mode][-1]:.0f} tokens (the base's in between: {base_hits:.0f})",
                    flush=True,
                )
        print(
            "\n| prefix cache across swaps | returning variant TTFT, median (s) | its cached tokens, median |"
        )
        print("|---|---:|---:|")
        for mode in MODES:
            print(f"| {mode} | {statistics.median(times[mode]):.3f} | {statistics.median(hits[mode]):.0f} |")
        ratio = statistics.median(times["reset"]) / statistics.median(times["kept"])
        print(f"\nreturning variant TTFT, reset / kept: {ratio:.2f}x")
    finally:
        for gateway in gateways.values():
            gateway.stop()


if __name__ == "__main__":
    main()
