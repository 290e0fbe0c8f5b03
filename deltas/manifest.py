"""The delta artifact's manifest: what a delta is, where it came from, how it is encoded.

The manifest travels inside the artifact's safetensors metadata as JSON under one key
(safetensors metadata is ``dict[str, str]``), so a single file is self-describing.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from deltas.codecs import CODECS

# v1: dense tensors only. v2: any codec, optional zstd. v3: dense tensors in the sparse layout
# (nonzero entries and their indices). Each artifact is written as the oldest version that describes
# it, so older deltagate releases keep reading what they can and name the upgrade for the rest.
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
MANIFEST_KEY = "deltagate.manifest"
FILE_KEY_PREFIX = "deltagate.file/"


class ModelIdentity(BaseModel):
    """Who a checkpoint is: enough to tell whether a delta belongs to a base."""

    source: str = Field(description="where the checkpoint was read from (informational)")
    architecture: str
    config_fingerprint: str = Field(description="sha256 of the structural config fields")
    content_hash: str = Field(description="sha256 over every tensor's name, dtype, shape, bytes")


class TensorEntry(BaseModel):
    """One delta tensor: its encoding and the statistics `inspect` shows."""

    name: str
    shape: list[int]
    dtype: str = Field(description="the model's dtype for this tensor")
    encoding: str = Field("dense", description="codec name (deltas.codecs)")
    params: dict[str, int | float | str] = Field(default_factory=dict, description="codec parameters")
    compression: Literal["none", "zstd"] = "none"
    storage_dtype: str
    corrections: int = Field(ge=0, description="elements stored exactly beside the dense part")
    sha256: str = Field(description="sha256 of the stored payload tensors, in key order")
    rel_error: float = Field(
        0.0, ge=0, description="‖decoded − exact Δ‖ / ‖exact Δ‖ (0: lossless on its base)"
    )
    delta_l2: float
    delta_max_abs: float
    base_l2: float

    @field_validator("delta_l2", "delta_max_abs", "base_l2", "rel_error")
    @classmethod
    def _finite(cls, value: float) -> float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("delta statistics must be finite; the delta holds NaN or Inf")
        return value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def lossless(self) -> bool:
        """Whether its codec rebuilds the post-trained tensor exactly on the source base."""
        codec = CODECS.get(self.encoding)
        return codec is not None and codec.lossless


class DeltaManifest(BaseModel):
    """Everything an artifact says about itself besides its tensor bytes."""

    format_version: int
    tool_version: str
    created_at: str
    base: ModelIdentity
    post: ModelIdentity
    tensors: list[TensorEntry]
    files: list[str] = Field(
        default_factory=list,
        description="post-model side files carried in metadata (tokenizer, chat template, ...)",
    )
    chat_template: str | None = None
    generation_config: dict = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"artifact format version {value} is not supported by this deltagate "
                f"(supports {', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade deltagate"
            )
        return value

    @staticmethod
    def version_for(tensors: list[TensorEntry]) -> int:
        """The oldest format version that can describe these tensors."""
        if any(t.encoding == "dense" and t.params.get("layout") == "sparse" for t in tensors):
            return 3
        plain = all(t.encoding == "dense" and t.compression == "none" for t in tensors)
        return 1 if plain else 2

    def tensor(self, name: str) -> TensorEntry:
        """The entry for `name`; KeyError naming the tensor if absent."""
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise KeyError(f"tensor {name!r} is not in this delta")

    @property
    def lossless(self) -> bool:
        """Every tensor rebuilds its post-trained weights exactly on the source base."""
        return all(t.lossless for t in self.tensors)

    @property
    def total_corrections(self) -> int:
        return sum(t.corrections for t in self.tensors)
