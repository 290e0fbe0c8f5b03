"""Projects and scoped keys through a real gateway on a mock engine (the scope check is the resolver's,
the same for every engine): keys created over the API and the CLI, models out of scope unknown (404)
on every inference route, a project's admin key managing only its own names, revoke and rotate, the
secret never stored in clear."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import ADMIN, metric_families, mock_gateway, sample_value

ROOT = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def gw(tied, tmp_path_factory):
    work = tmp_path_factory.mktemp("tenancy")
    with mock_gateway(tied, work, 500, ("--state-poll-seconds", "0.5")) as stack:
        yield stack, work


def _key(url: str, project: str, name: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/projects/{project}/keys", json={"name": name, **body}, headers=ROOT)
    assert r.status_code == 201, r.text
    return r.json()


def _auth(key: dict) -> dict:
    return {"Authorization": f"Bearer {key['secret']}"}


def _complete(url: str, model: str, headers: dict) -> httpx.Response:
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def test_a_project_admin_key_manages_its_names_and_nothing_else(gw, tied):
    url = gw[0].url
    admin = _key(url, "team-a", "ops", admin=True)
    assert admin["models"] == ["team-a/*"] and admin["secret"].startswith("dg-")  # by default, its own
    a = _auth(admin)
    r = httpx.post(f"{url}/v1/deltas", json={"name": "team-a/d", "path": str(tied.delta)}, headers=a)
    assert r.status_code == 201, r.text
    body = {"name": "team-a/inst", "base": "mock", "deltas": [{"delta": "team-a/d"}]}
    assert httpx.post(f"{url}/v1/variants", json=body, headers=a, timeout=60).status_code == 201
    alias = {"name": "team-a/prod", "targets": [{"variant": "team-a/inst"}]}
    assert httpx.post(f"{url}/v1/aliases", json=alias, headers=a).status_code == 201
    # another project's names, the shared variants, root's routes: refused, saying why
    for method, path, body in [
        ("POST", "/v1/deltas", {"name": "team-b/d", "path": str(tied.delta)}),
        ("POST", "/v1/variants", {"name": "team-b/x", "base": "mock", "deltas": [{"delta": "team-a/d"}]}),
        ("POST", "/v1/variants", {"name": "team-a/y", "base": "mock", "deltas": [{"delta": "tied-shared"}]}),
        ("DELETE", "/v1/variants/mock-inst", None),
        ("PUT", "/v1/aliases/team-a/prod", {"targets": [{"variant": "mock-inst"}]}),
        ("GET", "/v1/engines", None),
        ("GET", "/v1/bases/mock", None),
        ("POST", "/v1/bases", {"name": "team-b/v2", "path": str(tied.base)}),
        ("GET", "/v1/keys", None),
        ("POST", "/v1/projects/team-a/keys", {"name": "more"}),
    ]:
        r = httpx.request(method, f"{url}{path}", json=body, headers=a, timeout=60)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error", r.text
    # its lists show its own names only
    listed = httpx.get(f"{url}/v1/variants", headers=a).json()["data"]
    assert [v["name"] for v in listed] == ["team-a/inst"]
    assert {v["name"] for v in httpx.get(f"{url}/v1/variants", headers=ROOT).json()["data"]} >= {
        "team-a/inst",
        "mock-inst",
    }
    assert [d["name"] for d in httpx.get(f"{url}/v1/deltas", headers=a).json()["data"]] == ["team-a/d"]


def test_a_model_out_of_scope_is_unknown_on_every_route(gw):
    url = gw[0].url
    b = _auth(_key(url, "team-b", "app", models=["team-b/*"]))
    unknown = _complete(url, "no-such-model", b)
    assert unknown.status_code == 404
    for model in ("team-a/inst", "team-a/prod", "mock-inst", "mock"):
        r = _complete(url, model, b)
        assert r.status_code == 404, (model, r.text)
        assert r.json()["error"]["message"] == unknown.json()["error"]["message"].replace(
            "no-such-model", model
        )
    chat = {"model": "team-a/inst", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for path, body in [
        ("/v1/chat/completions", chat),
        ("/v1/responses", {"model": "team-a/inst", "input": "hi", "max_output_tokens": 2}),
        ("/v1/messages", {**chat, "max_tokens": 2}),
        ("/tokenize", {"model": "team-a/inst", "prompt": "hi"}),
    ]:
        r = httpx.post(f"{url}{path}", json=body, headers=b, timeout=60)
        assert r.status_code == 404, (path, r.text)
    assert httpx.get(f"{url}/v1/models/team-a/inst", headers=b).status_code == 404
    assert httpx.get(f"{url}/v1/models", headers=b).json()["data"] == []
    # the Anthropic header form is the same key
    assert _complete(url, "team-a/inst", {"x-api-key": b["Authorization"][7:]}).status_code == 404


def test_scopes_by_name_prefix_and_base_family(gw):
    url = gw[0].url
    a = _auth(_key(url, "team-a", "app", models=["team-a/*"]))
    assert _complete(url, "team-a/inst", a).status_code == 200
    assert _complete(url, "team-a/prod", a).status_code == 200  # its alias
    assert _complete(url, "mock-inst", a).status_code == 404
    ids = {m["id"] for m in httpx.get(f"{url}/v1/models", headers=a).json()["data"]}
    assert ids == {"team-a/inst", "team-a/prod"}
    family = _auth(_key(url, "research", "evals", models=["base:mock"]))
    for model in ("mock", "mock-inst", "mock-half", "team-a/inst"):  # every variant of base mock
        assert _complete(url, model, family).status_code == 200, model
    one = _auth(_key(url, "research", "one", models=["mock-half"]))
    assert _complete(url, "mock-half", one).status_code == 200
    assert _complete(url, "mock-inst", one).status_code == 404


def test_keys_are_required_once_they_exist_and_revoke_and_rotate_hold(gw):
    work, url = gw[1], gw[0].url
    assert _complete(url, "mock", {}).status_code == 401
    assert _complete(url, "mock", {"Authorization": "Bearer dg-made-up"}).status_code == 401
    assert _complete(url, "mock", ROOT).status_code == 401  # root manages; it is no inference key
    key = _key(url, "team-c", "app", models=["*"])
    assert _complete(url, "mock", _auth(key)).status_code == 200
    time.sleep(0.6)  # a poll: the next call writes last-used times back
    assert _complete(url, "mock", _auth(key)).status_code == 200
    used = httpx.get(f"{url}/v1/keys/{key['id']}", headers=ROOT).json()["last_used_at"]
    assert used is not None and abs(used - time.time()) < 60
    rotated = httpx.post(f"{url}/v1/keys/{key['id']}/rotate", headers=ROOT).json()
    assert rotated["secret"] != key["secret"]
    assert _complete(url, "mock", _auth(key)).status_code == 401
    assert _complete(url, "mock", _auth(rotated)).status_code == 200
    revoked = httpx.delete(f"{url}/v1/keys/{key['id']}", headers=ROOT).json()
    assert revoked["revoked_at"] is not None
    assert _complete(url, "mock", _auth(rotated)).status_code == 401
    # listed without secrets, with a last-used time once the gateway wrote it back (each poll)
    listed = {k["id"]: k for k in httpx.get(f"{url}/v1/projects/team-c/keys", headers=ROOT).json()["data"]}
    assert "secret" not in listed[key["id"]] and "secret_hash" not in listed[key["id"]]
    # only the hash is stored
    with sqlite3.connect(work / "state" / "state.sqlite") as db:
        dump = "\n".join(db.iterdump())
    assert rotated["secret"] not in dump and key["secret"] not in dump
    assert "api_keys" in dump
    # bad input: a clear 4xx
    assert (
        httpx.post(f"{url}/v1/projects/bad project/keys", json={"name": "x"}, headers=ROOT).status_code == 400
    )
    r = httpx.post(f"{url}/v1/projects/team-c/keys", json={"name": "x", "priority": "urgent"}, headers=ROOT)
    assert r.status_code == 422 and "priority" in r.text
    assert httpx.delete(f"{url}/v1/keys/key_nope", headers=ROOT).status_code == 404


def test_the_cli_creates_lists_rotates_and_revokes(gw):
    url = gw[0].url

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cli", "keys", *args, "--url", url, "--admin-token", ADMIN]
        env = {**os.environ, "COLUMNS": "300"}  # the table for people; --json is what scripts read
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    made = cli("create", "team-d", "bot", "--model", "team-d/*", "--model", "base:mock")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("dg-") and "created key_" in made.stderr
    assert _complete(url, "mock-half", {"Authorization": f"Bearer {secret}"}).status_code == 200
    listed = cli("list", "--project", "team-d", "--json")
    assert listed.returncode == 0, listed.stderr
    (key,) = __import__("json").loads(listed.stdout)
    assert key["models"] == ["team-d/*", "base:mock"] and secret not in listed.stdout
    table = cli("list")
    assert table.returncode == 0 and key["id"] in table.stderr
    rotated = cli("rotate", key["id"])
    assert rotated.returncode == 0 and rotated.stdout.strip() != secret
    gone = cli("revoke", "key_nope")
    assert gone.returncode == 2 and "unknown key" in gone.stderr
    assert httpx.delete(f"{url}/v1/keys/{key['id']}", headers=ROOT).status_code == 200
    assert (
        _complete(url, "mock-half", {"Authorization": f"Bearer {rotated.stdout.strip()}"}).status_code == 401
    )


def test_usage_is_counted_per_key_name_never_secret(gw):
    url = gw[0].url
    key = _key(url, "team-e", "app", models=["mock"])
    assert _complete(url, "mock", _auth(key)).status_code == 200
    families = metric_families(url)
    assert sample_value(families, "deltagate_key_requests_total", key="team-e/app", model="mock") >= 1
    text = httpx.get(f"{url}/metrics").text
    assert key["secret"] not in text


def _limited(url: str, name: str, **limits) -> dict:
    return _auth(_key(url, "team-f", name, models=["mock"], limits=limits))


def test_requests_per_minute_answer_429_with_openai_headers(gw):
    url = gw[0].url
    key = _limited(url, "rpm", rpm=4)
    answers = [_complete(url, "mock", key) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 4 + [429] * 2
    # remaining: after this request, as OpenAI counts
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers[:4]] == ["3", "2", "1", "0"]
    assert all(r.headers["x-ratelimit-limit-requests"] == "4" for r in answers)
    refused = answers[-1]
    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
    assert "4 requests per minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    families = metric_families(url)
    assert sample_value(families, "deltagate_key_requests_total", key="team-f/rpm", status_class="4xx") == 2
    # another key is not held back by this one's limit
    assert _complete(url, "mock", _limited(url, "other", rpm=100)).status_code == 200


def test_concurrent_and_token_limits(gw):
    url = gw[0].url
    one = _limited(url, "one-at-a-time", concurrent=1)
    slow = {"model": "mock", "prompt": "x", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=slow, headers=one, timeout=60) as stream:
        lines = stream.iter_lines()
        next(lines)  # in flight
        r = _complete(url, "mock", one)
        assert r.status_code == 429 and "in flight" in r.json()["error"]["message"]
        for _ in lines:
            pass
    deadline = time.monotonic() + 10  # its place is freed when the stream's relay ends, just after
    while (r := _complete(url, "mock", one)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    tokens = _limited(url, "tokens", tpm=10)
    body = {"model": "mock", "prompt": "x", "max_tokens": 8}
    first = httpx.post(f"{url}/v1/completions", json=body, headers=tokens, timeout=60)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "10"
    used = first.json()["usage"]["total_tokens"]
    second = httpx.post(f"{url}/v1/completions", json=body, headers=tokens, timeout=60)
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == str(10 - used)
    r = httpx.post(f"{url}/v1/completions", json=body, headers=tokens, timeout=60)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]


def test_a_daily_token_budget_and_the_usage_api(gw):
    url = gw[0].url
    key = _limited(url, "budget", tokens_per_day=12)
    body = {"model": "mock", "prompt": "x", "max_tokens": 8}
    spent = 0
    for _ in range(5):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=60)
        if r.status_code == 429:
            break
        spent += r.json()["usage"]["total_tokens"]
        time.sleep(0.6)  # a poll: the budget is read back from the usage table
    assert r.status_code == 429 and "for today" in r.json()["error"]["message"], r.text
    assert spent >= 12
    usage = httpx.get(f"{url}/v1/usage", params={"project": "team-f"}, headers=ROOT).json()["data"]
    row = next(u for u in usage if u["key"] == "team-f/budget")
    assert row["model"] == "mock" and row["prompt_tokens"] + row["completion_tokens"] == spent
    assert all(u["project"] == "team-f" for u in usage)
    since = httpx.get(f"{url}/v1/usage", params={"from": "2999-01-01"}, headers=ROOT).json()["data"]
    assert since == []
    assert httpx.get(f"{url}/v1/usage", params={"from": "soon"}, headers=ROOT).status_code == 400
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "usage",
            "--project",
            "team-f",
            "--json",
            "--url",
            url,
            "--admin-token",
            ADMIN,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    assert any(u["key"] == "team-f/budget" for u in __import__("json").loads(printed.stdout)["data"])


def test_files_and_batches_belong_to_their_project_and_run_with_its_scopes(gw):
    """Team G's batch over its own model and another project's: the other's lines answer 404 as an
    unknown model would; team H sees none of team G's files or batches."""
    url = gw[0].url
    g = _auth(_key(url, "team-g", "batch", models=["mock-half"]))
    h = _auth(_key(url, "team-h", "batch", models=["*"]))
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": m, "prompt": "x", "max_tokens": 2},
        }
        for i, m in enumerate(["mock-half", "mock-inst", "no-such-model"])
    ]
    data = "".join(__import__("json").dumps(line) + "\n" for line in lines)
    up = httpx.post(
        f"{url}/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}, headers=g
    )
    assert up.status_code == 200, up.text
    file_id = up.json()["id"]
    assert "_project" not in up.json()
    body = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    assert httpx.post(f"{url}/v1/batches", json=body, headers=h).status_code == 404  # not its file
    batch = httpx.post(f"{url}/v1/batches", json=body, headers=g).json()
    assert "_project" not in batch and "_key" not in batch
    deadline = time.monotonic() + 60
    while (got := httpx.get(f"{url}/v1/batches/{batch['id']}", headers=g).json())["status"] != "completed":
        assert time.monotonic() < deadline, got
        time.sleep(0.2)
    assert got["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    errors = httpx.get(f"{url}/v1/files/{got['error_file_id']}/content", headers=g).text.splitlines()
    by_id = {e["custom_id"]: e["response"] for e in map(__import__("json").loads, errors)}
    assert by_id["r1"]["status_code"] == by_id["r2"]["status_code"] == 404
    assert by_id["r1"]["body"]["error"]["message"] == by_id["r2"]["body"]["error"]["message"].replace(
        "no-such-model", "mock-inst"
    )
    # the other project sees nothing of it
    assert httpx.get(f"{url}/v1/batches/{batch['id']}", headers=h).status_code == 404
    assert httpx.get(f"{url}/v1/files/{file_id}/content", headers=h).status_code == 404
    assert httpx.delete(f"{url}/v1/files/{file_id}", headers=h).status_code == 404
    assert all(b["id"] != batch["id"] for b in httpx.get(f"{url}/v1/batches", headers=h).json()["data"])
    assert httpx.get(f"{url}/v1/files", headers=h).json()["data"] == []
    assert {f["id"] for f in httpx.get(f"{url}/v1/files", headers=g).json()["data"]} >= {
        file_id,
        got["output_file_id"],
    }


def test_priorities_reach_the_engine_and_clients_cannot_jump_the_queue(tied, tmp_path):
    """--priority-scheduling: each request carries vLLM's `priority`, 0 for interactive keys, 1 for
    keys of priority batch (and the gateway's own background work); a client's own value is replaced."""
    with mock_gateway(tied, tmp_path, 500, ("--priority-scheduling",)) as stack:
        url = stack.url
        batch = _auth(_key(url, "team-i", "nightly", models=["*"], priority="batch"))
        user = _auth(_key(url, "team-i", "chat", models=["*"]))
        for key in (batch, user):
            body = {"model": "mock", "prompt": "x", "max_tokens": 1, "priority": -100}
            assert httpx.post(f"{url}/v1/completions", json=body, headers=key, timeout=60).status_code == 200
        seen = httpx.get(f"{stack.engine_url}/mock/requests").json()
        assert [r["body"]["priority"] for r in seen[-2:]] == [1, 0]


def test_a_keys_scopes_and_limits_change_in_place(gw):
    """PATCH /v1/keys/{id} (and `deltagate keys update`): new models, a limit, the class; the secret
    stays; a revoked key cannot be changed."""
    url = gw[0].url
    key = _key(url, "team-i", "app", models=["mock"])
    auth = _auth(key)
    assert _complete(url, "mock-half", auth).status_code == 404
    r = httpx.patch(f"{url}/v1/keys/{key['id']}", json={"models": ["base:mock"]}, headers=ROOT)
    assert r.status_code == 200 and r.json()["models"] == ["base:mock"] and "secret" not in r.json()
    assert _complete(url, "mock-half", auth).status_code == 200  # at once on this gateway
    r = httpx.patch(f"{url}/v1/keys/{key['id']}", json={"limits": {"rpm": 1}}, headers=ROOT)
    assert r.json()["limits"]["rpm"] == 1 and r.json()["models"] == ["base:mock"]  # the rest kept
    answers = [_complete(url, "mock", auth) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 429]
    env = {**os.environ, "COLUMNS": "300"}
    cmd = [sys.executable, "-m", "cli", "keys", "update", key["id"], "--no-limits", "--priority", "batch"]
    done = subprocess.run(
        [*cmd, "--url", url, "--admin-token", ADMIN], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and "no limits" in done.stderr, done.stderr
    got = httpx.get(f"{url}/v1/keys/{key['id']}", headers=ROOT).json()
    assert got["priority"] == "batch" and not any(got["limits"].values())
    assert _complete(url, "mock", auth).status_code == 200
    bad = httpx.patch(f"{url}/v1/keys/{key['id']}", json={"priority": "urgent"}, headers=ROOT)
    assert bad.status_code == 422 and "priority" in bad.text
    bad = httpx.patch(f"{url}/v1/keys/{key['id']}", json={"secret": "mine"}, headers=ROOT)
    assert bad.status_code == 422
    assert httpx.patch(f"{url}/v1/keys/{key['id']}", json={}, headers=_auth(key)).status_code == 401
    httpx.delete(f"{url}/v1/keys/{key['id']}", headers=ROOT)
    gone = httpx.patch(f"{url}/v1/keys/{key['id']}", json={"models": ["*"]}, headers=ROOT)
    assert gone.status_code == 409 and "revoked" in gone.text


def test_a_projects_limits_hold_over_all_its_keys(gw):
    """PUT /v1/projects/{p}/limits: two keys of one project share its rpm; another project does not."""
    url = gw[0].url
    a, b = (_auth(_key(url, "team-j", name, models=["mock"])) for name in ("a", "b"))
    other = _auth(_key(url, "team-k", "a", models=["mock"]))
    assert httpx.get(f"{url}/v1/projects/team-j/limits", headers=ROOT).json()["limits"]["rpm"] is None
    r = httpx.put(f"{url}/v1/projects/team-j/limits", json={"rpm": 3}, headers=ROOT)
    assert r.status_code == 200 and r.json()["limits"]["rpm"] == 3
    answers = [_complete(url, "mock", k) for k in (a, b, a, b)]
    assert [x.status_code for x in answers] == [200, 200, 200, 429]
    assert "project 'team-j'" in answers[-1].json()["error"]["message"]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "3"  # the project's, the key having none
    assert _complete(url, "mock", other).status_code == 200
    assert httpx.put(f"{url}/v1/projects/team-j/limits", json={"rpm": 0}, headers=ROOT).status_code == 422
    assert httpx.put(f"{url}/v1/projects/bad name/limits", json={}, headers=ROOT).status_code == 400
    assert httpx.put(f"{url}/v1/projects/team-j/limits", json={}, headers=a).status_code == 401
    cmd = [sys.executable, "-m", "cli", "keys", "project-limits", "team-j", "--no-limits"]
    done = subprocess.run([*cmd, "--url", url, "--admin-token", ADMIN], capture_output=True, text=True)
    assert done.returncode == 0 and "project team-j: no limits" in done.stderr, done.stderr
    assert _complete(url, "mock", b).status_code == 200


def test_a_project_admin_key_registers_runtime_bases_under_its_prefix(gw, tied_updated):
    """A project's runtime base (hot-loaded by the running engine): registered, listed, served to its
    keys and deleted by its admin key; the other bases are not its to list or touch."""
    url = gw[0].url
    ops = _auth(_key(url, "team-n", "ops", admin=True))
    app = _auth(_key(url, "team-n", "app"))
    r = httpx.post(f"{url}/v1/bases", json={"name": "team-n/v2", "path": str(tied_updated)}, headers=ops)
    assert r.status_code == 201, r.text
    assert [b["name"] for b in httpx.get(f"{url}/v1/bases", headers=ops).json()["data"]] == ["team-n/v2"]
    assert "team-n/v2" in {b["name"] for b in httpx.get(f"{url}/v1/bases", headers=ROOT).json()["data"]}
    assert _complete(url, "team-n/v2", app).status_code == 200  # PROJECT/* covers its base
    assert _complete(url, "team-n/v2", _auth(_key(url, "team-o", "app"))).status_code == 404
    assert httpx.delete(f"{url}/v1/bases/mock", headers=ops).status_code == 403
    assert httpx.delete(f"{url}/v1/bases/team-n/v2", headers=ops).status_code == 204


def test_a_project_admin_key_runs_evals_on_its_models_only(gw):
    """Evals for a project's admin key: its variants and the ones its scopes allow; another project's
    variant is unknown (404); it sees only its project's evals and runs, and root sees all; the run's
    requests count as the key's."""
    from tests.server.conftest import jsonl_eval

    url = gw[0].url
    ops = _auth(_key(url, "team-l", "ops", admin=True, models=["team-l/*", "mock-half"]))
    peer = _auth(_key(url, "team-m", "ops", admin=True))
    eval_id = jsonl_eval(url, ops, "team-l's eval", 3)
    runs = f"{url}/v1/evals/{eval_id}/runs"
    r = httpx.post(runs, json={"variants": ["mock-inst"], "max_tokens": 4}, headers=ops)
    assert r.status_code == 404 and "mock-inst" in r.text  # out of its scopes: as unknown
    r = httpx.post(runs, json={"variants": ["mock-half"], "max_tokens": 4}, headers=ops)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while (run := httpx.get(f"{runs}/{run_id}", headers=ops).json())["status"] != "completed":
        assert run["status"] in ("queued", "in_progress") and time.monotonic() < deadline, run
        time.sleep(0.2)
    assert run["result_counts"]["passed"] == 3
    # another project: none of it; root: all of it
    assert eval_id not in [e["id"] for e in httpx.get(f"{url}/v1/evals", headers=peer).json()["data"]]
    for path in ("", "/runs", f"/runs/{run_id}", f"/runs/{run_id}/output_items"):
        assert httpx.get(f"{url}/v1/evals/{eval_id}{path}", headers=peer).status_code == 404, path
    assert httpx.post(f"{runs}/{run_id}/cancel", headers=peer).status_code == 404
    assert httpx.delete(f"{url}/v1/evals/{eval_id}", headers=peer).status_code == 404
    assert eval_id in [e["id"] for e in httpx.get(f"{url}/v1/evals", headers=ROOT).json()["data"]]
    assert [e["id"] for e in httpx.get(f"{url}/v1/evals", headers=ops).json()["data"]] == [eval_id]
    usage = httpx.get(f"{url}/v1/usage", params={"project": "team-l"}, headers=ROOT).json()["data"]
    assert [(u["key"], u["model"], u["requests"]) for u in usage] == [("team-l/ops", "mock-half", 3)]
    assert httpx.delete(f"{url}/v1/evals/{eval_id}", headers=ops).status_code == 200
