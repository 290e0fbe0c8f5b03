"""schemathesis over every route of a real gateway (uvicorn, mock engine), with realistic values.

Random names would only reach the 404 paths, so path parameters and body fields that name things
(models, deltas, variants, bases, aliases, evals, runs, files, batches) are drawn mostly from what is
registered; credentials
are drawn from none, wrong, inference key and admin token. Any answer: no 5xx but the documented
502/503, errors in the one envelope, no server path in them. Bounded (`max_examples`) for CI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from loaders.engine import free_port
from tests.server.conftest import (
    ADMIN,
    jsonl_eval,
    start_gateway,
    start_mock_engine,
    stop_gateway,
    wait_healthy,
)

KEY = "fuzz-inference-key"
REALISTIC: dict[str, list[str]] = {}  # filled by the fixture: field name -> registered values


@dataclass
class FuzzTarget:
    url: str
    state_dir: Path


@pytest.fixture(scope="module")
def fuzz_target(tied, tmp_path_factory) -> FuzzTarget:
    work = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    mock, engine_url = start_mock_engine(work, "pico", 0)
    args = [
        "--base",
        f"pico={tied.base}",
        "--engine-url",
        f"pico={engine_url}",
        "--variant",
        f"pico-inst={tied.delta}",
        "--variant",
        f"pico-half={tied.delta}:0.5",
        "--api-key",
        KEY,
    ]
    proc = start_gateway(args, work / "state", port, work / "gateway.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, work / "gateway.log", timeout=120)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        eval_id = jsonl_eval(url, admin, "fuzz", 2)
        run = httpx.post(f"{url}/v1/evals/{eval_id}/runs", headers=admin, json={"variants": ["pico"]})
        assert run.status_code == 201, run.text
        alias = httpx.post(
            url + "/v1/aliases", headers=admin, json={"name": "chat", "targets": [{"variant": "pico-inst"}]}
        )
        assert alias.status_code == 201, alias.text
        line = {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "pico", "prompt": "x"},
        }
        infile = httpx.post(
            url + "/v1/files",
            headers={"Authorization": f"Bearer {KEY}"},
            files={"file": ("in.jsonl", (json.dumps(line) + "\n").encode())},
            data={"purpose": "batch"},
        )
        assert infile.status_code == 200, infile.text
        body = {"input_file_id": infile.json()["id"], "endpoint": "/v1/completions"}
        batch = httpx.post(url + "/v1/batches", headers={"Authorization": f"Bearer {KEY}"}, json=body)
        assert batch.status_code == 200, batch.text
        key = httpx.post(url + "/v1/projects/fuzz/keys", headers=admin, json={"name": "k", "models": ["*"]})
        assert key.status_code == 201, key.text
        REALISTIC.update(
            {
                "model": ["pico", "pico-inst", "pico-half", "chat"],
                "name": ["pico-inst", "delta", "pico", "chat", "fresh-name"],
                "file_id": [infile.json()["id"]],
                "input_file_id": [infile.json()["id"]],
                "batch_id": [batch.json()["id"]],
                "engine": ["pico"],
                "name:bases": ["pico"],
                "name:deltas": ["delta"],
                "name:variants": ["pico-inst", "pico-half"],
                "name:aliases": ["chat"],
                "delta": ["delta"],
                "base": ["pico"],
                "eval_id": [eval_id],
                "run_id": [run.json()["id"]],
                "key_id": [key.json()["id"]],
                "project": ["fuzz"],
                "variants": ["pico", "pico-inst"],
                "path": [str(tied.delta), str(tied.base), "/nonexistent"],
            }
        )
        yield FuzzTarget(url, work / "state")
    finally:
        stop_gateway(proc)
        stop_gateway(mock)


def _realistic(key: str, value, path: str = ""):
    """A strategy: mostly (3 in 4) a registered value for `key` (a name: of the kind `path` is
    about), sometimes what schemathesis drew."""
    choices = REALISTIC.get(key)
    if key == "name":
        kind = next((k for k in NAMED if f"/{k}/" in path), None)
        choices = REALISTIC[f"name:{kind}"] if kind else choices
    if not choices:
        return st.just(value)
    if key == "variants":
        return st.lists(st.sampled_from(choices), min_size=1, max_size=3) | st.just(value)
    drawn = st.sampled_from(choices)
    return st.one_of(drawn, drawn, drawn, st.just(value))


NAMED = ("bases", "deltas", "variants", "aliases")


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    if not path_parameters:
        return st.just(path_parameters)
    path = ctx.operation.path
    return st.fixed_dictionaries({k: _realistic(k, v, path) for k, v in path_parameters.items()})


@schemathesis.hook
def flatmap_body(ctx, body):
    if not isinstance(body, dict):
        return st.just(body)
    fields = {k: _realistic(k, v) for k, v in body.items()}
    if isinstance(body.get("deltas"), list):  # variant bodies: terms naming a registered delta
        term = st.fixed_dictionaries(
            {"delta": st.sampled_from(REALISTIC["delta"])}, optional={"alpha": st.floats(-2, 2)}
        )
        fields["deltas"] = st.lists(term, min_size=1, max_size=2) | st.just(body["deltas"])
    if "model" in body or ctx.operation.path.endswith("completions"):
        fields["model"] = _realistic("model", body.get("model"))
        fields["max_tokens"] = st.integers(-1, 8) | st.just(body.get("max_tokens"))  # bounded: CI time
    return st.fixed_dictionaries(fields)


BOUNDED = settings(
    max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)
# Half the cases carry a valid credential (the inference key or the admin token), half none or a wrong one.
CREDENTIALS = st.sampled_from([f"Bearer {KEY}", f"Bearer {ADMIN}"]) | st.sampled_from([None, "Bearer wrong"])


def _check(case, target: FuzzTarget, auth: str | None) -> int:
    response = case.call(headers={"Authorization": auth} if auth else {}, timeout=60)
    text = response.text
    assert response.status_code < 500 or response.status_code in (502, 503), (case.method, case.path, text)
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), text
        assert "message" in response.json()["error"], text
        assert str(target.state_dir.resolve()) not in text, text
    return response.status_code


def test_no_server_errors_and_no_leaks(fuzz_target):
    """Every operation, valid (positive) and invalid (negative) inputs, every kind of credential."""
    schema = schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")
    failures, cases = [], 0
    answers: dict[str, set[int]] = {}  # operation -> the statuses it answered

    # Deletions last, the innermost first (a run before its eval): the names they remove are what
    # every other operation is fuzzed with.
    def order(operation) -> tuple[bool, int]:
        deletes = operation.method.upper() == "DELETE"
        return deletes, -operation.path.count("/") if deletes else 0

    operations = sorted((r.ok() for r in schema.get_all_operations()), key=order)
    for operation in operations:
        current = f"{operation.method.upper()} {operation.path}"
        answers[current] = set()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @BOUNDED
            @given(case=operation.as_strategy(generation_mode=mode), auth=CREDENTIALS)
            def run(case, auth):
                nonlocal cases
                cases += 1
                answers[current].add(_check(case, fuzz_target, auth))  # noqa: B023 (run in this iteration)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                continue
            except Exception as exc:  # collect every operation's failure, not only the first
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    only_404 = sorted(op for op, statuses in answers.items() if statuses <= {401, 404})
    print(f"schemathesis: {cases} cases over {len(answers)} operations; never past a 404: {only_404}")
    assert cases > 300
    assert not failures, "\n".join(failures)
    # Registered names reach every operation's own code, but for what this gateway holds none of: a
    # stored response (no --responses-store), a rebase, an eval run's output item.
    assert all(any(k in op for k in ("{response_id}", "{rebase_id}", "{item_id}")) for op in only_404), (
        only_404
    )
