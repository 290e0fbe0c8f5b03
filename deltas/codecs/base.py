"""The codec interface: one class per encoding, each with its own typed parameters.

A codec turns one tensor's delta into payload tensors (keyed by a suffix appended to
the tensor name in the artifact) and back into an fp32 `Delta`. Parameters are a
pydantic model per codec, recorded per tensor in the manifest, so an artifact decodes
with exactly the settings it was written with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from deltas.errors import InvalidArtifactError
from deltas.mix import Delta


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class TensorSource:
    """What a codec may look at for one tensor.

    `delta` is always there (fp32). Extraction also passes `base` and `post`, which the
    lossless codec needs; `gradient` is ∇L on calibration data, for gradient-informed selection.
    """

    name: str
    delta: torch.Tensor
    base: torch.Tensor | None = None
    post: torch.Tensor | None = None
    gradient: torch.Tensor | None = None


@dataclass(frozen=True)
class Encoded:
    """What a codec produced for one tensor."""

    payload: dict[str, torch.Tensor]  # key suffix ("" is the tensor's own name) -> tensor
    storage_dtype: str
    corrections: int = 0


class Codec(ABC):
    """One encoding of a delta tensor, with validated parameters."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = NoParams
    # Decoding is element-wise, so it gives the same bits on any device (a GPU decodes it where the
    # weights live). False for codecs whose decode reduces (lowrank's matmul sums in another order).
    device_exact: ClassVar[bool] = True

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    @abstractmethod
    def encode(self, src: TensorSource) -> Encoded:
        """Encode `src.delta` (or base/post, for exact codecs)."""

    @abstractmethod
    def decode(self, payload: dict[str, torch.Tensor], shape: list[int]) -> Delta:
        """The fp32 delta from payload tensors keyed by suffix; InvalidArtifactError if malformed."""

    @abstractmethod
    def suffixes(self, corrections: int) -> list[str]:
        """Payload key suffixes this codec stores for one tensor."""

    def recorded_params(self, encoded: Encoded) -> dict:
        """The parameters the manifest records for a tensor this codec encoded (what decodes it)."""
        return self.params.model_dump()

    def spec(self) -> str:
        """`name:key=value,...`, the form the CLI accepts."""
        items = ",".join(f"{k}={v}" for k, v in self.params.model_dump().items())
        return f"{self.name}:{items}" if items else self.name


def rows_view(t: torch.Tensor) -> torch.Tensor:
    """2-D view with one row per output feature (1-D tensors are one row)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def require(condition: bool, message: str) -> None:
    """Raise InvalidArtifactError(message) unless `condition` (payload validation)."""
    if not condition:
        raise InvalidArtifactError(message)


def require_shape(
    payload: dict[str, torch.Tensor], suffix: str, shape: list[int], dtype: torch.dtype
) -> None:
    """Check one payload tensor's shape and dtype, naming it if wrong."""
    t = payload[suffix]
    require(
        list(t.shape) == list(shape) and t.dtype == dtype,
        f"payload {suffix or 'values'!r} is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}",
    )
