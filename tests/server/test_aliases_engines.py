"""Aliases through real engines (the stack: pico, tied embeddings): a weighted split measured over
240 requests, sticky keys, and a switch and rollback under concurrent load — every answer the greedy
tokens of stock vLLM on the weights of the variant its X-Deltagate-Variant header names, with the
same logprobs but for batch numerics (conftest.same_batched), and bit-identical one at a time after."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server.conftest import PROMPTS, completion_outputs, completion_params, same_batched

pytestmark = pytest.mark.engine


def _want(stack, variant: str) -> list[dict]:
    return stack.base_before[variant] if variant in stack.base_before else stack.refs[variant]


def _put(stack, name: str, *targets: tuple[str, float]) -> None:
    body = {"targets": [{"variant": v, "weight": w} for v, w in targets]}
    httpx.put(f"{stack.url}/v1/aliases/{name}", json=body, headers=stack.admin).raise_for_status()


def _ask(client: httpx.Client, alias: str, i: int, **extra) -> tuple[str, int, dict, str]:
    """(variant header, prompt index, the answer as completion_outputs records it, model in the body)."""
    k = i % len(PROMPTS)
    r = client.post("/v1/completions", json={**completion_params(alias, PROMPTS[k]), **extra})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    answer = {"text": choice["text"], **choice["logprobs"]}
    answer.pop("text_offset", None)
    return r.headers["x-deltagate-variant"], k, answer, r.json()["model"]


def test_a_weighted_split_is_within_binomial_noise_sticky_per_key_and_exact(stack):
    """3:1 over tied-inst and the untied base (two engines: no swap between them), 8 requests at a
    time: 240 without a key (each an independent weighted draw), then 20 keys (`user`) twice each."""
    _put(stack, "pico-split", ("tied-inst", 3), ("untied", 1))
    with httpx.Client(base_url=stack.url, timeout=300) as client, ThreadPoolExecutor(8) as pool:
        free = list(pool.map(lambda i: _ask(client, "pico-split", i), range(240)))
        keyed = list(pool.map(lambda i: _ask(client, "pico-split", i, user=f"k{i % 20}"), range(40)))
    got = free + keyed
    wrong = [(v, k) for v, k, answer, _ in got if not same_batched(answer, _want(stack, v)[k])]
    assert not wrong, wrong[:5]
    assert {model for *_, model in got} == {"pico-split"}
    n = len(free)
    heavy = sum(v == "tied-inst" for v, *_ in free)
    assert abs(heavy - 0.75 * n) <= 4 * math.sqrt(n * 0.75 * 0.25), Counter(v for v, *_ in free)
    by_key: dict[int, set] = {}
    for i, (v, *_) in enumerate(keyed):
        by_key.setdefault(i % 20, set()).add(v)
    assert all(len(s) == 1 for s in by_key.values()), by_key


def test_switch_and_rollback_under_load_every_answer_exact_for_its_header(stack):
    """6 clients on an alias of the tied engine while it is moved between tied-inst and tied-half and
    rolled back, 6 times: swaps on one engine, and no answer from the weights the header does not name."""
    _put(stack, "pico-live", ("tied-inst", 1))
    stop, got, errors = threading.Event(), [], []

    def client(c: int) -> None:
        with httpx.Client(base_url=stack.url, timeout=300) as http:
            i = c
            while not stop.is_set():
                try:
                    got.append(_ask(http, "pico-live", i))
                except AssertionError as exc:
                    errors.append(str(exc))
                i += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    try:
        for k in range(6):
            time.sleep(1.5)
            if k % 2 == 0:
                _put(stack, "pico-live", ("tied-half", 1))
            else:
                back = httpx.post(f"{stack.url}/v1/aliases/pico-live/rollback", headers=stack.admin)
                back.raise_for_status()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    served = Counter(v for v, *_ in got)
    assert served["tied-inst"] > 0 and served["tied-half"] > 0, served
    wrong = [(v, k) for v, k, answer, _ in got if not same_batched(answer, _want(stack, v)[k])]
    assert not wrong, wrong[:5]
    for variant in ("tied-inst", "tied-half"):  # one at a time, after the switching: bit-identical
        assert completion_outputs(stack.url, variant) == _want(stack, variant)
    r = httpx.get(f"{stack.url}/v1/aliases/pico-live", headers=stack.admin).json()
    assert r["shares"] == {"tied-inst": 1.0} and r["generation"] == 7
    for name in ("pico-live", "pico-split"):
        assert httpx.delete(f"{stack.url}/v1/aliases/{name}", headers=stack.admin).status_code == 204
