"""`sparse` (keep the top-k% by magnitude or by |Δ⊙∇L|) and `dare` (seeded random drop, rescaled).

Both store a bitmask (1 bit per element) and the kept values in bf16, in mask order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltas.codecs.base import Codec, Encoded, TensorSource, require, require_shape
from deltas.codecs.bits import pack_bits, packed_bits_len, unpack_bits
from deltas.errors import DeltaError
from deltas.mix import Delta
from deltas.sparsify import random_mask, topk_mask

_VALUES = torch.bfloat16


class SparseParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    density: float = Field(0.1, gt=0, le=1, description="fraction of entries kept")
    select: Literal["magnitude", "gradient"] = "magnitude"


class SparseCodec(Codec):
    """Top-k% entries by |Δ| (or by |Δ ⊙ ∇L| with select=gradient); the rest are dropped."""

    name = "sparse"
    Params = SparseParams

    def keep(self, src: TensorSource) -> tuple[torch.Tensor, float]:
        """(mask of kept entries, factor applied to the kept values)."""
        if self.params.select == "gradient":
            if src.gradient is None:
                raise DeltaError(
                    f"tensor {src.name!r}: select=gradient needs gradients; pass --calib FILE.jsonl"
                )
            # first-order estimate of how much the loss moves if the entry is dropped (GMT)
            return topk_mask((src.delta * src.gradient).abs(), self.params.density), 1.0
        return topk_mask(src.delta.abs(), self.params.density), 1.0

    def encode(self, src: TensorSource) -> Encoded:
        mask, factor = self.keep(src)
        values = (src.delta[mask] * factor).to(_VALUES)
        return Encoded({"::mask": pack_bits(mask), "::values": values.contiguous()}, "bfloat16")

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        n = math.prod(shape)
        require_shape(payload, "::mask", [packed_bits_len(n)], torch.uint8)
        mask = unpack_bits(payload["::mask"], n)
        kept = int(mask.sum())
        require_shape(payload, "::values", [kept], _VALUES)
        delta = torch.zeros(n, dtype=torch.float32, device=mask.device)
        delta[mask] = payload["::values"].float()
        require(bool(torch.isfinite(delta).all()), "values hold NaN or Inf")
        return Delta.of(delta.view(shape))

    def suffixes(self, corrections: int) -> list[str]:
        return ["::mask", "::values"]


class DareParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    density: float = Field(0.3, gt=0, le=1, description="keep probability; kept values are scaled 1/density")
    seed: int = Field(0, ge=0)


class DareCodec(SparseCodec):
    """DARE: drop each entry with probability 1 − density and rescale the survivors by 1/density."""

    name = "dare"
    Params = DareParams

    def keep(self, src: TensorSource) -> tuple[torch.Tensor, float]:
        mask = random_mask(src.delta.shape, self.params.density, self.params.seed, src.name)
        return mask, 1.0 / self.params.density
