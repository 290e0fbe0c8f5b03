"""Bad input gets a clear 4xx, and the resident variant keeps serving afterwards."""

import json
import os
import shutil

import httpx
import openai
import pytest
from safetensors import safe_open

from deltas import extract_delta
from deltas.artifact import payload_sha256
from deltas.manifest import MANIFEST_KEY, DeltaManifest
from deltas.stream_writer import StreamingSafetensorsWriter
from loaders.pico import PicoSpec, make_pico_base, make_pico_post
from tests.server.conftest import completion_outputs

pytestmark = pytest.mark.engine


@pytest.fixture()
def resident(stack):
    """Make tied-inst resident; after the test it must still answer exactly."""
    assert completion_outputs(stack.url, "tied-inst") == stack.refs["tied-inst"]
    yield
    assert completion_outputs(stack.url, "tied-inst") == stack.refs["tied-inst"]


def _register(stack, name, path):
    return httpx.post(f"{stack.url}/v1/deltas", json={"name": name, "path": str(path)}, headers=stack.admin)


def _variant(stack, name, delta, base="tied"):
    body = {"name": name, "base": base, "deltas": [{"delta": delta, "alpha": 1.0}]}
    return httpx.post(f"{stack.url}/v1/variants", json=body, headers=stack.admin)


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]["message"]


def test_wrong_shape_delta_is_refused_at_variant_definition(stack, resident, tmp_path):
    base = make_pico_base(tmp_path / "b", PicoSpec(intermediate_size=192), seed=0)
    post = make_pico_post(base, tmp_path / "p", seed=1)
    extract_delta(base, post, tmp_path / "wide.safetensors")
    assert _register(stack, "wide", tmp_path / "wide.safetensors").status_code == 201
    msg = _error(_variant(stack, "wide-v", "wide"), 422)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "[128, 256]" in msg
    assert "wide-v" not in {m["id"] for m in httpx.get(stack.url + "/v1/models").json()["data"]}


def test_wrong_architecture_is_refused(stack, resident, untied, tmp_path):
    other = tmp_path / "mistral"
    for which in ("base", "post"):
        shutil.copytree(getattr(untied, which), other / which)
        cfg = json.loads((other / which / "config.json").read_text())
        cfg["architectures"] = ["MistralForCausalLM"]
        (other / which / "config.json").write_text(json.dumps(cfg))
    extract_delta(other / "base", other / "post", tmp_path / "m.safetensors")
    assert _register(stack, "mistral", tmp_path / "m.safetensors").status_code == 201
    assert "MistralForCausalLM" in _error(_variant(stack, "mistral-v", "mistral"), 422)


def test_truncated_upload_is_refused_and_not_stored(stack, resident, tied):
    data = tied.delta.read_bytes()[:-500]
    r = httpx.post(
        f"{stack.url}/v1/deltas?name=cut",
        content=data,
        headers={**stack.admin, "Content-Type": "application/octet-stream"},
    )
    assert "truncated" in _error(r, 422)
    store = stack.state_dir / "deltas"
    assert not store.exists() or not any(store.iterdir())


def test_upload_of_a_good_artifact_works(stack, resident, tied):
    r = httpx.post(
        f"{stack.url}/v1/deltas?name=uploaded",
        content=tied.delta.read_bytes(),
        headers={**stack.admin, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["uploaded"] is True
    assert _variant(stack, "uploaded-v", "uploaded").status_code == 201
    assert completion_outputs(stack.url, "uploaded-v") == stack.refs["tied-inst"]


def test_corrupt_artifact_is_refused(stack, resident, tied, tmp_path):
    bad = tmp_path / "bad.safetensors"
    data = bytearray(tied.delta.read_bytes())
    data[-64] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert "checksum" in _error(_register(stack, "corrupt", bad), 422)


def test_nan_in_delta_is_refused(stack, resident, tied, tmp_path):
    """An artifact whose checksums are right but whose values are NaN."""
    out = tmp_path / "nan.safetensors"
    with safe_open(str(tied.delta), framework="pt") as f:
        meta = f.metadata()
        manifest = DeltaManifest.model_validate_json(meta[MANIFEST_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    target = "model.norm.weight"
    tensors[target][0] = float("nan")
    for entry in manifest.tensors:
        if entry.name == target:
            keys = [k for k in tensors if k == target or k.startswith(target + "::")]
            entry.sha256 = payload_sha256({k: tensors[k] for k in keys})
    meta[MANIFEST_KEY] = manifest.model_dump_json()
    writer = StreamingSafetensorsWriter(out)
    for k, v in tensors.items():
        writer.add(k, v)
    writer.finish(meta)
    assert "NaN" in _error(_register(stack, "nan", out), 422)


def test_missing_file_is_refused(stack, resident, tmp_path):
    assert "no such delta file" in _error(_register(stack, "ghost", tmp_path / "nope.safetensors"), 422)


def test_unknown_names_are_404(stack, resident):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError, match="unknown model 'nope'"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "unknown delta 'nope'" in _error(_variant(stack, "v-nope", "nope"), 404)
    assert "unknown base" in _error(_variant(stack, "v-nobase", "untied-d", base="nobase"), 404)


def test_admin_routes_need_the_admin_token(stack, resident, tied):
    r = httpx.post(f"{stack.url}/v1/deltas", json={"name": "x", "path": str(tied.delta)})
    assert _error(r, 401).startswith("admin token missing")
    r = httpx.get(f"{stack.url}/v1/variants", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.delete(f"{stack.url}/v1/variants/tied-inst").status_code == 401


def test_bad_request_bodies_are_422(stack, resident):
    r = httpx.post(
        f"{stack.url}/v1/variants", json={"name": "x", "base": "tied", "deltas": []}, headers=stack.admin
    )
    assert r.status_code == 422
    r = httpx.post(f"{stack.url}/v1/completions", json={"prompt": "no model"})
    assert "model" in _error(r, 422)
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "tied", "messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"},
    )
    assert "chat_template" in _error(r, 400)


def test_duplicate_and_in_use_conflicts(stack, resident, tied):
    assert _register(stack, "dup", tied.delta).status_code == 201
    assert _register(stack, "dup", tied.delta).status_code == 409
    assert _variant(stack, "dup-v", "dup").status_code == 201
    assert "used by variants" in _error(httpx.delete(f"{stack.url}/v1/deltas/dup", headers=stack.admin), 409)
    assert httpx.delete(f"{stack.url}/v1/variants/dup-v", headers=stack.admin).status_code == 204
    assert httpx.delete(f"{stack.url}/v1/deltas/dup", headers=stack.admin).status_code == 204


def test_artifact_changed_after_registration_is_refused(stack, resident, tied, tmp_path):
    path = tmp_path / "moving.safetensors"
    shutil.copy(tied.delta, path)
    assert _register(stack, "moving", path).status_code == 201
    assert _variant(stack, "moving-v", "moving").status_code == 201
    shutil.copy(tied.delta2, path)
    os.utime(path, ns=(0, 0))
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": "moving-v", "prompt": "x", "max_tokens": 2})
    assert "missing or changed since it was registered" in _error(r, 409)


def test_failed_swap_in_engine_keeps_previous_weights(stack, resident, tied, tmp_path):
    """The file breaks after registration without changing size or mtime: the engine's
    apply fails, the gateway restores the previous weights and answers 502."""
    path = tmp_path / "fragile.safetensors"
    shutil.copy(tied.delta, path)
    assert _register(stack, "fragile", path).status_code == 201
    assert _variant(stack, "fragile-v", "fragile").status_code == 201
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00" * 8  # garble the header, keep the size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = httpx.post(f"{stack.url}/v1/completions", json={"model": "fragile-v", "prompt": "x", "max_tokens": 2})
    assert "still serving the previous weights" in _error(r, 502)
