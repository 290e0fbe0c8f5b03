"""Compressed deltas and merge methods, served through the gateway, equal stock vLLM on offline merges."""

import httpx
import pytest

from tests.server.conftest import completion_outputs, deltagate

pytestmark = pytest.mark.engine


@pytest.mark.parametrize(
    "variant",
    [
        "tied-ties",  # YAML recipe on the command line: TIES over an int4+zstd artifact and an exact one
        "tied-dare",  # dare_ties defined through the admin API
    ],
)
def test_variant_is_bit_identical_to_offline_merge(stack, variant):
    assert completion_outputs(stack.url, variant) == stack.refs[variant]


def test_methods_and_codecs_change_the_weights(stack):
    outputs = {v: str(stack.refs[v]) for v in ("tied-inst", "tied-ties", "tied-dare", "tied-mix")}
    assert len(set(outputs.values())) == len(outputs)


def test_delta_listing_shows_codecs(stack, tied, tmp_path):
    q = tmp_path / "q.safetensors"
    deltagate("compress", tied.delta, "-o", q, "--codec", "int8")
    r = httpx.post(f"{stack.url}/v1/deltas", json={"name": "tied-q8", "path": str(q)}, headers=stack.admin)
    assert r.status_code == 201, r.text
    assert r.json()["encodings"] == ["dense", "int8"] and r.json()["lossless"] is False
    exact = httpx.get(f"{stack.url}/v1/deltas/tied-d", headers=stack.admin).json()
    assert exact["encodings"] == ["dense"] and exact["lossless"] is True


def test_variant_listing_shows_the_method(stack):
    r = httpx.get(f"{stack.url}/v1/variants/tied-dare", headers=stack.admin)
    assert r.status_code == 200
    body = r.json()
    assert body["method"] == "dare_ties" and body["seed"] == 5 and body["deltas"][0]["density"] == 0.5


@pytest.mark.parametrize(
    "patch,problem",
    [
        ({"method": "slerp"}, "method"),
        ({"deltas": [{"delta": "tied-d", "alpha": 1.0, "density": 0.0}]}, "density"),
        ({"deltas": [{"delta": "tied-d", "alpha": 1.0, "density": 1.5}]}, "density"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_merge_settings_are_refused(stack, patch, problem):
    body = {"name": "bad-merge", "base": "tied", "deltas": [{"delta": "tied-d"}], "method": "ties", **patch}
    r = httpx.post(f"{stack.url}/v1/variants", json=body, headers=stack.admin)
    assert r.status_code == 422 and problem in r.json()["error"]["message"]


def test_corrupt_compressed_upload_is_refused_and_serving_continues(stack, tied, tmp_path):
    good = tmp_path / "int8.safetensors"
    deltagate("compress", tied.delta, "-o", good, "--codec", "int8")
    data = bytearray(good.read_bytes())
    data[-64] ^= 0x5A  # flips bits inside the last payload
    headers = {**stack.admin, "Content-Type": "application/octet-stream"}
    r = httpx.post(f"{stack.url}/v1/deltas?name=bad-int8", content=bytes(data), headers=headers, timeout=60)
    assert r.status_code == 422 and "checksum" in r.json()["error"]["message"]
    truncated = bytes(data[: len(data) // 2])
    r = httpx.post(f"{stack.url}/v1/deltas?name=cut-int8", content=truncated, headers=headers, timeout=60)
    assert r.status_code == 422 and "truncated" in r.json()["error"]["message"]
    assert completion_outputs(stack.url, "tied-ties") == stack.refs["tied-ties"]
