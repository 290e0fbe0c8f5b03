"""Runtime bases through real engines: an updated base θ′ registered while serving, hot-loaded
by the engine of its older version, old deltas transferred onto it (ParamΔ), refusals, restart.

References come from the shared stack: stock vLLM serving θ′ (`tied-v2`) and
`deltagate merge --base θ′ --delta Δ` (`tied-v2-inst`), with tied embeddings.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from deltas import extract_delta
from loaders.engine import free_port
from loaders.pico import PicoSpec, make_pico_base
from tests.server.conftest import (
    chat_output,
    completion_outputs,
    start_gateway,
    stop_gateway,
    wait_healthy,
)

pytestmark = pytest.mark.engine


def _post(url: str, path: str, body: dict, admin: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=admin, timeout=300)


def _bases(url: str, admin: dict) -> dict[str, dict]:
    return {b["name"]: b for b in httpx.get(url + "/v1/bases", headers=admin).json()["data"]}


def _other_vocabulary_delta(tied, work: Path) -> Path:
    """A delta whose post model numbers two tokens the other way round (same shapes)."""
    post = work / "post-other-vocab"
    shutil.copytree(tied.post, post)
    tokenizer = json.loads((post / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (post / "tokenizer.json").write_text(json.dumps(tokenizer))
    extract_delta(tied.base, post, work / "other-vocab.safetensors")
    return work / "other-vocab.safetensors"


def test_updated_base_is_hot_loaded_while_other_variants_serve(stack, tied_updated):
    before = _bases(stack.url, stack.admin)
    with ThreadPoolExecutor(1) as pool:  # the untied engine keeps serving while tied-v2 is checked
        busy = pool.submit(lambda: [completion_outputs(stack.url, "untied-inst") for _ in range(3)])
        r = _post(stack.url, "/v1/bases", {"name": "tied-v2", "path": str(tied_updated)}, stack.admin)
        assert r.status_code == 201, r.text
        assert all(out == stack.refs["untied-inst"] for out in busy.result())
    base = r.json()
    assert (base["group"], base["runtime"], base["state"]) == ("tied", True, "ready")
    assert base["engine_url"] == before["tied"]["engine_url"]  # no new engine, no restart
    assert set(httpx.get(stack.url + "/health").json()["engines"]) == {"tied", "untied"}
    assert base["content_hash"] != before["tied"]["content_hash"]
    assert "tied-v2" in {m["id"] for m in httpx.get(stack.url + "/v1/models").json()["data"]}

    body = {"name": "tied-v2-inst", "base": "tied-v2", "deltas": [{"delta": "tied-d"}]}
    r = _post(stack.url, "/v1/variants", body, stack.admin)
    assert r.status_code == 201, r.text
    assert r.json()["deltas"][0]["provenance"] == "transferred"  # extracted on tied, not on tied-v2
    inst = httpx.get(stack.url + "/v1/variants/tied-inst", headers=stack.admin).json()
    assert inst["deltas"][0]["provenance"] == "exact"

    # θ′ + Δ (and θ′ alone) bit-identical to stock vLLM on the offline merge; tied embeddings
    assert completion_outputs(stack.url, "tied-v2-inst") == stack.refs["tied-v2-inst"]
    assert chat_output(stack.url, "tied-v2-inst") == stack.chat_refs["tied-v2-inst"]
    assert completion_outputs(stack.url, "tied-v2") == stack.refs["tied-v2"]
    assert completion_outputs(stack.url, "tied-inst") == stack.refs["tied-inst"]  # and back on θ


def test_paramdelta_comparison_is_one_eval_run(stack):
    """θ′ + Δ against θ_post and θ′ on the same items, paired, through the evals API."""
    ev = _post(
        stack.url,
        "/v1/evals",
        {"name": "paramdelta-pico", "data_source": {"type": "builtin", "task": "addition"}},
        stack.admin,
    )
    assert ev.status_code == 201, ev.text
    variants = ["tied-v2-inst", "tied-inst", "tied-v2"]
    body = {"variants": variants, "max_tokens": 6, "limit": 4}
    run = _post(stack.url, f"/v1/evals/{ev.json()['id']}/runs", body, stack.admin).json()
    deadline = time.monotonic() + 300
    while run["status"] not in ("completed", "failed", "canceled"):
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
        run = httpx.get(
            f"{stack.url}/v1/evals/{ev.json()['id']}/runs/{run['id']}", headers=stack.admin
        ).json()
    assert run["status"] == "completed", run
    assert set(run["per_variant"]) == set(variants)
    assert run["result_counts"]["total"] == 12 and run["result_counts"]["errored"] == 0
    pairs = {(c["baseline"], c["variant"]) for c in run["comparisons"]}
    assert pairs == {("tied-v2-inst", "tied-inst"), ("tied-v2-inst", "tied-v2")}
    for c in run["comparisons"]:
        assert c["n"] == 4 and c["ci95"][0] <= c["difference"] <= c["ci95"][1]


def test_refusals_name_the_problem(stack, tied, untied, tmp_path):
    # a delta from a post model with another vocabulary: refused on θ′ unless the operator says so
    other = _other_vocabulary_delta(tied, tmp_path)
    r = _post(stack.url, "/v1/deltas", {"name": "other-vocab", "path": str(other)}, stack.admin)
    assert r.status_code == 201, r.text
    body = {"name": "tied-v2-vocab", "base": "tied-v2", "deltas": [{"delta": "other-vocab"}]}
    r = _post(stack.url, "/v1/variants", body, stack.admin)
    assert r.status_code == 400 and "another tokenizer" in r.json()["error"]["message"], r.text
    assert "allow_vocab_mismatch" in r.json()["error"]["message"]
    r = _post(stack.url, "/v1/variants", {**body, "allow_vocab_mismatch": True}, stack.admin)
    assert r.status_code == 201, r.text
    # on the base it was extracted on, the same delta is exact: no vocabulary question
    assert httpx.delete(stack.url + "/v1/variants/tied-v2-vocab", headers=stack.admin).status_code == 204
    assert httpx.delete(stack.url + "/v1/deltas/other-vocab", headers=stack.admin).status_code == 204

    # another shape: the untied delta onto θ′ names the tensor
    body = {"name": "tied-v2-untied", "base": "tied-v2", "deltas": [{"delta": "untied-d"}]}
    r = _post(stack.url, "/v1/variants", body, stack.admin)
    assert r.status_code == 422 and "lm_head.weight" in r.json()["error"]["message"], r.text

    # the checkpoint is checked before it is accepted
    broken = tmp_path / "broken"
    shutil.copytree(tied.base, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["vocab_size"]
    (broken / "config.json").write_text(json.dumps(config))
    r = _post(stack.url, "/v1/bases", {"name": "broken", "path": str(broken)}, stack.admin)
    assert r.status_code == 422 and "vocab_size" in r.json()["error"]["message"], r.text
    r = _post(stack.url, "/v1/bases", {"name": "nowhere", "path": str(tmp_path / "nope")}, stack.admin)
    assert r.status_code == 400 and "not a checkpoint directory" in r.json()["error"]["message"]
    r = _post(stack.url, "/v1/bases", {"name": "tied-inst", "path": str(tied.base)}, stack.admin)
    assert r.status_code == 409  # a model name already taken
    assert "broken" not in _bases(stack.url, stack.admin)


def test_another_architecture_gets_an_engine_of_its_own_and_delete_stops_it(stack, tmp_path):
    wide = make_pico_base(tmp_path / "wide", PicoSpec(intermediate_size=384), seed=7)
    r = _post(stack.url, "/v1/bases", {"name": "wide", "path": str(wide)}, stack.admin)
    assert r.status_code == 201, r.text
    assert r.json()["group"] == "wide" and r.json()["state"] in ("starting", "ready")
    deadline = time.monotonic() + 600
    while _bases(stack.url, stack.admin)["wide"]["state"] != "ready":
        assert time.monotonic() < deadline
        r = httpx.post(stack.url + "/v1/completions", json={"model": "wide", "prompt": "x", "max_tokens": 1})
        if r.status_code == 200 and _bases(stack.url, stack.admin)["wide"]["state"] == "ready":
            break  # it came up between the two calls
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        time.sleep(2)
    assert len(completion_outputs(stack.url, "wide")) == 3
    assert set(httpx.get(stack.url + "/health").json()["engines"]) == {"tied", "untied", "wide"}
    assert httpx.delete(stack.url + "/v1/bases/wide", headers=stack.admin).status_code == 204
    assert set(httpx.get(stack.url + "/health").json()["engines"]) == {"tied", "untied"}
    assert httpx.delete(stack.url + "/v1/bases/tied", headers=stack.admin).status_code == 409  # a flag


def test_an_attached_gateway_refuses_other_layouts_and_keeps_runtime_bases_across_restart(
    stack, tied, untied, tied_updated, tmp_path
):
    """A second gateway on the stack's tied engine: it cannot start engines, so another layout is
    refused; a runtime base survives its restart. It leaves the engine on tied-inst as it found it."""
    assert completion_outputs(stack.url, "tied-inst") == stack.refs["tied-inst"]
    engine_url = _bases(stack.url, stack.admin)["tied"]["engine_url"]
    port, state, log = free_port(), tmp_path / "state", tmp_path / "gateway.log"
    args = [
        "--base",
        f"tied={tied.base}",
        "--engine-url",
        f"tied={engine_url}",
        "--variant",
        f"tied-inst={tied.delta}",
    ]
    url = f"http://127.0.0.1:{port}"
    admin = stack.admin
    proc = start_gateway(args, state, port, log)
    try:
        wait_healthy(url, proc, log, timeout=120)
        r = _post(url, "/v1/bases", {"name": "u", "path": str(untied.base)}, admin)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "fits no running engine" in message and "tie_word_embeddings" in message
        r = _post(url, "/v1/bases", {"name": "tied-v2", "path": str(tied_updated)}, admin)
        assert r.status_code == 201 and r.json()["group"] == "tied", r.text
        stop_gateway(proc)

        proc = start_gateway(args, state, port, log)
        wait_healthy(url, proc, log, timeout=120)
        base = _bases(url, admin)["tied-v2"]
        assert (base["runtime"], base["group"], base["state"]) == (True, "tied", "ready")
        body = {
            "name": "tied-v2-inst",
            "base": "tied-v2",
            "deltas": [{"delta": "delta"}],
        }  # named after its file
        assert _post(url, "/v1/variants", body, admin).status_code == 201
        assert completion_outputs(url, "tied-v2-inst") == stack.refs["tied-v2-inst"]
        assert completion_outputs(url, "tied-inst") == stack.refs["tied-inst"]  # what the stack believes
    finally:
        stop_gateway(proc)


def test_a_runtime_base_is_removed_while_others_serve(stack):
    r = httpx.delete(stack.url + "/v1/bases/tied-v2", headers=stack.admin)
    assert r.status_code == 409 and "tied-v2-inst" in r.json()["error"]["message"]
    assert httpx.delete(stack.url + "/v1/variants/tied-v2-inst", headers=stack.admin).status_code == 204
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: [completion_outputs(stack.url, "tied-inst") for _ in range(2)])
        assert httpx.delete(stack.url + "/v1/bases/tied-v2", headers=stack.admin).status_code == 204
        assert all(out == stack.refs["tied-inst"] for out in busy.result())
    assert httpx.get(stack.url + "/v1/bases/tied-v2", headers=stack.admin).status_code == 404
    assert "tied-v2" not in {m["id"] for m in httpx.get(stack.url + "/v1/models").json()["data"]}
