"""`serve --artifact-store s3://…`: deltas uploaded through the API live in a real S3-compatible
server (moto_server), content-addressed; the engine reads them through its node cache, verified, and
serves the variant bit-identical to stock vLLM on the post model."""

from __future__ import annotations

import httpx
import pytest
import s3fs

from loaders.engine import free_port
from tests.server.conftest import (
    ADMIN,
    completion_outputs,
    ref_cores,
    start_gateway,
    stop_gateway,
    wait_healthy,
)

pytestmark = pytest.mark.engine
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def stored(s3_server, tied, tmp_path_factory):
    work = tmp_path_factory.mktemp("stored")
    port = free_port()
    root = f"s3://{s3_server.bucket}/store"
    # the thread count of the stack's reference engines, whose answers this engine must equal
    env = {"VLLM_CPU_OMP_THREADS_BIND": ref_cores(0, engines=2)}
    # --no-warm-on-register: the engine fetches the delta at the first swap, where the test sees it
    args = ["--base", f"tied={tied.base}", "--artifact-store", root, "--no-warm-on-register"]
    proc = start_gateway(args, work / "state", port, work / "gateway.log", env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, work / "gateway.log")
        yield {"url": url, "root": root, "state": work / "state"}
    finally:
        stop_gateway(proc)


def test_an_uploaded_delta_is_stored_by_hash_and_served_exactly(stored, stack, tied):
    url, root = stored["url"], stored["root"]
    r = httpx.post(
        f"{url}/v1/deltas?name=d1",
        content=tied.delta.read_bytes(),
        timeout=60,
        headers={**ADMIN_HEADERS, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    uri = r.json()["path"]
    assert uri.startswith(f"{root}/sha256/") and r.json()["uploaded"]
    fs = s3fs.S3FileSystem()
    assert fs.cat(uri) == tied.delta.read_bytes()  # complete in the store before it was registered
    assert not list((stored["state"] / "deltas").glob("*.safetensors"))  # not kept beside the state

    body = {"name": "stored-inst", "base": "tied", "deltas": [{"delta": "d1", "alpha": 1.0}]}
    assert httpx.post(f"{url}/v1/variants", json=body, headers=ADMIN_HEADERS).status_code == 201
    cache = stored["state"] / "artifact-cache"
    for copy in cache.glob("*.safetensors"):  # what the gateway fetched to check the variant
        copy.unlink()
    assert completion_outputs(url, "stored-inst") == stack.refs["tied-inst"]
    assert [p.name for p in cache.glob("*.safetensors")] == [uri.rsplit("/", 1)[1]]  # the engine fetched it

    r = httpx.post(f"{url}/v1/deltas", json={"name": "again", "path": uri}, headers=ADMIN_HEADERS)
    assert r.status_code == 201 and r.json()["path"] == uri  # registered by its store URI
    missing = f"{root}/sha256/{'0' * 64}.safetensors"
    r = httpx.post(f"{url}/v1/deltas", json={"name": "gone", "path": missing}, headers=ADMIN_HEADERS)
    assert r.status_code == 404 and "no such artifact" in r.json()["error"]["message"]
    assert str(stored["state"]) not in r.text

    for path in ("/v1/deltas/again", "/v1/variants/stored-inst"):
        assert httpx.delete(url + path, headers=ADMIN_HEADERS).status_code == 204
    fs.invalidate_cache()
    assert fs.exists(uri)  # d1, uploaded, still names it
    assert httpx.delete(f"{url}/v1/deltas/d1", headers=ADMIN_HEADERS).status_code == 204
    fs.invalidate_cache()
    assert not fs.exists(uri)


def test_a_restart_keeps_stored_start_up_deltas_under_their_names(s3_server, tied, tmp_path):
    """Start-up variants from local files with a store: registered once, by URI, across restarts
    (a mock engine: this is the catalogue's part)."""
    from tests.server.conftest import start_mock_engine

    mock, engine_url = start_mock_engine(tmp_path, "pico", 0)
    root = f"s3://{s3_server.bucket}/restart"
    args = [
        "--base",
        f"pico={tied.base}",
        "--engine-url",
        f"pico={engine_url}",
        "--artifact-store",
        root,
        "--variant",
        f"inst={tied.delta}",
    ]
    try:
        for _ in range(2):
            port = free_port()
            proc = start_gateway(args, tmp_path / "state", port, tmp_path / "gateway.log")
            try:
                wait_healthy(f"http://127.0.0.1:{port}", proc, tmp_path / "gateway.log", timeout=120)
                deltas = httpx.get(f"http://127.0.0.1:{port}/v1/deltas", headers=ADMIN_HEADERS).json()["data"]
                assert [(d["name"], d["path"].startswith(f"{root}/sha256/")) for d in deltas] == [
                    ("delta", True)
                ]
            finally:
                stop_gateway(proc)
    finally:
        stop_gateway(mock)
