"""Faults around a real gateway process (uvicorn) on a mock engine: kill -9 mid-upload, mid-eval-run
and mid-registration, a state dir of the previous version, a slow engine, an unreachable one. Fast:
no vLLM.
(Engine deaths under a real vLLM engine: tests/server/test_persistence.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from deltas import open_artifact
from loaders.engine import free_port
from tests.server.conftest import (
    ADMIN,
    jsonl_eval,
    metric_families,
    sample_value,
    start_gateway,
    start_mock_engine,
    stop_gateway,
    wait_healthy,
)

AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _gateway(tied, work: Path, engine_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [
        "--base",
        f"pico={tied.base}",
        "--engine-url",
        f"pico={engine_url}",
        "--variant",
        f"inst={tied.delta}",
        *extra,
    ]
    proc = start_gateway(args, work / "state", port, work / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, work / "gateway.log", timeout=120)
    return proc, url


def _kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture()
def mock(tmp_path):
    proc, url = start_mock_engine(tmp_path, "pico", 20)
    yield url
    stop_gateway(proc)


def test_gateway_killed_mid_upload_restarts_clean(tied, tmp_path, mock):
    proc, url = _gateway(tied, tmp_path, mock)
    store = tmp_path / "state" / "deltas"
    data = tied.delta.read_bytes()

    def slow_chunks():
        for i in range(0, len(data), 4096):
            yield data[i : i + 4096]
            time.sleep(0.05)

    def upload():
        try:
            httpx.post(
                f"{url}/v1/deltas?name=late",
                content=slow_chunks(),
                headers=AUTH | {"content-type": "application/octet-stream"},
                timeout=60,
            )
        except httpx.HTTPError:
            pass  # the gateway died under it

    thread = threading.Thread(target=upload)
    thread.start()
    deadline = time.monotonic() + 30
    while not list(store.glob(".upload-*.partial")):
        assert time.monotonic() < deadline, "upload never started"
        time.sleep(0.05)
    _kill9(proc)
    thread.join()
    assert list(store.glob(".upload-*.partial"))  # what the kill left behind

    proc, url = _gateway(tied, tmp_path, mock)
    try:
        assert not list(store.glob(".upload-*.partial")) and not (store / "late.safetensors").exists()
        deltas = httpx.get(f"{url}/v1/deltas", headers=AUTH).json()["data"]
        assert [d["name"] for d in deltas] == ["delta"]
        for d in deltas:
            open_artifact(d["path"], verify=True)  # every registered delta verifies
        r = httpx.post(f"{url}/v1/completions", json={"model": "inst", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
    finally:
        stop_gateway(proc)


def test_gateway_killed_mid_eval_run_resumes_it(tied, tmp_path, mock):
    proc, url = _gateway(tied, tmp_path, mock)
    eval_id = jsonl_eval(url, AUTH, "resume", 12)
    run = httpx.post(
        f"{url}/v1/evals/{eval_id}/runs",
        headers=AUTH,
        json={"variants": ["inst"], "max_tokens": 8, "concurrency": 1},
    ).json()
    path = f"{url}/v1/evals/{eval_id}/runs/{run['id']}"
    deadline = time.monotonic() + 30
    while httpx.get(path, headers=AUTH).json()["progress"]["done"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    _kill9(proc)

    proc, url = _gateway(tied, tmp_path, mock)
    path = f"{url}/v1/evals/{eval_id}/runs/{run['id']}"
    try:
        deadline = time.monotonic() + 60
        while (run := httpx.get(path, headers=AUTH).json())["status"] != "completed":
            assert run["status"] in ("queued", "in_progress") and time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run["progress"] == {"done": 12, "total": 12} and run["result_counts"]["passed"] == 12
        items = httpx.get(f"{path}/output_items", headers=AUTH, params={"limit": 100}).json()["data"]
        assert len(items) == 12  # resumed, not repeated
    finally:
        stop_gateway(proc)


def test_gateway_killed_during_registrations_keeps_every_acknowledged_one(tied, tmp_path, mock):
    """kill -9 while variants are being defined: each answered 201 is there after the restart, and
    the registry opens (a write cut short is a transaction not committed, not a torn file)."""
    proc, url = _gateway(tied, tmp_path, mock)
    created: list[str] = []

    def define() -> None:
        for i in range(1000):
            body = {"name": f"v{i}", "base": "pico", "deltas": [{"delta": "delta", "alpha": 0.5}]}
            try:
                r = httpx.post(f"{url}/v1/variants", json=body, headers=AUTH, timeout=10)
            except httpx.HTTPError:
                return
            if r.status_code == 201:
                created.append(body["name"])

    writer = threading.Thread(target=define)
    writer.start()
    deadline = time.monotonic() + 30
    while len(created) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    _kill9(proc)
    writer.join()
    proc, url = _gateway(tied, tmp_path, mock)
    try:
        names = {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert len(created) >= 5 and set(created) <= names and "inst" in names
    finally:
        stop_gateway(proc)


OLD_EVALS_SCHEMA = """
CREATE TABLE evals (id TEXT PRIMARY KEY, created_at REAL, body TEXT);
CREATE TABLE runs (id TEXT PRIMARY KEY, eval_id TEXT, created_at REAL, body TEXT, status TEXT, error TEXT,
    total INTEGER, measured TEXT);
CREATE TABLE items (run_id TEXT, variant TEXT, idx INTEGER, input TEXT, output TEXT, grades TEXT,
    status TEXT, error TEXT, scores TEXT, PRIMARY KEY (run_id, variant, idx));
"""


def test_a_state_dir_of_the_previous_version_is_imported(tied, tmp_path, mock):
    """registry.json and evals.sqlite (before the state database) come back as they were."""
    import sqlite3

    proc, url = _gateway(tied, tmp_path, mock)
    eval_id = jsonl_eval(url, AUTH, "old", 2)
    run = httpx.post(f"{url}/v1/evals/{eval_id}/runs", headers=AUTH, json={"variants": ["inst"]}).json()
    deadline = time.monotonic() + 60
    path = f"{url}/v1/evals/{eval_id}/runs/{run['id']}"
    while httpx.get(path, headers=AUTH).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    before = httpx.get(path, headers=AUTH).json()
    stop_gateway(proc)
    state = tmp_path / "state"
    with sqlite3.connect(state / "state.sqlite") as db:  # written as the previous version kept it
        (state / "registry.json").write_text(db.execute("SELECT body FROM registry").fetchone()[0])
        with sqlite3.connect(state / "evals.sqlite") as old:
            old.executescript(OLD_EVALS_SCHEMA)
            old.executemany("INSERT INTO evals VALUES (?, ?, ?)", db.execute("SELECT * FROM evals"))
            old.executemany(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                db.execute("SELECT id, eval_id, created_at, body, status, error, total, measured FROM runs"),
            )
            old.executemany(
                "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                db.execute(
                    "SELECT run_id, variant, idx, input, output, grades, status, error, "
                    "scores FROM items ORDER BY seq"
                ),
            )
    for leftover in state.glob("state.sqlite*"):
        leftover.unlink()
    proc, url = _gateway(tied, tmp_path, mock, "--variant", f"inst2={tied.delta}:0.5")
    try:
        assert {"inst", "inst2"} <= {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        after = httpx.get(f"{url}/v1/evals/{eval_id}/runs/{run['id']}", headers=AUTH).json()
        assert after["status"] == "completed" and after["per_variant"] == before["per_variant"]
        assert (state / "registry.json.imported").is_file() and not (state / "evals.sqlite").exists()
    finally:
        stop_gateway(proc)


def test_a_slow_engine_times_out_and_is_counted(tied, tmp_path):
    engine, engine_url = start_mock_engine(tmp_path, "pico", 0.5)  # one token every 2 s
    proc, url = _gateway(tied, tmp_path, engine_url, "--engine-read-timeout", "0.5")
    try:
        started = time.monotonic()
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "pico", "prompt": "x", "max_tokens": 3}, timeout=30
        )
        assert r.status_code == 502 and time.monotonic() - started < 5, r.text
        r = httpx.post(
            f"{url}/v1/completions",
            timeout=30,
            json={"model": "pico", "prompt": "x", "max_tokens": 3, "stream": True},
        )
        assert '"type": "engine_error"' in r.text and "broke off" in r.text
        assert sample_value(metric_families(url), "deltagate_upstream_errors_total", engine="pico") >= 2
    finally:
        stop_gateway(proc)
        stop_gateway(engine)


def test_an_attached_engine_that_never_answers_stops_the_start_with_one_clear_line(tied, tmp_path):
    port = free_port()  # nothing listens there
    args = [
        "--base",
        f"pico={tied.base}",
        "--engine-url",
        f"pico=http://127.0.0.1:{port}",
        "--engine-wait",
        "2",
    ]
    proc = start_gateway(args, tmp_path / "state", free_port(), tmp_path / "gateway.log")
    try:
        assert proc.wait(timeout=60) != 0
        log = (tmp_path / "gateway.log").read_text()
        assert "cannot start: engine for 'pico' not ready after 2s" in log, log[-2000:]
    finally:
        stop_gateway(proc)


def test_an_engine_gone_after_start_is_a_502_and_counted(tied, tmp_path):
    engine, engine_url = start_mock_engine(tmp_path, "pico", 0)
    proc, url = _gateway(tied, tmp_path, engine_url)
    try:
        stop_gateway(engine)
        r = httpx.post(
            f"{url}/v1/completions", json={"model": "pico", "prompt": "x", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"], r.text
        assert sample_value(metric_families(url), "deltagate_upstream_errors_total", kind="connect") >= 1
    finally:
        stop_gateway(proc)


def test_an_unreachable_artifact_store_fails_the_upload_and_keeps_nothing(tied, tmp_path, mock):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {
        "AWS_ENDPOINT_URL": dead,
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    port = free_port()
    args = ["--base", f"pico={tied.base}", "--engine-url", f"pico={mock}", "--artifact-store", "s3://b/d"]
    proc = start_gateway(args, tmp_path / "state", port, tmp_path / "gateway.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "gateway.log", timeout=120)
        r = httpx.post(
            f"{url}/v1/deltas?name=d",
            content=tied.delta.read_bytes(),
            timeout=120,
            headers={**AUTH, "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 502, r.text
        assert r.json()["error"]["type"] == "artifact_store_error" and "s3://b/d/sha256/" in r.text
        assert str(tmp_path) not in r.text
        assert httpx.get(f"{url}/v1/deltas", headers=AUTH).json()["data"] == []  # nothing registered
        assert not [p for p in (tmp_path / "state").rglob("*") if p.suffix in (".partial", ".safetensors")]
        assert httpx.get(f"{url}/v1/models").status_code == 200  # and it keeps serving
    finally:
        stop_gateway(proc)
