"""The dense codec reconstructs post exactly on its source base, for every float dtype."""

import pytest
import torch

from deltas.codecs import DenseCodec, TensorSource, get_codec
from deltas.errors import CodecError, InvalidArtifactError
from deltas.mix import Delta, merge_tensor


def _pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 48, generator=g)
    # mixed magnitudes: small updates, sign flips, values crossing exponents, exact zeros
    post = base + torch.randn(64, 48, generator=g) * torch.logspace(-6, 1, 48)
    post[0, :8] = 0.0
    post[1, :8] = -base[1, :8] * 1e6
    return base.to(dtype), post.to(dtype)


def _src(base: torch.Tensor, post: torch.Tensor) -> TensorSource:
    return TensorSource("w", (post.double() - base.double()).float(), base, post)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_roundtrip_is_bit_exact(dtype):
    base, post = _pair(dtype)
    codec = DenseCodec()
    enc = codec.encode(_src(base, post))
    delta = codec.decode(enc.payload, list(post.shape))
    assert delta.dense.dtype == torch.float32
    assert torch.equal(merge_tensor(base, [(delta, 1.0)], dtype), post)


def test_weights_crossing_zero_are_rebuilt_exactly():
    """Found on SmolLM2 after SFT: fp32(base) + Δ cancels, and no single fp32 Δ works."""
    base = torch.tensor([-0.00128173828125, -0.00042724609375, -0.000732421875, 0.5]).bfloat16()
    post = torch.tensor(
        [1.2398231774568558e-08, -3.637978807091713e-10, 1.1350493878126144e-09, 0.5]
    ).bfloat16()
    enc = DenseCodec().encode(_src(base, post))
    delta = DenseCodec().decode(enc.payload, [4])
    assert delta.extra_idx is not None  # the second term was needed
    assert torch.equal(merge_tensor(base, [(delta, 1.0)], torch.bfloat16), post)


def test_bf16_needs_and_records_corrections():
    base, post = _pair(torch.bfloat16, seed=3)
    enc = DenseCodec().encode(_src(base, post))
    assert enc.corrections > 0  # bf16(post - base) alone cannot rebuild post here
    assert enc.payload["::corr.idx"].numel() == enc.corrections
    assert enc.storage_dtype == "bfloat16"


def test_decode_rejects_out_of_range_correction():
    base, post = _pair(torch.bfloat16, seed=3)
    enc = DenseCodec().encode(_src(base, post))
    payload = dict(enc.payload)
    payload["::corr.idx"] = payload["::corr.idx"].clone()
    payload["::corr.idx"][0] = post.numel() + 5
    with pytest.raises(InvalidArtifactError, match="out of range"):
        DenseCodec().decode(payload, list(post.shape))


def test_unknown_codec_is_named():
    with pytest.raises(CodecError, match="unknown codec 'zip'"):
        get_codec("zip")


def test_merge_linear_matches_manual_fp32():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, 10, generator=g).bfloat16()
    d1, d2 = torch.randn(10, 10, generator=g), torch.randn(10, 10, generator=g)
    expected = (base.float() + 0.5 * d1 + (-1.25) * d2).bfloat16()
    terms = [(Delta.of(d1), 0.5), (Delta.of(d2), -1.25)]
    assert torch.equal(merge_tensor(base, terms, torch.bfloat16), expected)
    assert torch.equal(merge_tensor(base, [], torch.bfloat16), base)
