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
from deltas.mix import merge_tensor

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
    def decode(self, name: str, payload: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
        """The fp32 delta of tensor `name` from its payload tensors."""

    @abstractmethod
    def payload_keys(self, name: str, corrections: int) -> list[str]:
        """Artifact keys holding tensor `name`'s payload."""


class DenseCodec(Codec):
    """Delta in the model dtype + exact sparse corrections: lossless on the source base."""

    name = "dense"

    def encode(self, name: str, base: torch.Tensor, post: torch.Tensor) -> Encoded:
        exact = post.double() - base.double()
        dense = exact.to(post.dtype)
        recon = merge_tensor(base, [(dense.float(), 1.0)], post.dtype)
        idx = (recon != post).flatten().nonzero().flatten()
        payload = {name: dense.contiguous()}
        if idx.numel():
            vals = _exact_corrections(base.flatten()[idx], post.flatten()[idx], exact.flatten()[idx])
            idx_dtype = torch.int32 if post.numel() < 2**31 else torch.int64
            payload[name + CORR_IDX] = idx.to(idx_dtype)
            payload[name + CORR_VAL] = vals
        return Encoded(payload, str(post.dtype).removeprefix("torch."), int(idx.numel()))

    def decode(self, name: str, payload: dict[str, torch.Tensor], shape: list[int]) -> torch.Tensor:
        dense = payload[name]
        if list(dense.shape) != list(shape):
            raise InvalidArtifactError(f"tensor {name!r}: payload shape {list(dense.shape)} != {shape}")
        delta = dense.float()
        if name + CORR_IDX in payload:
            flat = delta.view(-1)
            idx = payload[name + CORR_IDX].long()
            if idx.numel() and (idx.min() < 0 or idx.max() >= flat.numel()):
                raise InvalidArtifactError(f"tensor {name!r}: correction index out of range")
            flat[idx] = payload[name + CORR_VAL]
        return delta

    def payload_keys(self, name: str, corrections: int) -> list[str]:
        return [name, name + CORR_IDX, name + CORR_VAL] if corrections else [name]


def _exact_corrections(base: torch.Tensor, post: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """fp32 deltas v with cast(fp32(base) + v) == post, found by nudging one ulp at a time."""
    vals = exact.float()
    base32 = base.float()
    for _ in range(_MAX_NUDGES):
        recon = (base32 + vals).to(post.dtype)
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
