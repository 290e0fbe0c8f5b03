"""`lowrank`: truncated SVD Δ ≈ up @ down of rank r per matrix (exportable as a LoRA adapter)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from deltas.codecs.base import Codec, Encoded, TensorSource, require, require_shape
from deltas.errors import DeltaError
from deltas.mix import Delta

_FACTORS = torch.bfloat16


class LowRankParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(32, ge=1, le=65536)


class LowRankCodec(Codec):
    """up = U·√S (out×r), down = √S·Vᵀ (r×in), stored in bf16; r = min(rank, out, in)."""

    name = "lowrank"
    Params = LowRankParams

    def encode(self, src: TensorSource) -> Encoded:
        if src.delta.dim() != 2:
            raise DeltaError(
                f"tensor {src.name!r} is {src.delta.dim()}-D; lowrank applies to matrices — "
                "give it another codec in the codec recipe"
            )
        u, s, vh = torch.linalg.svd(src.delta.double(), full_matrices=False)
        r = min(self.params.rank, s.numel())
        root = s[:r].sqrt()
        up = (u[:, :r] * root).to(_FACTORS)
        down = (root[:, None] * vh[:r]).to(_FACTORS)
        return Encoded({"::up": up.contiguous(), "::down": down.contiguous()}, "bfloat16")

    device_exact = False  # a GPU GEMM accumulates in another order than the host's

    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        require(len(shape) == 2, f"lowrank payload for a {len(shape)}-D tensor")
        r = payload["::up"].shape[-1] if payload["::up"].dim() == 2 else -1
        require(0 < r <= min(self.params.rank, *shape), f"rank {r} does not fit {shape}")
        require_shape(payload, "::up", [shape[0], r], _FACTORS)
        require_shape(payload, "::down", [r, shape[1]], _FACTORS)
        return Delta.of(payload["::up"].float() @ payload["::down"].float())

    def suffixes(self, corrections: int) -> list[str]:
        return ["::up", "::down"]
