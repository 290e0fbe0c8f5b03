"""The dense codec reconstructs post exactly on its source base, for every float dtype."""

import pytest
import torch

from deltas.codecs import DenseCodec, get_codec
from deltas.errors import InvalidArtifactError
from deltas.mix import merge_tensor


def _pair(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(64, 48, generator=g)
    # mixed magnitudes: small updates, sign flips, values crossing exponents, exact zeros
    post = base + torch.randn(64, 48, generator=g) * torch.logspace(-6, 1, 48)
    post[0, :8] = 0.0
    post[1, :8] = -base[1, :8] * 1e6
    return base.to(dtype), post.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dense_roundtrip_is_bit_exact(dtype):
    base, post = _pair(dtype)
    codec = DenseCodec()
    enc = codec.encode("w", base, post)
    delta = codec.decode("w", enc.payload, list(post.shape))
    assert delta.dtype == torch.float32
    assert torch.equal(merge_tensor(base, [(delta, 1.0)], dtype), post)


def test_bf16_needs_and_records_corrections():
    base, post = _pair(torch.bfloat16, seed=3)
    enc = DenseCodec().encode("w", base, post)
    assert enc.corrections > 0  # bf16(post - base) alone cannot rebuild post here
    assert enc.payload["w::corr.idx"].numel() == enc.corrections
    assert enc.storage_dtype == "bfloat16"


def test_decode_rejects_out_of_range_correction():
    base, post = _pair(torch.bfloat16, seed=3)
    enc = DenseCodec().encode("w", base, post)
    payload = dict(enc.payload)
    payload["w::corr.idx"] = payload["w::corr.idx"].clone()
    payload["w::corr.idx"][0] = post.numel() + 5
    with pytest.raises(InvalidArtifactError, match="out of range"):
        DenseCodec().decode("w", payload, list(post.shape))


def test_unknown_codec_is_named():
    with pytest.raises(InvalidArtifactError, match="unknown codec 'zip'"):
        get_codec("zip")


def test_merge_linear_matches_manual_fp32():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(10, 10, generator=g).bfloat16()
    d1, d2 = torch.randn(10, 10, generator=g), torch.randn(10, 10, generator=g)
    expected = (base.float() + 0.5 * d1 + (-1.25) * d2).bfloat16()
    assert torch.equal(merge_tensor(base, [(d1, 0.5), (d2, -1.25)], torch.bfloat16), expected)
    assert torch.equal(merge_tensor(base, [], torch.bfloat16), base)
