"""Engines that follow load on Ray: `serve --ray --max-replicas` with mock engines (the mechanics;
tests/server/test_cluster.py serves real vLLM engines on Ray). A local Ray, started by the gateway."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from loaders.engine import free_port
from tests.server.conftest import ADMIN, start_gateway, stop_gateway, wait_healthy

pytestmark = pytest.mark.engine
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
TOKENS_PER_SECOND = 20.0


def _engines(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/engines", headers=HEADERS, timeout=30)
    r.raise_for_status()
    return [e["id"] for e in r.json()["data"]]


def _stream(url: str, model: str, tokens: int, out: list) -> None:
    """One streamed completion; records (status, engine id, chunks with text)."""
    body = {"model": model, "prompt": "x", "max_tokens": tokens, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
        out.append((r.status_code, r.headers.get("x-deltagate-engine"), chunks))


def _word(url: str, model: str) -> tuple[str, str]:
    """(the engine that answered, the mock's word: it names the weights that answered)."""
    body = {"model": model, "prompt": "x", "max_tokens": 1, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-deltagate-engine"], r.json()["choices"][0]["text"]


def test_engines_follow_load_up_and_down_and_a_new_one_serves_every_variant(tied, tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "gateway.log"
    args = ["--ray", "--replicas", "1", "--max-replicas", "2", "--target-requests", "2",
            "--scale-down-delay", "5", "--mock-engine", str(TOKENS_PER_SECOND),
            "--base", f"mock={tied.base}", "--variant", f"mock-inst={tied.delta}"]  # fmt: skip
    proc = start_gateway(args, tmp_path / "state", port, log)
    try:
        wait_healthy(url, proc, log, timeout=300)
        first = _engines(url)
        assert len(first) == 1
        # a variant registered at runtime, before the second engine exists
        r = httpx.post(f"{url}/v1/deltas", json={"name": "d", "path": str(tied.delta)}, headers=HEADERS)
        assert r.status_code == 201, r.text
        body = {"name": "mock-half", "base": "mock", "deltas": [{"delta": "d", "alpha": 0.5}]}
        assert httpx.post(f"{url}/v1/variants", json=body, headers=HEADERS).status_code == 201

        results: list = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                _stream(url, "mock-inst", 40, results)  # 2 s each at 20 tok/s

        threads = [threading.Thread(target=load) for _ in range(6)]  # 6 in flight, target 2 per engine
        for t in threads:
            t.start()
        deadline = time.monotonic() + 180
        while len(_engines(url)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        grown = _engines(url)
        stop.set()
        for t in threads:
            t.join()
        assert len(grown) == 2, grown
        (new,) = set(grown) - set(first)
        # idle engines: each model in turn goes to one not holding it, so both engines serve each
        served: dict[str, set] = {}
        words: dict[str, set] = {}
        for _ in range(3):
            for model in ("mock-half", "mock", "mock-inst"):
                engine, word = _word(url, model)
                served.setdefault(model, set()).add(engine)
                words.setdefault(model, set()).add(word)
        assert all(len(w) == 1 for w in words.values()), words  # the same weights on either engine
        assert len({w for ws in words.values() for w in ws}) == 3  # and different for each model
        assert new in served["mock-half"], served  # a variant registered before the engine started
        # load gone: back to one engine, and requests admitted before the removal still finish
        last: list = []
        tail = [threading.Thread(target=_stream, args=(url, m, 200, last)) for m in ("mock-inst", "mock")]
        for t in tail:
            t.start()
        deadline = time.monotonic() + 120
        while len(_engines(url)) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        for t in tail:
            t.join()
        assert len(_engines(url)) == 1
        assert results and all(status == 200 and chunks == 40 for status, _, chunks in results), results[:5]
        assert [(status, chunks) for status, _, chunks in last] == [(200, 200)] * 2, last
    finally:
        stop_gateway(proc)
