"""Optional lossless layer: one tensor's whole payload as a zstd-compressed safetensors blob."""

from __future__ import annotations

import torch
import zstandard
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from deltas.errors import InvalidArtifactError

SUFFIX = "::zstd"
LEVEL = 10


def compress_payload(payload: dict[str, torch.Tensor]) -> torch.Tensor:
    """The payload (suffix -> tensor) serialised with safetensors and zstd-compressed, as uint8."""
    blob = st_save({_key(k): v.contiguous() for k, v in payload.items()})
    packed = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(blob)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def decompress_payload(stored: torch.Tensor, suffixes: list[str]) -> dict[str, torch.Tensor]:
    """Inverse of compress_payload; InvalidArtifactError if corrupt or missing a suffix."""
    try:
        blob = zstandard.ZstdDecompressor().decompress(stored.numpy().tobytes())
        tensors = st_load(blob)
    except Exception as exc:  # zstd and safetensors raise their own types for corrupt input
        raise InvalidArtifactError(f"zstd payload is corrupt ({exc})") from exc
    payload = {}
    for suffix in suffixes:
        if _key(suffix) not in tensors:
            raise InvalidArtifactError(f"zstd payload lacks {suffix or 'values'!r}")
        payload[suffix] = tensors[_key(suffix)]
    return payload


def _key(suffix: str) -> str:
    return suffix or "::self"  # safetensors keys must be non-empty
