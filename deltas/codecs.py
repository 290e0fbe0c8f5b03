"""Per-tensor encodings of a delta. One class per encoding behind one interface.

A codec turns the exact fp32 delta of one tensor into named payload tensors stored in
the artifact, and back. The `dense` codec stores the delta in the model's dtype plus a
sparse list of exact fp32 corrections where that rounding would change the result, so
base + Δ reproduces the post-trained weights bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from deltas.errors import InvalidArtifactError
from deltas.mix import Delta, merge_tensor

CORR_IDX = "::corr.idx"
CORR_VAL = "::corr.val"
_MAX_NUDGES = 64


@dataclass(frozen=True)
class Encoded:
    """What a codec produced for one tensor."""

    payload: dict[str, torch.Tensor]  # artifact key -> tensor
    storage_dtype: str
    corrections: int


class Codec(ABC):
    """One encoding of a delta tensor."""

    name: str

    @abstractmethod
    def encode(self, name: str, base: torch.Tensor, post: torch.Tensor) -> Encoded:
        """Encode post - base for tensor `name`."""

    @abstractmethod
    def decode(self, name: str, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        """The fp32 delta of tensor `name` from its payload tensors."""

    @abstractmethod
    def payload_keys(self, name: str, corrections: int) -> list[str]:
        """Artifact keys holding tensor `name`'s payload."""


class DenseCodec(Codec):
    """Delta in the model dtype + exact sparse corrections: lossless on the source base.

    Where rounding Δ to the model dtype would change base + Δ, the element's dense value
    becomes fp32-exact and, if even that cannot rebuild post (cancellation near zero), a
    second fp32 term is added; both are stored sparsely (int32 index, fp32 values).
    """

    name = "dense"

    def encode(self, name: str, base: torch.Tensor, post: torch.Tensor) -> Encoded:
        exact = post.double() - base.double()
        dense = exact.to(post.dtype)
        recon = merge_tensor(base, [(Delta.of(dense.float()), 1.0)], post.dtype)
        idx = (recon != post).flatten().nonzero().flatten()
        payload = {name: dense.contiguous()}
        if idx.numel():
            b, p = base.flatten()[idx], post.flatten()[idx]
            first = exact.flatten()[idx].float()
            second = _exact_second_term(b.float() + first, p)
            idx_dtype = torch.int32 if post.numel() < 2**31 else torch.int64
            payload[name + CORR_IDX] = idx.to(idx_dtype)
            payload[name + CORR_VAL] = torch.stack([first, second])
        return Encoded(payload, str(post.dtype).removeprefix("torch."), int(idx.numel()))

    def decode(self, name: str, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        dense = payload[name]
        if list(dense.shape) != list(shape):
            raise InvalidArtifactError(f"tensor {name!r}: payload shape {list(dense.shape)} != {shape}")
        delta = dense.float()
        if name + CORR_IDX not in payload:
            return Delta.of(delta)
        idx, vals = payload[name + CORR_IDX].long(), payload[name + CORR_VAL]
        if idx.numel() and (idx.min() < 0 or idx.max() >= delta.numel()):
            raise InvalidArtifactError(f"tensor {name!r}: correction index out of range")
        if vals.shape != (2, idx.numel()):
            raise InvalidArtifactError(f"tensor {name!r}: corrections have shape {list(vals.shape)}")
        delta.view(-1)[idx] = vals[0]
        second = vals[1]
        needed = second != 0
        if not needed.any():
            return Delta.of(delta)
        return Delta(delta, idx[needed], second[needed].contiguous())

    def payload_keys(self, name: str, corrections: int) -> list[str]:
        return [name, name + CORR_IDX, name + CORR_VAL] if corrections else [name]


def _exact_second_term(partial: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """fp32 values c with cast(partial + c) == post (0 where partial already rounds to post).

    `partial` is the fp32 sum base + first term; post − partial is small, so partial + c
    is nearly exact, and a few one-ulp nudges fix the rest.
    """
    vals = (post.double() - partial.double()).float()
    vals[partial.to(post.dtype) == post] = 0.0
    for _ in range(_MAX_NUDGES):
        recon = (partial + vals).to(post.dtype)
        wrong = recon != post
        if not wrong.any():
            return vals
        direction = torch.where(recon.float() < post.float(), float("inf"), float("-inf"))
        vals[wrong] = torch.nextafter(vals[wrong], direction[wrong])
    raise InvalidArtifactError("could not find an exact fp32 correction; the delta is not representable")


CODECS: dict[str, Codec] = {c.name: c for c in (DenseCodec(),)}


def get_codec(name: str) -> Codec:
    """The codec called `name`; error listing the known ones otherwise."""
    try:
        return CODECS[name]
    except KeyError:
        raise InvalidArtifactError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None
