"""schemathesis over every route of a real gateway (uvicorn, mock engine), with realistic values.

Random names would only reach the 404 paths, so path parameters and body fields that name things
(models, deltas, variants, bases, evals, runs) are drawn mostly from what is registered; credentials
are drawn from none, wrong, inference key and admin token. Any answer: no 5xx but the documented
502/503, errors in the one envelope, no server path in them. Bounded (`max_examples`) for CI.
"""

from __future__ import annotations

import subprocess
import sys
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
from tests.server.conftest import ADMIN, start_gateway, stop_gateway, wait_healthy

KEY = "fuzz-inference-key"
REALISTIC: dict[str, list[str]] = {}  # filled by the fixture: field name -> registered values


@dataclass
class FuzzTarget:
    url: str
    state_dir: Path


@pytest.fixture(scope="module")
def fuzz_target(tied, tmp_path_factory) -> FuzzTarget:
    work = tmp_path_factory.mktemp("fuzz")
    engine_port, port = free_port(), free_port()
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loaders.mock_engine",
            "--port",
            str(engine_port),
            "--served-name",
            "pico",
            "--tokens-per-second",
            "0",
        ],
        stdout=open(work / "mock.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    args = [
        "--base",
        f"pico={tied.base}",
        "--engine-url",
        f"pico=http://127.0.0.1:{engine_port}",
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
        r = httpx.post(
            url + "/v1/evals",
            headers=admin,
            json={
                "name": "fuzz",
                "data_source": {"type": "jsonl", "content": '{"q": "1"}\n{"q": "2"}'},
                "prompt": "{{item.q}}",
                "testing_criteria": [
                    {
                        "type": "string_check",
                        "name": "any",
                        "input": "{{sample.output_text}}",
                        "reference": "w",
                        "operation": "like",
                    }
                ],
            },
        )
        assert r.status_code == 201, r.text
        eval_id = r.json()["id"]
        run = httpx.post(f"{url}/v1/evals/{eval_id}/runs", headers=admin, json={"variants": ["pico"]})
        assert run.status_code == 201, run.text
        REALISTIC.update(
            {
                "model": ["pico", "pico-inst", "pico-half"],
                "name": ["pico-inst", "delta", "pico", "fresh-name"],
                "delta": ["delta"],
                "base": ["pico"],
                "eval_id": [eval_id],
                "run_id": [run.json()["id"]],
                "variants": ["pico", "pico-inst"],
                "path": [str(tied.delta), str(tied.base), "/nonexistent"],
            }
        )
        yield FuzzTarget(url, work / "state")
    finally:
        stop_gateway(proc)
        stop_gateway(mock)


def _realistic(key: str, value):
    """A strategy: mostly a registered value for `key`, sometimes what schemathesis drew."""
    choices = REALISTIC.get(key)
    if not choices:
        return st.just(value)
    if key == "variants":
        return st.lists(st.sampled_from(choices), min_size=1, max_size=3) | st.just(value)
    return st.sampled_from(choices) | st.just(value)


@schemathesis.hook
def flatmap_path_parameters(ctx, path_parameters):
    if not path_parameters:
        return st.just(path_parameters)
    return st.fixed_dictionaries({k: _realistic(k, v) for k, v in path_parameters.items()})


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
CREDENTIALS = [None, "Bearer wrong", f"Bearer {KEY}", f"Bearer {ADMIN}"]


def _check(case, target: FuzzTarget, auth: str | None) -> None:
    response = case.call(headers={"Authorization": auth} if auth else {}, timeout=60)
    text = response.text
    assert response.status_code < 500 or response.status_code in (502, 503), (case.method, case.path, text)
    if response.status_code >= 400:
        assert response.headers.get("content-type", [""])[0].startswith("application/json"), text
        assert "message" in response.json()["error"], text
        assert str(target.state_dir.resolve()) not in text, text


def test_no_server_errors_and_no_leaks(fuzz_target):
    """Every operation, valid (positive) and invalid (negative) inputs, every kind of credential."""
    schema = schemathesis.openapi.from_url(fuzz_target.url + "/openapi.json")
    failures, cases = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @BOUNDED
            @given(case=operation.as_strategy(generation_mode=mode), auth=st.sampled_from(CREDENTIALS))
            def run(case, auth):
                nonlocal cases
                cases += 1
                _check(case, fuzz_target, auth)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                continue
            except Exception as exc:  # collect every operation's failure, not only the first
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    print(f"schemathesis: {cases} cases")
    assert cases > 300
    assert not failures, "\n".join(failures)
