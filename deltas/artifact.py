"""Read and verify delta artifacts: one safetensors file with a JSON manifest in its metadata."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from deltas.checkpoint import tensor_bytes
from deltas.codecs import Codec, get_codec
from deltas.codecs import zstd as zstd_layer
from deltas.errors import CodecError, InvalidArtifactError
from deltas.manifest import FILE_KEY_PREFIX, MANIFEST_KEY, DeltaManifest, TensorEntry
from deltas.mix import Delta
from deltas.store import materialize


class DeltaArtifact:
    """An opened delta file: manifest, side files, lazily decoded fp32 deltas."""

    def __init__(self, path: str | Path):
        self.path = materialize(path)  # an artifact-store URI: this node's verified copy
        if self.path.is_dir():
            raise InvalidArtifactError(f"{self.path}: is a directory, not a delta file")
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
        self._codecs = {t.name: self._codec_of(t) for t in self.manifest.tensors}
        self._check_keys()

    def _codec_of(self, entry: TensorEntry) -> Codec:
        try:
            return get_codec(entry.encoding, entry.params)
        except CodecError as exc:
            raise InvalidArtifactError(f"{self.path}: tensor {entry.name!r}: {exc}") from None

    def _stored_keys(self, entry: TensorEntry) -> list[str]:
        if entry.compression == "zstd":
            return [entry.name + zstd_layer.SUFFIX]
        return [entry.name + s for s in self._codecs[entry.name].suffixes(entry.corrections)]

    def _check_keys(self) -> None:
        keys = set(self._handle.keys())
        for entry in self.manifest.tensors:
            for key in self._stored_keys(entry):
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

    def _stored(self, entry: TensorEntry) -> dict[str, torch.Tensor]:
        try:
            return {k: self._handle.get_tensor(k) for k in self._stored_keys(entry)}
        except Exception as exc:
            raise InvalidArtifactError(f"{self.path}: cannot read tensor {entry.name!r}: {exc}") from exc

    def entry(self, name: str) -> TensorEntry:
        """The manifest entry of tensor `name`."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in this delta") from None

    def payload(self, name: str) -> dict[str, torch.Tensor]:
        """Tensor `name`'s codec payload keyed by suffix (zstd already undone)."""
        entry = self.entry(name)
        stored = self._stored(entry)
        try:
            return self._unpack(entry, stored)
        except InvalidArtifactError as exc:
            raise InvalidArtifactError(f"{self.path}: tensor {name!r}: {exc}") from None

    def delta(self, name: str, device: torch.device | str | None = None) -> Delta:
        """The decoded fp32 delta for tensor `name`, decoded on `device` where its codec gives the
        same bits there (element-wise codecs), else on the host and then moved."""
        entry = self.entry(name)
        stored = self._stored(entry)
        if device is None or torch.device(device).type == "cpu":
            return self._decode(entry, stored)
        if not self._codecs[name].device_exact:
            return self._decode(entry, stored).to(device)
        payload = {k: v.to(device, non_blocking=True) for k, v in self._unpack(entry, stored).items()}
        try:
            return self._codecs[name].decode(payload, entry.shape)
        except InvalidArtifactError as exc:
            raise InvalidArtifactError(f"{self.path}: tensor {name!r} ({entry.encoding}): {exc}") from None

    def _unpack(self, entry: TensorEntry, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if entry.compression == "zstd":
            suffixes = self._codecs[entry.name].suffixes(entry.corrections)
            return zstd_layer.decompress_payload(stored[entry.name + zstd_layer.SUFFIX], suffixes)
        return {key.removeprefix(entry.name): tensor for key, tensor in stored.items()}

    def _decode(self, entry: TensorEntry, stored: dict[str, torch.Tensor]) -> Delta:
        try:
            return self._codecs[entry.name].decode(self._unpack(entry, stored), entry.shape)
        except InvalidArtifactError as exc:
            raise InvalidArtifactError(
                f"{self.path}: tensor {entry.name!r} ({entry.encoding}): {exc}"
            ) from None

    def verify(self) -> None:
        """Check every payload against its checksum, for NaN/Inf, and that it decodes; raise if not."""
        for entry in self.manifest.tensors:
            stored = self._stored(entry)
            if payload_sha256(stored) != entry.sha256:
                raise InvalidArtifactError(
                    f"{self.path}: tensor {entry.name!r} does not match its checksum; the file is corrupt"
                )
            for key, tensor in stored.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise InvalidArtifactError(f"{self.path}: tensor {key!r} holds NaN or Inf")
            self._decode(entry, stored)  # the payload's sizes agree with the manifest

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
            "encodings": sorted({t.encoding for t in m.tensors}),
            "lossless": m.lossless,
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
