"""Aliases through a real gateway on a mock engine (fast; the real-engine checks are in
test_aliases_engines.py): the admin API, sticky keys, rollback, errors, metrics, persistence,
and a switch under concurrent load where every answer comes from the variant its header names.

The mock generates one word per token derived from its resident weights, so an answer shows which
variant's weights produced it."""

from __future__ import annotations

import math
import threading
from collections import Counter

import httpx
import pytest

from tests.server.conftest import ADMIN, metric_families, restartable_mock_gateway, sample_value

AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def gateway(tied, tmp_path_factory):
    """(url, restart): a gateway on a mock engine with variants mock-inst (Δ) and mock-half (0.5·Δ)."""
    work = tmp_path_factory.mktemp("aliases")
    half = f"mock-half={tied.delta}:0.5"
    with restartable_mock_gateway(tied, work, "--variant", half) as (url, restart, _):
        yield url, restart


def _put(url: str, name: str, *targets: tuple[str, float]) -> httpx.Response:
    body = {"targets": [{"variant": v, "weight": w} for v, w in targets]}
    return httpx.put(f"{url}/v1/aliases/{name}", json=body, headers=AUTH, timeout=30)


def _ask(url: str, model: str, headers: dict | None = None, **extra) -> tuple[str, str, str]:
    """(model in the answer, X-Deltagate-Variant, the word the weights generated)."""
    body = {"model": model, "prompt": "x", "max_tokens": 1, "temperature": 0, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["model"], r.headers["x-deltagate-variant"], r.json()["choices"][0]["text"].strip()


@pytest.fixture(scope="module")
def tags(gateway) -> dict[str, str]:
    url, _ = gateway
    return {v: _ask(url, v)[2] for v in ("mock", "mock-inst", "mock-half")}


def test_an_alias_serves_its_variant_under_its_own_name_and_is_listed(gateway, tags):
    url, _ = gateway
    r = httpx.post(
        f"{url}/v1/aliases", json={"name": "chat", "targets": [{"variant": "mock-inst"}]}, headers=AUTH
    )
    assert r.status_code == 201, r.text
    assert r.json()["shares"] == {"mock-inst": 1.0} and r.json()["previous"] is None
    assert _ask(url, "chat") == ("chat", "mock-inst", tags["mock-inst"])
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert models["chat"]["alias_of"] == {"mock-inst": 1.0} and models["chat"]["base"] == "mock"
    assert httpx.get(f"{url}/v1/models/chat").json()["alias_of"] == {"mock-inst": 1.0}
    assert "alias_of" not in models["mock-inst"]
    # a direct request names its variant too
    assert _ask(url, "mock-half")[1] == "mock-half"


def test_move_rollback_and_rollback_again(gateway, tags):
    url, _ = gateway
    assert _put(url, "moving", ("mock-inst", 1)).status_code == 200
    r = _put(url, "moving", ("mock-half", 1))
    assert r.json()["previous"] == [{"variant": "mock-inst", "weight": 1.0}] and r.json()["generation"] == 2
    assert _ask(url, "moving")[1:] == ("mock-half", tags["mock-half"])
    r = httpx.post(f"{url}/v1/aliases/moving/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["shares"] == {"mock-inst": 1.0}
    assert _ask(url, "moving")[1:] == ("mock-inst", tags["mock-inst"])
    httpx.post(f"{url}/v1/aliases/moving/rollback", headers=AUTH).raise_for_status()  # redo
    assert _ask(url, "moving")[1] == "mock-half"


def test_sticky_keys_keep_a_client_on_one_target(gateway):
    url, _ = gateway
    assert _put(url, "canary", ("mock-inst", 1), ("mock-half", 1)).status_code == 200
    seen: dict[str, set] = {}
    for k in range(30):
        for _ in range(3):
            seen.setdefault(f"h{k}", set()).add(_ask(url, "canary", {"X-Deltagate-Session": f"h{k}"})[1])
            seen.setdefault(f"u{k}", set()).add(_ask(url, "canary", user=f"u{k}")[1])
    assert all(len(v) == 1 for v in seen.values()), seen
    both = Counter(next(iter(v)) for v in seen.values())
    assert set(both) == {"mock-inst", "mock-half"}, both  # 60 keys over a 50/50 split: both get some
    # Raising the canary's weight only moves keys onto it (rendezvous hashing)
    before = {k: next(iter(v)) for k, v in seen.items() if k.startswith("h")}
    assert _put(url, "canary", ("mock-inst", 1), ("mock-half", 9)).status_code == 200
    after = {k: _ask(url, "canary", {"X-Deltagate-Session": k})[1] for k in before}
    assert all(after[k] == "mock-half" for k, v in before.items() if v == "mock-half")


def test_bad_alias_requests_are_refused_with_the_reason(gateway):
    url, _ = gateway
    r = _put(url, "ghost", ("nope", 1))
    assert r.status_code == 404 and "unknown variant 'nope'" in r.text
    r = _put(url, "mock-inst", ("mock-half", 1))
    assert r.status_code == 409 and "taken by a variant" in r.text
    _put(url, "a1", ("mock-inst", 1)).raise_for_status()
    r = _put(url, "a2", ("a1", 1))
    assert r.status_code == 400 and "is an alias" in r.text
    r = _put(url, "a2", ("mock-inst", 0))
    assert r.status_code == 422
    r = _put(url, "a2", ("mock-inst", 1), ("mock-inst", 2))
    assert r.status_code == 422 and "each target once" in r.text
    body = {"name": "a1", "targets": [{"variant": "mock-half"}]}
    r = httpx.post(f"{url}/v1/aliases", json=body, headers=AUTH)
    assert r.status_code == 409
    r = httpx.post(f"{url}/v1/aliases/fresh/rollback", headers=AUTH)
    assert r.status_code == 404
    assert httpx.post(f"{url}/v1/aliases/a1/rollback", headers=AUTH).status_code == 409  # never moved
    r = httpx.delete(f"{url}/v1/variants/mock-inst", headers=AUTH)
    assert r.status_code == 409 and "move or delete them first" in r.text
    body = {"name": "a1", "base": "mock", "deltas": [{"delta": "x"}]}
    assert httpx.post(f"{url}/v1/variants", json=body, headers=AUTH).status_code in (404, 409)
    assert httpx.put(f"{url}/v1/aliases/a3", json={"targets": []}, headers=AUTH).status_code == 422
    assert httpx.put(f"{url}/v1/aliases/x", json={"targets": [{"variant": "mock"}]}).status_code == 401
    assert httpx.delete(f"{url}/v1/aliases/a1", headers=AUTH).status_code == 204
    assert httpx.get(f"{url}/v1/aliases/a1", headers=AUTH).status_code == 404
    assert httpx.post(f"{url}/v1/completions", json={"model": "a1", "prompt": "x"}).status_code == 404


def test_metrics_count_requests_by_alias_and_target(gateway):
    url, _ = gateway
    _put(url, "counted", ("mock-half", 1)).raise_for_status()
    before = sample_value(metric_families(url), "deltagate_alias_requests_total", alias="counted")
    for _ in range(3):
        _ask(url, "counted")
    families = metric_families(url)
    assert sample_value(families, "deltagate_alias_requests_total", alias="counted") == before + 3
    assert (
        sample_value(
            families,
            "deltagate_alias_requests_total",
            alias="counted",
            variant="mock-half",
            status_class="2xx",
        )
        == before + 3
    )


def test_a_switch_under_load_is_atomic_every_answer_from_the_variant_its_header_names(gateway, tags):
    """8 clients stream requests at an alias while it is moved back and forth 20 times: no error,
    and every answer's words are the weights of the variant its header names."""
    url, _ = gateway
    _put(url, "live", ("mock-inst", 1)).raise_for_status()
    stop, answers, errors = threading.Event(), [], []

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                r = http.post(f"{url}/v1/completions", json={"model": "live", "prompt": "x", "max_tokens": 3})
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                answers.append((r.headers["x-deltagate-variant"], r.json()["choices"][0]["text"].split()))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for k in range(20):
            _put(url, "live", ("mock-half" if k % 2 == 0 else "mock-inst", 1)).raise_for_status()
            threading.Event().wait(0.15)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    served = Counter(v for v, _ in answers)
    assert served["mock-inst"] > 0 and served["mock-half"] > 0, served
    wrong = [(v, words) for v, words in answers if words != [tags[v]] * 3]
    assert not wrong, wrong[:3]


def test_an_unkeyed_split_follows_the_weights(gateway):
    """300 requests over a 3:1 split: the count on the heavier target within 4 binomial sigmas."""
    url, _ = gateway
    _put(url, "split", ("mock-inst", 3), ("mock-half", 1)).raise_for_status()
    n = 300
    counts = Counter(_ask(url, "split")[1] for _ in range(n))
    sigma = math.sqrt(n * 0.75 * 0.25)
    assert abs(counts["mock-inst"] - 0.75 * n) <= 4 * sigma, counts


def test_aliases_survive_a_restart(gateway):
    url, restart = gateway
    _put(url, "kept", ("mock-inst", 1)).raise_for_status()
    _put(url, "kept", ("mock-half", 2)).raise_for_status()
    restart(kill=True)
    alias = httpx.get(f"{url}/v1/aliases/kept", headers=AUTH).json()
    assert alias["targets"] == [{"variant": "mock-half", "weight": 2.0}]
    assert alias["previous"] == [{"variant": "mock-inst", "weight": 1.0}]
    assert _ask(url, "kept")[:2] == ("kept", "mock-half")
