"""Credentials on every route, private state, request limits — in process, no engine needed.

The app is built with create_app but its lifespan (engines) is not run: every check here
happens before a request would reach an engine.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from server.app import create_app
from server.settings import BaseSpec, GatewaySettings
from server.uploads import receive_to_file

ADMIN, KEY = "admin-secret", "inference-key"
PUBLIC = {"/health", "/metrics", "/metrics/engines/{engine:path}"}  # what Prometheus and probes read
INFERENCE = {
    "/v1/models",
    "/v1/models/{model:path}",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/responses/{response_id}",
    "/v1/responses/{response_id}/cancel",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/tokenize",
    "/detokenize",
    "/v1/files",
    "/v1/files/{file_id}",
    "/v1/files/{file_id}/content",
    "/v1/batches",
    "/v1/batches/{batch_id}",
    "/v1/batches/{batch_id}/cancel",
}
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def _app(tmp_path: Path, **settings):
    base = BaseSpec(name="pico", path=str(tmp_path))  # never started: lifespan is not run
    values = {"state_dir": tmp_path / "state", "bases": [base], "api_keys": [KEY], "admin_token": ADMIN}
    return create_app(GatewaySettings(**(values | settings)))


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def _routes(app) -> list[tuple[str, str]]:
    return sorted((m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods)


async def test_every_route_but_probes_and_docs_needs_its_credentials(tmp_path):
    """Enumerates the app's routes, so a route added later cannot slip through unprotected."""
    app = _app(tmp_path)
    routes = _routes(app)
    assert {p for _, p in routes} >= INFERENCE | {"/v1/bases", "/v1/deltas", "/v1/variants", "/v1/evals"}
    async with _client(app) as client:
        for method, path in routes:
            if path in PUBLIC | DOCS:
                continue
            url = re.sub(r"\{[^}]+\}", "x", path)
            admin_only = path not in INFERENCE
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Bearer {KEY if admin_only else ADMIN}"},
            ):
                r = await client.request(method, url, headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"


async def test_inference_keys_are_taken_as_x_api_key_too(tmp_path):
    """Anthropic clients send the key as `x-api-key`; a wrong one is 401 there as well, and the
    admin token is no inference key in that header either."""
    app = _app(tmp_path)
    async with _client(app) as client:
        for key in ("wrong", ADMIN):
            r = await client.post("/v1/messages", headers={"x-api-key": key}, json={})
            assert r.status_code == 401 and "x-api-key" in r.json()["error"]["message"], r.text
        r = await client.get("/v1/models", headers={"x-api-key": KEY})  # no base registered: lifespan not run
        assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
        r = await client.get("/v1/models/nope", headers={"x-api-key": KEY})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_state_dir_is_private_and_the_token_file_owner_only(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    _app(tmp_path, admin_token=None)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    token = state / "admin_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 24
    token.chmod(0o644)  # loosened by hand: tightened again on the next start, same token
    before = token.read_text()
    _app(tmp_path, admin_token=None)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and token.read_text() == before


async def test_oversized_bodies_are_413_before_reaching_anything(tmp_path):
    app = _app(tmp_path, max_body_bytes=1000, max_upload_bytes=2000)
    auth = {"Authorization": f"Bearer {KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with _client(app) as client:
        big = {"model": "pico", "prompt": "x" * 5000}
        r = await client.post("/v1/completions", json=big, headers=auth)
        assert r.status_code == 413 and "max-body-bytes" in r.json()["error"]["message"]

        async def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b'{"model": "pico", "prompt": "' + b"y" * 200

        r = await client.post(
            "/v1/variants", content=chunked(), headers=admin | {"content-type": "application/json"}
        )
        assert r.status_code == 413, r.text
        r = await client.post(
            "/v1/deltas?name=big",
            content=b"z" * 3000,
            headers=admin | {"content-type": "application/octet-stream"},
        )
        assert r.status_code == 413 and "max-upload-bytes" in r.json()["error"]["message"]
    store = tmp_path / "state" / "deltas"
    assert not any(store.iterdir())  # nothing kept, not even the partial file


async def test_a_stalled_upload_is_dropped_with_408_and_nothing_kept(tmp_path):
    app = _app(tmp_path, upload_idle_seconds=0.3)
    admin = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/octet-stream"}

    async def stalls():
        yield b"first bytes"
        await asyncio.sleep(2)
        yield b"never read"

    async with _client(app) as client:
        r = await client.post("/v1/deltas?name=slow", content=stalls(), headers=admin)
    assert r.status_code == 408 and "sent nothing for 0.3 s" in r.json()["error"]["message"]
    assert not any((tmp_path / "state" / "deltas").iterdir())


async def test_upload_errors_do_not_show_server_paths(tmp_path):
    app = _app(tmp_path)
    admin = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/octet-stream"}
    async with _client(app) as client:
        r = await client.post("/v1/deltas?name=junk", content=b"\x08" + b"\x00" * 7 + b"{}", headers=admin)
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "uploaded artifact 'junk'" in message
        assert str(tmp_path) not in message and ".partial" not in message
        # a name that tries to climb out of the store stays in it
        r = await client.post("/v1/deltas?name=a/../../escape", content=b"nope", headers=admin)
        assert r.status_code == 422
    assert not (tmp_path / "escape.safetensors").exists()
    assert not any((tmp_path / "state" / "deltas").iterdir())


async def test_disk_full_during_an_upload_is_507_and_nothing_is_kept(tmp_path):
    target = tmp_path / "upload.partial"
    target.symlink_to("/dev/full")  # every write fails with ENOSPC

    async def chunks():
        yield b"x" * 65536

    from server.errors import InsufficientStorageError

    with pytest.raises(InsufficientStorageError, match="disk is full"):
        await receive_to_file(chunks(), target, 0, 5)
    assert not os.path.lexists(target)
    assert Path("/dev/full").exists()


async def test_a_symlink_planted_in_the_store_is_replaced_not_followed(tmp_path, tied):
    app = _app(tmp_path)
    store = tmp_path / "state" / "deltas"
    store.mkdir(parents=True)
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (store / "inst.safetensors").symlink_to(outside)
    admin = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/octet-stream"}
    async with _client(app) as client:
        r = await client.post("/v1/deltas?name=inst", content=tied.delta.read_bytes(), headers=admin)
    assert r.status_code == 201, r.text
    assert outside.read_text() == "precious"
    final = store / "inst.safetensors"
    assert not final.is_symlink() and final.read_bytes() == tied.delta.read_bytes()


async def test_a_project_admin_key_is_refused_on_every_admin_route_outside_its_project(tmp_path):
    """Enumerates the app's admin routes: a project's admin key gets 403 on every one but those it
    may call on its own names (server/deps.PROJECT_ROUTES, checked name by name in test_tenancy.py),
    so an admin route added later is root's unless it is made a project's on purpose."""
    from server.deps import PROJECT_ROUTES

    app = _app(tmp_path)
    async with _client(app) as client:
        body = {"name": "ops", "admin": True, "models": ["*"]}
        made = await client.post(
            "/v1/projects/team-a/keys", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert made.status_code == 201, made.text
        key = {"Authorization": f"Bearer {made.json()['secret']}"}
        checked = set()
        for method, path in _routes(app):
            prefix = path.split("/{")[0]
            if path in PUBLIC | DOCS | INFERENCE or prefix in PROJECT_ROUTES:
                continue
            r = await client.request(method, re.sub(r"\{[^}]+\}", "x", path), headers=key, json={})
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["type"] == "permission_error"
            checked.add(path)
        assert checked >= {"/v1/engines", "/v1/keys", "/v1/keys/{key_id}", "/v1/projects/{project}/limits"}
