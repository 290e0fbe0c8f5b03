"""Lossy codecs: real bit packing, sizes, error bounds, and refusal of malformed payloads."""

import pytest
import torch

from deltas import CodecPlan
from deltas.codecs import TensorSource, get_codec, parse_codec
from deltas.codecs.bits import pack_bits, pack_nibbles, unpack_bits, unpack_nibbles
from deltas.errors import CodecError, DeltaError, InvalidArtifactError


def _delta(shape=(96, 200), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 1e-3


def _roundtrip(spec: str, delta: torch.Tensor, gradient=None):
    codec = parse_codec(spec)
    enc = codec.encode(TensorSource("layer.w", delta, gradient=gradient))
    out = codec.decode(enc.payload, list(delta.shape)).full()
    return enc, out, float((out - delta).norm() / delta.norm())


def _nbytes(enc) -> int:
    return sum(t.numel() * t.element_size() for t in enc.payload.values())


def test_bit_and_nibble_packing_roundtrip():
    mask = torch.rand(1001) > 0.5
    assert pack_bits(mask).numel() == 126
    assert torch.equal(unpack_bits(pack_bits(mask), 1001), mask)
    codes = torch.randint(0, 16, (999,), dtype=torch.uint8)
    assert pack_nibbles(codes).numel() == 500
    assert torch.equal(unpack_nibbles(pack_nibbles(codes), 999), codes)


def test_int8_is_per_row_symmetric_and_half_of_bf16():
    d = _delta()
    d[3] *= 100  # one loud row must not cost the others their precision
    enc, out, err = _roundtrip("int8", d)
    assert enc.payload["::q8"].dtype == torch.int8 and enc.payload["::scale"].shape == (96,)
    assert _nbytes(enc) <= 0.52 * d.numel() * 2
    row_err = (out - d).abs().amax(dim=1) / d.abs().amax(dim=1)
    assert float(row_err.max()) <= 0.5 / 127 + 1e-6  # at most half a step of each row's own scale
    assert err < 0.01


def test_int4_packs_two_codes_per_byte_with_group_scales():
    d = _delta()
    enc, out, err = _roundtrip("int4:group=128", d)
    n = d.numel()
    assert enc.payload["::q4"].dtype == torch.uint8 and enc.payload["::q4"].numel() == (n + 1) // 2
    assert enc.payload["::scale"].numel() == (n + 127) // 128
    assert _nbytes(enc) <= 0.30 * n * 2
    assert err < 0.12


def test_sparse_keeps_the_largest_entries_in_a_bitmask():
    d = _delta()
    enc, out, _ = _roundtrip("sparse:density=0.1", d)
    kept = out != 0
    assert int(kept.sum()) == round(0.1 * d.numel())
    assert float(d.abs()[kept].min()) >= float(d.abs()[~kept].max())  # top-k by magnitude
    assert enc.payload["::mask"].numel() == (d.numel() + 7) // 8  # 1 bit per element, not int64 indices
    assert torch.allclose(out[kept], d[kept], rtol=1e-2)


def test_sparse_gradient_selection_scores_delta_times_gradient():
    d = _delta()
    gradient = torch.zeros_like(d)
    gradient[:, :10] = 1.0  # the loss only depends on the first 10 columns
    _, out, _ = _roundtrip("sparse:density=0.05,select=gradient", d, gradient=gradient)
    assert int((out[:, :10] != 0).sum()) == round(0.05 * d.numel()) and not out[:, 10:].any()
    with pytest.raises(DeltaError, match="--calib"):
        _roundtrip("sparse:select=gradient", d)


def test_dare_is_seeded_and_rescaled():
    d = _delta()
    _, a, _ = _roundtrip("dare:density=0.3,seed=7", d)
    _, b, _ = _roundtrip("dare:density=0.3,seed=7", d)
    _, c, _ = _roundtrip("dare:density=0.3,seed=8", d)
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.02
    assert torch.allclose(a[kept], d[kept] / 0.3, rtol=1e-2)


def test_bitdelta_is_sign_times_row_mean():
    d = _delta()
    enc, out, _ = _roundtrip("bitdelta", d)
    expected = torch.where(d >= 0, 1.0, -1.0) * d.abs().mean(dim=1, keepdim=True)
    assert torch.allclose(out, expected)
    assert _nbytes(enc) <= d.numel() / 8 + 96 * 4


def test_lowrank_recovers_a_low_rank_delta():
    g = torch.Generator().manual_seed(2)
    d = (torch.randn(96, 8, generator=g) @ torch.randn(8, 200, generator=g)) * 1e-3
    enc, out, err = _roundtrip("lowrank:rank=8", d)
    assert enc.payload["::up"].shape == (96, 8) and enc.payload["::down"].shape == (8, 200)
    assert err < 0.01  # only bf16 rounding of the factors
    with pytest.raises(DeltaError, match="1-D"):
        _roundtrip("lowrank:rank=4", torch.ones(10))


@pytest.mark.parametrize("spec", ["int8", "int4", "sparse", "dare", "bitdelta", "lowrank:rank=4"])
def test_malformed_payloads_are_refused(spec):
    d = _delta()
    codec = parse_codec(spec)
    enc = codec.encode(TensorSource("w", d))
    for suffix, tensor in enc.payload.items():
        broken = dict(enc.payload)
        broken[suffix] = tensor.reshape(-1)[: max(tensor.numel() - 3, 1)].clone()  # truncated
        with pytest.raises(InvalidArtifactError):
            codec.decode(broken, list(d.shape))


def test_codec_specs_are_validated():
    with pytest.raises(CodecError, match="unknown codec 'int3'"):
        parse_codec("int3")
    with pytest.raises(CodecError, match="density"):
        parse_codec("sparse:density=2")
    with pytest.raises(CodecError, match="grp"):
        parse_codec("int4:grp=64")
    assert get_codec("int4", {"group": "64"}).spec() == "int4:group=64"


def test_codec_plan_rules_then_vectors_then_default(tmp_path):
    recipe = tmp_path / "codecs.yaml"
    recipe.write_text("default: int4\nrules:\n  - match: '*embed_tokens*'\n    codec: int8\nzstd: true\n")
    plan = CodecPlan.from_file(recipe)
    assert plan.codec_for("model.embed_tokens.weight", [10, 4]).name == "int8"
    assert plan.codec_for("model.layers.0.mlp.up_proj.weight", [10, 4]).name == "int4"
    assert plan.codec_for("model.norm.weight", [4]).name == "dense"
    assert plan.zstd
    recipe.write_text("default: int9\n")
    with pytest.raises(DeltaError, match="int9"):
        CodecPlan.from_file(recipe)
