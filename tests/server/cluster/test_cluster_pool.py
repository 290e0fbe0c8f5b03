"""Ray's control plane with mock engines (the mechanics; tests/server/cluster/test_cluster.py serves real vLLM
engines on Ray): engines that follow load (`--max-replicas`), a base that gets a deployment of its
own, a second gateway sharing the cluster and the state. A local Ray, started by each gateway."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from loaders.engine import free_port
from loaders.pico import PicoSpec, make_pico_base
from tests.server.conftest import ADMIN, start_gateway, stop_gateway, wait_healthy

pytestmark = pytest.mark.engine
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
TOKENS_PER_SECOND = 20.0


@pytest.fixture(autouse=True)
def _a_ray_of_its_own(monkeypatch):
    """Each test's Ray in a temp dir of its own (RAY_TMPDIR, inherited by the gateways): `ray.init()`
    and `--ray-address auto` find the cluster started last through that dir, and another test
    process may be running a Ray cluster of its own (make test runs two). Short: Ray's socket paths
    must stay under 108 characters."""
    import shutil
    import tempfile

    root = tempfile.mkdtemp(prefix="dg-ray-")
    monkeypatch.setenv("RAY_TMPDIR", root)
    yield
    shutil.rmtree(root, ignore_errors=True)


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
    args = [
        "--ray",
        "--replicas",
        "1",
        "--max-replicas",
        "2",
        "--target-requests",
        "2",
        "--scale-down-delay",
        "5",
        "--mock-engine",
        str(TOKENS_PER_SECOND),
        "--base",
        f"mock={tied.base}",
        "--variant",
        f"mock-inst={tied.delta}",
    ]
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


def test_a_base_of_another_architecture_gets_a_deployment_of_its_own(tied, tmp_path, postgres, s3_server):
    """Several bases on one cluster: a runtime base no running engine fits gets a Ray application of
    its own (its own replicas); deleting it deletes the application and stops its engines. A second
    gateway on the cluster and the state (PostgreSQL, S3) gets engines of its own."""
    wide = make_pico_base(tmp_path / "wide", PicoSpec(intermediate_size=384), seed=7)
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "gateway.log"
    shared = [
        "--state-db",
        postgres.database("ray_pool"),
        "--state-poll-seconds",
        "0.5",
        "--artifact-store",
        f"s3://{s3_server.bucket}/ray-pool",
    ]
    args = ["--ray", "--replicas", "1", "--mock-engine", "0", "--base", f"mock={tied.base}", *shared]
    proc = start_gateway(args, tmp_path / "state", port, log)
    try:
        wait_healthy(url, proc, log, timeout=300)
        body = {"name": "wide", "path": str(wide)}
        r = httpx.post(f"{url}/v1/bases", json=body, headers=HEADERS, timeout=60)
        assert r.status_code == 201 and r.json()["group"] == "wide", r.text  # an engine of its own
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/v1/bases/wide", headers=HEADERS).json()["state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.5)
        engines = httpx.get(f"{url}/v1/engines", headers=HEADERS).json()["data"]
        assert sorted(e["base"] for e in engines) == ["mock", "wide"]
        wide_engine, word = _word(url, "wide")
        assert wide_engine.startswith("wide@") and word.strip() == "wbase"  # its plain base
        assert _word(url, "mock")[0].startswith("mock@")
        _a_second_gateway_has_engines_of_its_own(tied, tmp_path, url, shared)
        _kill_the_directory(url, {e["id"] for e in engines})
        pid = next(e["pid"] for e in engines if e["base"] == "wide")
        assert httpx.delete(f"{url}/v1/bases/wide", headers=HEADERS, timeout=120).status_code == 204
        assert [e["base"] for e in httpx.get(f"{url}/v1/engines", headers=HEADERS).json()["data"]] == ["mock"]
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(pid)  # its replica went, and its engine with it
        r = httpx.post(f"{url}/v1/completions", json={"model": "wide", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404
    finally:
        stop_gateway(proc)


def _a_second_gateway_has_engines_of_its_own(tied, tmp_path, url: str, shared: list[str]) -> None:
    """Gateway B (its own state dir) on the same cluster and state: B runs its own engines, serves what
    was registered through A (the runtime base too) and A what was registered through B, each on its
    own engines (two gateways would swap one engine's weights under each other's requests); a second
    process on A's state dir is refused; B's graceful stop takes its engines only."""
    import subprocess

    theirs = set(_engines(url))
    other, port = tmp_path / "other", free_port()
    other.mkdir()
    b, b_log = f"http://127.0.0.1:{port}", other / "gateway.log"
    args = [
        "--ray",
        "--ray-address",
        "auto",
        "--replicas",
        "1",
        "--mock-engine",
        "0",
        "--base",
        f"mock={tied.base}",
        *shared,
    ]
    proc = start_gateway(args, other / "state", port, b_log)
    try:
        wait_healthy(b, proc, b_log, timeout=300)
        deadline = time.monotonic() + 120
        while sorted(e.split("@")[0] for e in _engines(b)) != ["mock", "wide"]:  # its own "wide" too
            assert time.monotonic() < deadline, _engines(b)
            time.sleep(0.5)
        ours = set(_engines(b))
        assert not ours & theirs and set(_engines(url)) == theirs
        engine, word = _word(b, "wide")
        assert engine in ours and engine.startswith("wide@") and word.strip() == "wbase"
        r = httpx.post(f"{b}/v1/deltas", json={"name": "d-b", "path": str(tied.delta)}, headers=HEADERS)
        assert r.status_code == 201, r.text
        body = {"name": "mock-b", "base": "mock", "deltas": [{"delta": "d-b"}]}
        assert httpx.post(f"{b}/v1/variants", json=body, headers=HEADERS).status_code == 201
        served_a, served_b = _word(url, "mock-b"), _word(b, "mock-b")
        assert served_a[0] in theirs and served_b[0] in ours
        assert served_a[1] == served_b[1] and served_a[1].strip() != "wbase"  # one variant, on each's engine
        twin = start_gateway(args, tmp_path / "state", free_port(), other / "twin.log")
        try:
            assert twin.wait(timeout=120) != 0
        except subprocess.TimeoutExpired:
            stop_gateway(twin)
            raise
        assert "another deltagate process runs gateway" in (other / "twin.log").read_text()
    finally:
        stop_gateway(proc)
    assert set(_engines(url)) == theirs
    assert _word(url, "mock")[0] in theirs


def _kill_the_directory(url: str, engines: set[str]) -> None:
    """kill -9 of the actor that knows where the engines are: Ray restarts it, the replicas' heartbeats
    fill it again, and requests go on being served meanwhile, by the same engines."""
    import ray

    from server.cluster.pool import DIRECTORY, NAMESPACE

    ray.init(address="auto", namespace=NAMESPACE)
    try:
        directory = ray.get_actor(DIRECTORY, namespace=NAMESPACE)
        old = ray.get(directory.pid.remote())
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for model in ("mock", "wide"):
                engine, word = _word(url, model)
                assert engine in engines and word.strip() == "wbase"
            time.sleep(0.2)
        assert ray.get(directory.pid.remote()) != old  # restarted
        assert {e["id"] for e in httpx.get(f"{url}/v1/engines", headers=HEADERS).json()["data"]} == engines
    finally:
        ray.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
