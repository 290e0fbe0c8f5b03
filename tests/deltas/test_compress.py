"""Compressed artifacts: extract --codec, compress, zstd, per-tensor recipes, and refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from deltas import Checkpoint, compress_artifact, extract_delta, open_artifact
from deltas.codecs.plan import CodecPlan, CodecRule
from deltas.errors import CodecError, InvalidArtifactError
from deltas.manifest import FORMAT_VERSION, MANIFEST_KEY
from deltas.stream_writer import StreamingSafetensorsWriter


def _exact_delta(family, name):
    return Checkpoint(family.post).get(name).float() - Checkpoint(family.base).get(name).float()


@pytest.mark.parametrize(
    "spec", ["int8", "int4:group=32", "sparse:density=0.2", "dare:density=0.5", "bitdelta", "lowrank:rank=4"]
)
def test_compress_records_codec_and_error_per_tensor(untied, tmp_path, spec):
    out = tmp_path / "c.safetensors"
    report = compress_artifact(untied.delta, out, CodecPlan.uniform(spec))
    art = open_artifact(out, verify=True)
    assert not report.lossless and not art.manifest.lossless
    for entry in art.manifest.tensors:
        exact = _exact_delta(untied, entry.name)
        if len(entry.shape) < 2:
            assert entry.encoding == "dense"  # vectors stay exact by default
            continue
        assert entry.encoding == spec.split(":")[0]
        measured = float((art.delta(entry.name).full() - exact).norm() / exact.norm())
        assert entry.rel_error == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert out.stat().st_size < untied.delta.stat().st_size


def test_extract_with_codec_equals_compress_of_exact(untied, tmp_path):
    plan = CodecPlan.uniform("int4")
    extract_delta(untied.base, untied.post, tmp_path / "x.safetensors", plan=plan)
    compress_artifact(untied.delta, tmp_path / "c.safetensors", plan)
    a, b = open_artifact(tmp_path / "x.safetensors"), open_artifact(tmp_path / "c.safetensors")
    for name in a.tensor_names:
        assert torch.equal(a.delta(name).full(), b.delta(name).full())


def test_exact_tensors_are_copied_bit_for_bit(tied, tmp_path):
    plan = CodecPlan(default="int8", rules=[CodecRule(match="*embed_tokens*", codec="dense")])
    compress_artifact(tied.delta, tmp_path / "c.safetensors", plan)
    src, out = open_artifact(tied.delta), open_artifact(tmp_path / "c.safetensors")
    name = "model.embed_tokens.weight"
    assert out.entry(name).encoding == "dense" and out.entry(name).sha256 == src.entry(name).sha256


def test_zstd_is_lossless_and_smaller(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "p.safetensors", CodecPlan.uniform("int4"))
    compress_artifact(tied.delta, tmp_path / "z.safetensors", CodecPlan.uniform("int4", zstd=True))
    p, z = open_artifact(tmp_path / "p.safetensors"), open_artifact(tmp_path / "z.safetensors")
    assert all(t.compression == "zstd" for t in z.manifest.tensors)
    for name in p.tensor_names:
        assert torch.equal(p.delta(name).full(), z.delta(name).full())
    assert (tmp_path / "z.safetensors").stat().st_size < (tmp_path / "p.safetensors").stat().st_size


def test_exact_from_lossy_is_refused(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "q.safetensors", CodecPlan.uniform("int8", zstd=False))
    with pytest.raises(CodecError, match="exact encoding can only be copied"):
        compress_artifact(tmp_path / "q.safetensors", tmp_path / "d.safetensors", CodecPlan())
    assert not (tmp_path / "d.safetensors").exists()  # nothing half-written


def _rewrite_manifest(src, dst, edit):
    """Copy an artifact, changing its manifest JSON with `edit` (tensors copied as stored)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        manifest = json.loads(meta[MANIFEST_KEY])
        edit(manifest)
        meta[MANIFEST_KEY] = json.dumps(manifest)
        writer = StreamingSafetensorsWriter(dst)
        for key in f.keys():
            writer.add(key, f.get_tensor(key))
        writer.finish(meta)


def test_unknown_codec_in_manifest_is_refused(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "q.safetensors", CodecPlan.uniform("int8"))

    def rename(m):
        m["tensors"][1]["encoding"] = "int3"

    _rewrite_manifest(tmp_path / "q.safetensors", tmp_path / "bad.safetensors", rename)
    with pytest.raises(InvalidArtifactError, match="unknown codec 'int3'"):
        open_artifact(tmp_path / "bad.safetensors")


def test_manifest_params_that_do_not_match_the_payload_are_refused(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "q.safetensors", CodecPlan.uniform("int4:group=32"))

    def regroup(m):
        for t in m["tensors"]:
            if t["encoding"] == "int4":
                t["params"]["group"] = 64

    _rewrite_manifest(tmp_path / "q.safetensors", tmp_path / "bad.safetensors", regroup)
    with pytest.raises(InvalidArtifactError, match="scale"):
        open_artifact(tmp_path / "bad.safetensors", verify=True)


def test_truncated_compressed_artifact_is_refused(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "z.safetensors", CodecPlan.uniform("int4", zstd=True))
    data = (tmp_path / "z.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(InvalidArtifactError):
        open_artifact(tmp_path / "t.safetensors", verify=True)


def test_corrupt_zstd_payload_is_refused(tied, tmp_path):
    compress_artifact(tied.delta, tmp_path / "z.safetensors", CodecPlan.uniform("int4", zstd=True))
    data = bytearray((tmp_path / "z.safetensors").read_bytes())
    data[-50] ^= 0xFF
    (tmp_path / "c.safetensors").write_bytes(bytes(data))
    art = open_artifact(tmp_path / "c.safetensors")
    with pytest.raises(InvalidArtifactError):
        art.verify()
    last = art.manifest.tensors[-1].name
    with pytest.raises(InvalidArtifactError, match="corrupt"):
        art.delta(last)


def test_format_version_is_1_for_exact_and_2_for_compressed(tied, tmp_path):
    assert open_artifact(tied.delta).manifest.format_version == 1  # older releases still read it
    compress_artifact(tied.delta, tmp_path / "q.safetensors", CodecPlan.uniform("int8"))
    assert open_artifact(tmp_path / "q.safetensors").manifest.format_version == 2

    def future(m):
        m["format_version"] = FORMAT_VERSION + 1

    _rewrite_manifest(tmp_path / "q.safetensors", tmp_path / "f.safetensors", future)
    with pytest.raises(InvalidArtifactError, match=f"format version {FORMAT_VERSION + 1} is not supported"):
        open_artifact(tmp_path / "f.safetensors")
