"""Read and verify delta artifacts: one safetensors file with a JSON manifest in its metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from deltas.checkpoint import tensor_bytes
from deltas.codecs import get_codec
from deltas.errors import InvalidArtifactError
from deltas.manifest import FILE_KEY_PREFIX, MANIFEST_KEY, DeltaManifest, TensorEntry
from deltas.mix import Delta


class DeltaArtifact:
    """An opened delta file: manifest, side files, lazily decoded fp32 deltas."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidArtifactError(f"{self.path}: no such delta file")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
            metadata = self._handle.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise InvalidArtifactError(
                f"{self.path}: not a readable safetensors file ({exc}); is it truncated?"
            ) from exc
        if MANIFEST_KEY not in metadata:
            raise InvalidArtifactError(
                f"{self.path}: no deltagate manifest; create artifacts with `deltagate extract`"
            )
        try:
            self.manifest = DeltaManifest.model_validate_json(metadata[MANIFEST_KEY])
        except ValidationError as exc:
            raise InvalidArtifactError(f"{self.path}: invalid manifest: {exc}") from exc
        self._metadata = metadata
        self._entries = {t.name: t for t in self.manifest.tensors}  # swaps look up every tensor
        self._check_keys()

    def _check_keys(self) -> None:
        keys = set(self._handle.keys())
        for entry in self.manifest.tensors:
            for key in get_codec(entry.encoding).payload_keys(entry.name, entry.corrections):
                if key not in keys:
                    raise InvalidArtifactError(f"{self.path}: payload {key!r} missing")

    @property
    def tensor_names(self) -> list[str]:
        return list(self._entries)

    def has_tensor(self, name: str) -> bool:
        return name in self._entries

    def side_files(self) -> dict[str, str]:
        """Post-model side files (tokenizer, generation config, ...) by file name."""
        return {
            key.removeprefix(FILE_KEY_PREFIX): value
            for key, value in self._metadata.items()
            if key.startswith(FILE_KEY_PREFIX)
        }

    def _payload(self, entry: TensorEntry) -> dict[str, torch.Tensor]:
        keys = get_codec(entry.encoding).payload_keys(entry.name, entry.corrections)
        try:
            return {k: self._handle.get_tensor(k) for k in keys}
        except Exception as exc:
            raise InvalidArtifactError(f"{self.path}: cannot read tensor {entry.name!r}: {exc}") from exc

    def delta(self, name: str) -> Delta:
        """The decoded fp32 delta for tensor `name`."""
        try:
            entry = self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in this delta") from None
        return get_codec(entry.encoding).decode(name, self._payload(entry), entry.shape)

    def verify(self) -> None:
        """Check every payload against its recorded hash and for NaN/Inf; raise if not."""
        for entry in self.manifest.tensors:
            payload = self._payload(entry)
            if payload_sha256(payload) != entry.sha256:
                raise InvalidArtifactError(
                    f"{self.path}: tensor {entry.name!r} does not match its checksum; the file is corrupt"
                )
            for key, tensor in payload.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise InvalidArtifactError(f"{self.path}: tensor {key!r} holds NaN or Inf")

    def summary(self) -> dict:
        """Manifest as JSON-able dict (without per-tensor entries) for listings."""
        m = self.manifest
        return {
            "path": str(self.path),
            "size_bytes": self.path.stat().st_size,
            "base": m.base.model_dump(),
            "post": m.post.model_dump(),
            "tensors": len(m.tensors),
            "corrections": m.total_corrections,
            "tool_version": m.tool_version,
            "created_at": m.created_at,
        }


def payload_sha256(payload: dict[str, torch.Tensor]) -> str:
    """sha256 over payload tensors in key order."""
    hasher = hashlib.sha256()
    for key in sorted(payload):
        hasher.update(key.encode())
        hasher.update(tensor_bytes(payload[key]))
    return hasher.hexdigest()


def open_artifact(path: str | Path, *, verify: bool = False) -> DeltaArtifact:
    """Open (and optionally fully verify) a delta artifact."""
    artifact = DeltaArtifact(path)
    if verify:
        artifact.verify()
    return artifact


def manifest_json(artifact: DeltaArtifact) -> str:
    return json.dumps(artifact.manifest.model_dump(), indent=2)
