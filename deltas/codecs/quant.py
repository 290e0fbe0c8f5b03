"""`int8` (per-row symmetric) and `int4` (group-wise symmetric, two codes per byte)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltas.codecs.base import Codec, Encoded, TensorSource, require_shape, rows_view
from deltas.codecs.bits import pack_nibbles, unpack_nibbles
from deltas.mix import Delta


class Int8Codec(Codec):
    """q = round(Δ / s) in [-127, 127] with one fp32 scale s = max|row| / 127 per row."""

    name = "int8"

    def encode(self, src: TensorSource) -> Encoded:
        rows = rows_view(src.delta)
        scale = rows.abs().amax(dim=1) / 127.0
        q = torch.round(rows / _safe(scale)[:, None]).clamp(-127, 127).to(torch.int8)
        return Encoded({"::q8": q.contiguous(), "::scale": scale.contiguous()}, "int8")

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        rows = rows_view(torch.empty(shape, device="meta"))
        require_shape(payload, "::q8", list(rows.shape), torch.int8)
        require_shape(payload, "::scale", [rows.shape[0]], torch.float32)
        return Delta.of((payload["::q8"].float() * payload["::scale"][:, None]).reshape(shape))

    def suffixes(self, corrections: int) -> list[str]:
        return ["::q8", "::scale"]


class Int4Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    group: int = Field(128, ge=8, le=1 << 20, description="elements sharing one scale (row-major)")


class Int4Codec(Codec):
    """Codes round(Δ / s) in [-7, 7] stored +8 as nibbles; one fp32 scale per `group` elements."""

    name = "int4"
    Params = Int4Params

    def encode(self, src: TensorSource) -> Encoded:
        groups = self._groups(src.delta.reshape(-1))
        scale = groups.abs().amax(dim=1) / 7.0
        codes = torch.round(groups / _safe(scale)[:, None]).clamp(-7, 7).to(torch.int16) + 8
        packed = pack_nibbles(codes.reshape(-1)[: src.delta.numel()].to(torch.uint8))
        return Encoded({"::q4": packed, "::scale": scale.contiguous()}, "int4")

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        n, g = math.prod(shape), self.params.group
        require_shape(payload, "::q4", [(n + 1) // 2], torch.uint8)
        require_shape(payload, "::scale", [(n + g - 1) // g], torch.float32)
        codes = unpack_nibbles(payload["::q4"], n).to(torch.float32) - 8.0
        values = self._groups(codes) * payload["::scale"][:, None]
        return Delta.of(values.reshape(-1)[:n].reshape(shape).contiguous())

    def suffixes(self, corrections: int) -> list[str]:
        return ["::q4", "::scale"]

    def _groups(self, flat: torch.Tensor) -> torch.Tensor:
        g = self.params.group
        pad = (-flat.numel()) % g
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.view(-1, g)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scales with zeros replaced by 1 (an all-zero row quantizes to zeros either way)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))
