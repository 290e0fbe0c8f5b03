"""Evaluate a served model through any OpenAI-compatible endpoint (here: the gateway).

Task score: greedy chat answers to held-out addition problems, exact match.
Perplexity: exp(mean negative log-likelihood) of held-out token windows, from the
engine's prompt logprobs (vLLM's `prompt_logprobs` extension, passed through the gateway).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx

from server.evals.addition import MAX_TOKENS, AdditionExample, score


def task_accuracy(url: str, model: str, examples: list[AdditionExample], workers: int = 8) -> float:
    """Fraction of `examples` answered exactly (greedy), scored as the built-in `addition` eval does."""

    def one(ex: AdditionExample) -> bool:
        body = {"model": model, "messages": ex.messages, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return score(r.json()["choices"][0]["message"]["content"], ex)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, examples))
    return sum(results) / len(results)


def perplexity(url: str, model: str, windows: list[list[int]], workers: int = 4) -> float:
    """Perplexity of token windows (first token of each window is context only)."""

    def one(ids: list[int]) -> tuple[float, int]:
        body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        entries = r.json()["choices"][0]["prompt_logprobs"][1:]
        nll = 0.0
        for tok, entry in zip(ids[1:], entries, strict=True):
            nll -= entry[str(tok)]["logprob"]
        return nll, len(entries)

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(one, windows))
    return math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))
