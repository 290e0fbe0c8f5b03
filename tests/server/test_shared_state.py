"""Several gateways on one state database (a real PostgreSQL) and one artifact store (a real
S3-compatible server, moto): each gateway with engines of its own (mock engines: what is tested is
the state, not the weights), every registration and eval seen by all of them; kill -9 of a gateway
and of the database."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from loaders.engine import free_port
from loaders.mock_engine import weights_tag
from tests.server.conftest import (
    ADMIN,
    jsonl_eval,
    start_gateway,
    start_mock_engine,
    stop_gateway,
    wait_healthy,
)

AUTH = {"Authorization": f"Bearer {ADMIN}"}
POLL = 0.5  # --state-poll-seconds of these gateways
LEASE = 3.0  # their eval runs' lease (DELTAGATE_RUN_LEASE_SECONDS)


@dataclass
class Front:
    """One gateway process and what restarts it."""

    url: str
    proc: object
    args: list
    work: Path
    port: int

    def restart(self) -> None:
        self.proc = start_gateway(
            self.args,
            self.work / "state",
            self.port,
            self.work / "gateway.log",
            env={"DELTAGATE_RUN_LEASE_SECONDS": str(LEASE)},
        )
        wait_healthy(self.url, self.proc, self.work / "gateway.log", timeout=120)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fronts(tied, postgres, s3_server, tmp_path_factory):
    """Gateways A and B, each attached to its own mock engine, sharing PostgreSQL and the S3 store."""
    engines, fronts = [], []
    try:
        for name in ("a", "b"):
            work = tmp_path_factory.mktemp(f"front-{name}")
            engine, engine_url = start_mock_engine(work, "pico", 50)
            engines.append(engine)
            port = free_port()
            args = [
                "--base",
                f"pico={tied.base}",
                "--engine-url",
                f"pico={engine_url}",
                "--state-db",
                postgres.url,
                "--state-poll-seconds",
                str(POLL),
                "--artifact-store",
                f"s3://{s3_server.bucket}/shared",
            ]
            front = Front(f"http://127.0.0.1:{port}", None, args, work, port)
            front.restart()
            fronts.append(front)
        yield fronts
    finally:
        for front in fronts:
            stop_gateway(front.proc)
        for engine in engines:
            stop_gateway(engine)


def _complete(front: Front, model: str) -> httpx.Response:
    return httpx.post(
        f"{front.url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}, timeout=30
    )


def _usage(front: Front, project: str) -> list[dict]:
    return httpx.get(f"{front.url}/v1/usage", params={"project": project}, headers=AUTH).json()["data"]


def _models(front: Front) -> set[str]:
    return {m["id"] for m in httpx.get(f"{front.url}/v1/models").json()["data"]}


def test_what_one_gateway_registers_every_gateway_serves(fronts, tied):
    a, b = fronts
    r = httpx.post(
        f"{a.url}/v1/deltas?name=shared-d",
        content=tied.delta.read_bytes(),
        timeout=60,
        headers={**AUTH, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["path"].startswith("s3://")  # uploaded through A, in the store B reads
    body = {"name": "shared-inst", "base": "pico", "deltas": [{"delta": "shared-d", "alpha": 1.0}]}
    assert httpx.post(f"{a.url}/v1/variants", json=body, headers=AUTH).status_code == 201
    # B learns of it when a request names it (pull), then serves it on its own engine
    answer_b, answer_a = _complete(b, "shared-inst"), _complete(a, "shared-inst")
    assert answer_b.status_code == 200, answer_b.text
    assert answer_b.json()["model"] == "shared-inst"
    assert answer_b.json()["choices"][0]["text"] == answer_a.json()["choices"][0]["text"]
    assert answer_b.json()["choices"][0]["text"].strip().split()[0] != weights_tag(None)  # not the base
    assert "shared-inst" in _models(b)


def test_a_deletion_is_seen_by_the_others_within_the_poll(fronts, tied):
    a, b = fronts
    body = {"name": "short-lived", "base": "pico", "deltas": [{"delta": "shared-d", "alpha": 0.5}]}
    assert httpx.post(f"{b.url}/v1/variants", json=body, headers=AUTH).status_code == 201
    assert _complete(a, "short-lived").status_code == 200
    assert httpx.delete(f"{b.url}/v1/variants/short-lived", headers=AUTH).status_code == 204
    gone = time.monotonic()
    while _complete(a, "short-lived").status_code != 404:
        assert time.monotonic() - gone < 4 * POLL + 2, "A still serves a variant B deleted"
        time.sleep(0.05)
    assert "short-lived" not in _models(a)


def test_concurrent_writes_through_both_gateways_lose_nothing(fronts):
    a, b = fronts
    codes: dict[str, list[int]] = {"same": [], "distinct": []}

    def define(front: Front, name: str, kind: str) -> None:
        body = {"name": name, "base": "pico", "deltas": [{"delta": "shared-d", "alpha": 0.25}]}
        r = httpx.post(f"{front.url}/v1/variants", json=body, headers=AUTH, timeout=30)
        codes[kind].append(r.status_code)

    threads = [threading.Thread(target=define, args=(f, "contested", "same")) for f in (a, b, a, b)]
    threads += [
        threading.Thread(target=define, args=(f, f"mine-{i}", "distinct")) for i, f in enumerate([a, b] * 6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes["same"]) == [201, 409, 409, 409]  # one name, one winner
    assert codes["distinct"] == [201] * 12  # compare-and-swap retried: no write lost
    for front in (a, b):
        time.sleep(2 * POLL)
        assert {f"mine-{i}" for i in range(12)} | {"contested"} <= _models(front)


@pytest.mark.parametrize("kind", ["base", "delta", "variant", "alias"])
def test_one_name_has_one_owner_whichever_gateway_each_request_reaches(fronts, tied, kind):
    """The same name registered through A and B at once, for each resource kind: exactly one 201,
    409s for the rest, and both gateways then agree on what the name is (the check is inside the
    registry's compare-and-swap, not before it)."""
    a, b = fronts
    name = f"contested-{kind}"
    delta = {"name": "shared-d", "path": str(tied.delta)}
    shared_d = httpx.post(f"{a.url}/v1/deltas", json=delta, headers=AUTH)
    assert shared_d.status_code in (201, 409), shared_d.text  # (registered by the first test, if it ran)
    request = {
        "base": ("POST", "/v1/bases", {"name": name, "path": str(tied.base)}),
        "delta": ("POST", "/v1/deltas", {"name": name, "path": str(tied.delta)}),
        "variant": (
            "POST",
            "/v1/variants",
            {"name": name, "base": "pico", "deltas": [{"delta": "shared-d"}]},
        ),
        "alias": ("POST", "/v1/aliases", {"name": name, "targets": [{"variant": "pico"}]}),
    }[kind]
    codes: list[int] = []
    starting = threading.Barrier(6)

    def register(front: Front) -> None:
        starting.wait()
        method, path, body = request
        answer = httpx.request(method, f"{front.url}{path}", json=body, headers=AUTH, timeout=120)
        codes.append(answer.status_code)

    threads = [threading.Thread(target=register, args=(f,)) for f in (a, b) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201, 409, 409, 409, 409, 409], codes
    listing = {"base": "/v1/bases", "delta": "/v1/deltas", "variant": "/v1/variants", "alias": "/v1/aliases"}
    for front in (a, b):
        names = [x["name"] for x in httpx.get(f"{front.url}{listing[kind]}", headers=AUTH).json()["data"]]
        assert names.count(name) == 1, (front.url, names)


def _eval_and_run(front: Front, items: int, max_tokens: int) -> tuple[str, str]:
    eval_id = jsonl_eval(front.url, AUTH, "shared", items)
    run = httpx.post(
        f"{front.url}/v1/evals/{eval_id}/runs",
        headers=AUTH,
        json={"variants": ["shared-inst"], "max_tokens": max_tokens, "concurrency": 1},
    ).json()
    return eval_id, run["id"]


def _run(front: Front, eval_id: str, run_id: str) -> dict:
    return httpx.get(f"{front.url}/v1/evals/{eval_id}/runs/{run_id}", headers=AUTH).json()


def test_an_eval_run_is_seen_and_canceled_through_another_gateway(fronts):
    a, b = fronts
    eval_id, run_id = _eval_and_run(a, 40, 10)  # 0.2 s an item on a 50 tok/s mock
    deadline = time.monotonic() + 30
    while _run(b, eval_id, run_id)["progress"]["done"] < 2:  # B reads A's progress
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert httpx.post(f"{b.url}/v1/evals/{eval_id}/runs/{run_id}/cancel", headers=AUTH).status_code == 200
    time.sleep(LEASE)  # A notices at its next renewal (a third of a lease)
    done = _run(a, eval_id, run_id)["progress"]["done"]
    time.sleep(1)
    run = _run(a, eval_id, run_id)
    assert run["status"] == "canceled" and run["progress"]["done"] == done < 40


def test_a_run_whose_gateway_is_killed_is_finished_by_another(fronts):
    a, b = fronts
    eval_id, run_id = _eval_and_run(a, 20, 10)
    deadline = time.monotonic() + 30
    while _run(b, eval_id, run_id)["progress"]["done"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    a.kill9()
    try:
        deadline = time.monotonic() + LEASE * 3 + 30
        while (run := _run(b, eval_id, run_id))["status"] != "completed":
            assert run["status"] in ("queued", "in_progress") and time.monotonic() < deadline, run
            time.sleep(0.2)
        assert run["progress"] == {"done": 20, "total": 20} and run["result_counts"]["passed"] == 20
        items = httpx.get(
            f"{b.url}/v1/evals/{eval_id}/runs/{run_id}/output_items", headers=AUTH, params={"limit": 100}
        ).json()["data"]
        assert len(items) == 20  # taken over where A stopped, nothing graded twice
    finally:
        a.restart()
    assert "shared-inst" in _models(a)  # a restarted gateway has everything registered


def test_a_batch_is_seen_by_every_gateway_and_finished_by_another_when_its_own_is_killed(fronts):
    """Created through the openai SDK on A: B lists and retrieves it and its input file; kill -9 of A
    mid-batch, and B takes it over once A's lease runs out, answering each line once."""
    import io
    import json

    a, b = fronts
    on_a, on_b = client_of(a), client_of(b)
    body = {"model": "shared-inst", "prompt": "x", "max_tokens": 10}  # 0.2 s a line on a 50 tok/s mock
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body} for i in range(30)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    infile = on_a.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    assert on_b.files.content(infile.id).content == data  # the bytes, from the other gateway
    batch = on_a.batches.create(input_file_id=infile.id, endpoint="/v1/completions", completion_window="24h")
    assert on_b.batches.retrieve(batch.id).status == "in_progress"
    assert batch.id in [x.id for x in on_b.batches.list()]
    deadline = time.monotonic() + 30
    while on_b.batches.retrieve(batch.id).request_counts.completed < 5:  # B reads A's progress
        assert time.monotonic() < deadline
        time.sleep(0.1)
    a.kill9()
    try:
        deadline = time.monotonic() + LEASE * 3 + 60
        while (batch := on_b.batches.retrieve(batch.id)).status != "completed":
            assert batch.status in ("in_progress", "finalizing") and time.monotonic() < deadline, batch
            time.sleep(0.2)
        assert batch.request_counts.completed == 30 and batch.request_counts.failed == 0, batch
        out = [json.loads(x) for x in on_b.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == sorted(x["custom_id"] for x in lines)  # each once
        assert "taking over batch" in (b.work / "gateway.log").read_text()
    finally:
        a.restart()
    assert client_of(a).batches.retrieve(batch.id).output_file_id == batch.output_file_id


def client_of(front: Front):
    import openai

    return openai.OpenAI(base_url=f"{front.url}/v1", api_key="none", max_retries=0)


def test_the_database_killed_keeps_serving_and_refuses_writes_clearly(fronts, postgres):
    a, b = fronts
    postgres.kill()
    try:
        assert _complete(a, "shared-inst").status_code == 200  # what is known keeps serving
        body = {"name": "during-outage", "base": "pico", "deltas": [{"delta": "shared-d"}]}
        r = httpx.post(f"{b.url}/v1/variants", json=body, headers=AUTH, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        message = r.json()["error"]["message"]
        assert "state database" in message and "password" not in message
    finally:
        postgres.start()
    deadline = time.monotonic() + 30
    while httpx.post(f"{b.url}/v1/variants", json=body, headers=AUTH, timeout=30).status_code != 201:
        assert time.monotonic() < deadline, "writes did not come back with the database"
        time.sleep(0.5)
    assert _complete(a, "during-outage").status_code == 200


def test_an_alias_moved_through_one_gateway_is_followed_by_the_other_within_the_poll(fronts, tied):
    """Defined on A, served by B at once (pulled by name); moved on B, A follows within the poll."""
    a, b = fronts
    body = {"name": "front-inst", "base": "pico", "deltas": [{"delta": "shared-d", "alpha": 1.0}]}
    assert httpx.post(f"{a.url}/v1/variants", json=body, headers=AUTH).status_code in (201, 409)
    one = {"targets": [{"variant": "front-inst"}]}
    assert httpx.put(f"{a.url}/v1/aliases/front", json=one, headers=AUTH).status_code == 200
    answer = _complete(b, "front")
    assert answer.status_code == 200 and answer.headers["x-deltagate-variant"] == "front-inst", answer.text
    assert answer.json()["model"] == "front"
    base = {"targets": [{"variant": "pico"}]}
    assert httpx.put(f"{b.url}/v1/aliases/front", json=base, headers=AUTH).status_code == 200
    moved = time.monotonic()
    while (r := _complete(a, "front")).headers["x-deltagate-variant"] != "pico":
        assert time.monotonic() - moved < 4 * POLL + 2, "A still routes the alias to its old target"
        time.sleep(0.05)
    assert r.json()["choices"][0]["text"].split()[0] == weights_tag(None)
    assert httpx.delete(f"{a.url}/v1/aliases/front", headers=AUTH).status_code == 204


# Last in this module: once a key exists on the shared database, every inference call needs one.
def test_keys_revokes_and_rate_limits_hold_across_gateways(fronts):
    """A key made through A works on B; revoked through B, A refuses it within the poll; a
    requests-per-minute limit holds over both gateways within one poll of admissions each (the
    stated tolerance: server/quota.py), and the usage of both is summed."""
    a, b = fronts
    r = httpx.post(
        f"{a.url}/v1/projects/team/keys",
        json={"name": "shared", "models": ["pico"], "limits": {"rpm": 6}},
        headers=AUTH,
    )
    assert r.status_code == 201, r.text
    key = r.json()
    auth = {"Authorization": f"Bearer {key['secret']}"}

    def ask(front: Front) -> httpx.Response:
        body = {"model": "pico", "prompt": "x", "max_tokens": 1}
        return httpx.post(f"{front.url}/v1/completions", json=body, headers=auth, timeout=30)

    # B reads the new key within its poll; until then it is open (no key made, as far as it knows) and
    # answers any token as an anonymous caller: wait until it refuses one it does not know
    made = time.monotonic()
    stranger = {"Authorization": "Bearer not-a-key"}
    while httpx.get(f"{b.url}/v1/models", headers=stranger).status_code != 401:
        assert time.monotonic() - made < 4 * POLL + 2, "B did not read the new key within its poll"
        time.sleep(0.05)
    first = ask(b)
    assert first.status_code == 200, first.text
    # 16 requests alternating between the gateways, one every POLL / 2: 6 a minute allowed in all
    answers = [first]
    for i in range(15):
        time.sleep(POLL / 2)
        answers.append(ask((a, b)[i % 2]))
    ok = sum(r.status_code == 200 for r in answers)
    assert {r.status_code for r in answers} == {200, 429}
    assert 6 <= ok <= 6 + 2, [r.status_code for r in answers]  # each gateway may miss the other's last poll
    written = time.monotonic()  # A writes its counts every poll (later under a loaded machine)
    while sum(u["requests"] for u in _usage(b, "team")) != ok:
        assert time.monotonic() - written < 10 * POLL + 5, (_usage(b, "team"), ok)
        time.sleep(POLL / 2)
    assert httpx.delete(f"{b.url}/v1/keys/{key['id']}", headers=AUTH).status_code == 200
    revoked = time.monotonic()
    while (r := _complete(a, "pico")).status_code != 401 or ask(a).status_code != 401:
        assert time.monotonic() - revoked < 4 * POLL + 2, "A still takes the revoked key"
        time.sleep(0.05)
