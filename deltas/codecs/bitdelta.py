"""`bitdelta`: one sign bit per element plus a scale per row (or per tensor)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from deltas.codecs.base import Codec, Encoded, TensorSource, require_shape, rows_view
from deltas.codecs.bits import pack_bits, packed_bits_len, unpack_bits
from deltas.mix import Delta


class BitDeltaParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: Literal["row", "tensor"] = "row"


class BitDeltaCodec(Codec):
    """Δ ≈ s·sign(Δ) with s = mean|Δ| (the L2-optimal scale for a sign pattern)."""

    name = "bitdelta"
    Params = BitDeltaParams

    def encode(self, src: TensorSource) -> Encoded:
        rows = rows_view(src.delta)
        scale = rows.abs().mean(dim=1) if self.params.scale == "row" else rows.abs().mean().reshape(1)
        return Encoded({"::signs": pack_bits(rows >= 0), "::scale": scale.contiguous()}, "1-bit")

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        n = math.prod(shape)
        rows = rows_view(torch.empty(shape, device="meta")).shape
        require_shape(payload, "::signs", [packed_bits_len(n)], torch.uint8)
        require_shape(payload, "::scale", [rows[0] if self.params.scale == "row" else 1], torch.float32)
        signs = unpack_bits(payload["::signs"], n).view(rows).float() * 2.0 - 1.0
        return Delta.of((signs * payload["::scale"][:, None]).reshape(shape))

    def suffixes(self, corrections: int) -> list[str]:
        return ["::signs", "::scale"]
