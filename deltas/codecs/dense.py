"""`dense`: the delta in the model dtype + exact sparse corrections. Lossless on its base.

A delta whose entries are mostly exactly zero (a fine-tune that froze part of a tensor: GMT's
masked gradients) is stored as its nonzero entries, indices and values, where that is smaller;
the rebuilt tensor is the same, bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltas.codecs.base import Codec, Encoded, TensorSource, require
from deltas.errors import InvalidArtifactError
from deltas.mix import Delta, merge_tensor

CORR_IDX = "::corr.idx"
CORR_VAL = "::corr.val"
NZ_IDX = "::nz.idx"  # the sparse layout: flat indices of the nonzero entries (int32 or int64)
NZ_VAL = "::nz.val"  # ... and their values, in the model dtype
_MAX_NUDGES = 64


class DenseParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    layout: Literal["auto", "full", "sparse"] = Field(
        "auto",
        description="full: every entry; sparse: the nonzero ones and their indices; auto: the smaller "
        "(recorded per tensor as what was chosen; an artifact without it is full)",
    )


class DenseCodec(Codec):
    """Where rounding Δ to the model dtype would change base + Δ, the element's dense value
    becomes fp32-exact and, if even that cannot rebuild post (cancellation near zero), a
    second fp32 term is added; both are stored sparsely (int32 index, fp32 values).
    """

    name = "dense"
    lossless = True
    Params = DenseParams

    def encode(self, src: TensorSource) -> Encoded:
        if src.base is None or src.post is None:
            raise InvalidArtifactError(
                f"tensor {src.name!r}: the dense codec needs the base and post checkpoints "
                "(use `deltagate extract`); it cannot be made from a lossy payload"
            )
        base, post = src.base, src.post
        exact = post.double() - base.double()
        dense = exact.to(post.dtype)
        recon = merge_tensor(base, [(Delta.of(dense.float()), 1.0)], post.dtype)
        idx = (recon != post).flatten().nonzero().flatten()
        idx_dtype = torch.int32 if post.numel() < 2**31 else torch.int64
        layout = self._layout(dense, idx_dtype)
        if layout == "sparse":
            nonzero = dense.flatten().nonzero().flatten()
            payload = {NZ_IDX: nonzero.to(idx_dtype), NZ_VAL: dense.flatten()[nonzero].contiguous()}
        else:
            payload = {"": dense.contiguous()}
        if idx.numel():
            b, p = base.flatten()[idx], post.flatten()[idx]
            first = exact.flatten()[idx].float()
            second = _exact_second_term(b.float() + first, p)
            payload[CORR_IDX] = idx.to(idx_dtype)
            payload[CORR_VAL] = torch.stack([first, second])
        return Encoded(payload, str(post.dtype).removeprefix("torch."), int(idx.numel()))

    def recorded_params(self, encoded: Encoded) -> dict:
        # The layout stored; full as no parameters, as before the sparse layout: older releases read it.
        return {"layout": "sparse"} if NZ_IDX in encoded.payload else {}

    def _layout(self, dense: torch.Tensor, idx_dtype: torch.dtype) -> Literal["full", "sparse"]:
        """The layout to store `dense` in: the params', or under auto the one of fewer bytes."""
        if self.params.layout != "auto":
            return self.params.layout
        nonzero = int(torch.count_nonzero(dense))
        sparse_bytes = nonzero * (dense.element_size() + idx_dtype.itemsize)
        return "sparse" if sparse_bytes < dense.numel() * dense.element_size() else "full"

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        if self.params.layout == "sparse":
            idx, vals = payload[NZ_IDX].long(), payload[NZ_VAL]
            n = torch.Size(shape).numel()
            require(idx.dim() == 1 and vals.shape == idx.shape, "nonzero indices and values differ in shape")
            require(not idx.numel() or (idx.min() >= 0 and idx.max() < n), "nonzero index out of range")
            delta = torch.zeros(n, dtype=torch.float32, device=vals.device)
            delta[idx] = vals.float()
            delta = delta.view(shape)
        else:
            dense = payload[""]
            require(list(dense.shape) == list(shape), f"payload shape {list(dense.shape)} != {shape}")
            delta = dense.float()
        if CORR_IDX not in payload:
            return Delta.of(delta)
        idx, vals = payload[CORR_IDX].long(), payload[CORR_VAL]
        require(
            not idx.numel() or (idx.min() >= 0 and idx.max() < delta.numel()), "correction index out of range"
        )
        require(vals.shape == (2, idx.numel()), f"corrections have shape {list(vals.shape)}")
        delta.view(-1)[idx] = vals[0]
        second = vals[1]
        needed = second != 0
        if not needed.any():
            return Delta.of(delta)
        return Delta(delta, idx[needed], second[needed].contiguous())

    def suffixes(self, corrections: int) -> list[str]:
        values = [NZ_IDX, NZ_VAL] if self.params.layout == "sparse" else [""]
        return values + [CORR_IDX, CORR_VAL] if corrections else values


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
