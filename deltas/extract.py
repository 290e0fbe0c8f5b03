"""Extract Δ = θ_post − θ_base into an artifact, streamed tensor by tensor, then verify it."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from deltas import __version__
from deltas.artifact import DeltaArtifact, payload_sha256
from deltas.checkpoint import Checkpoint, check_compatible, tensor_digest
from deltas.codecs import get_codec
from deltas.errors import InvalidArtifactError
from deltas.manifest import (
    FILE_KEY_PREFIX,
    FORMAT_VERSION,
    MANIFEST_KEY,
    DeltaManifest,
    ModelIdentity,
    TensorEntry,
)
from deltas.mix import merge_tensor
from deltas.stream_writer import StreamingSafetensorsWriter

Progress = Callable[[str, int, int], None]  # (tensor name, index, total)


@dataclass(frozen=True)
class ExtractReport:
    """What an extraction produced."""

    path: Path
    tensors: int
    elements: int
    corrections: int
    size_bytes: int
    seconds: float


def extract_delta(
    base_dir: str | Path,
    post_dir: str | Path,
    out: str | Path,
    *,
    codec: str = "dense",
    progress: Progress | None = None,
) -> ExtractReport:
    """Write post − base to `out` atomically and verify it rebuilds post exactly."""
    start = time.perf_counter()
    base, post = Checkpoint(base_dir), Checkpoint(post_dir)
    check_compatible(base, post)
    enc = get_codec(codec)
    names = base.tensor_names()
    writer = StreamingSafetensorsWriter(out)
    base_hash, post_hash = hashlib.sha256(), hashlib.sha256()
    entries: list[TensorEntry] = []
    try:
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names))
            b, p = base.get(name), post.get(name)
            _require_finite(name, b, "base")
            _require_finite(name, p, "post")
            tensor_digest(base_hash, name, b)
            tensor_digest(post_hash, name, p)
            encoded = enc.encode(name, b, p)
            for key, tensor in encoded.payload.items():
                writer.add(key, tensor)
            entries.append(_entry(name, b, p, encoded, codec))
        manifest = DeltaManifest(
            format_version=FORMAT_VERSION,
            tool_version=__version__,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            base=_identity(base, base_hash.hexdigest()),
            post=_identity(post, post_hash.hexdigest()),
            tensors=entries,
            files=sorted(post.side_files()),
            chat_template=post.chat_template(),
            generation_config=post.generation_config(),
        )
        metadata = {MANIFEST_KEY: manifest.model_dump_json()}
        metadata.update({FILE_KEY_PREFIX + k: v for k, v in post.side_files().items()})
        size = writer.finish(metadata)
    except BaseException:
        writer.abort()
        raise
    verify_reconstruction(out, base, post)
    return ExtractReport(
        path=Path(out),
        tensors=len(entries),
        elements=sum(e.numel for e in entries),
        corrections=manifest.total_corrections,
        size_bytes=size,
        seconds=time.perf_counter() - start,
    )


def verify_reconstruction(path: str | Path, base: Checkpoint, post: Checkpoint) -> None:
    """Re-read the written artifact and check base + Δ == post for every tensor."""
    artifact = DeltaArtifact(path)
    for name in artifact.tensor_names:
        b, p = base.get(name), post.get(name)
        rebuilt = merge_tensor(b, [(artifact.delta(name), 1.0)], p.dtype)
        if not torch.equal(rebuilt, p):
            Path(path).unlink(missing_ok=True)
            raise InvalidArtifactError(f"verification failed: base + Δ differs from post at tensor {name!r}")


def _require_finite(name: str, tensor: torch.Tensor, which: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InvalidArtifactError(f"{which} tensor {name!r} holds NaN or Inf")


def _entry(name: str, b: torch.Tensor, p: torch.Tensor, encoded, codec: str) -> TensorEntry:
    delta = p.double() - b.double()
    return TensorEntry(
        name=name,
        shape=list(p.shape),
        dtype=str(p.dtype).removeprefix("torch."),
        encoding=codec,
        storage_dtype=encoded.storage_dtype,
        corrections=encoded.corrections,
        sha256=payload_sha256(encoded.payload),
        delta_l2=float(delta.norm()),
        delta_max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
        base_l2=float(b.double().norm()),
    )


def _identity(ckpt: Checkpoint, content: str) -> ModelIdentity:
    return ModelIdentity(
        source=str(ckpt.path.resolve()),
        architecture=ckpt.architecture,
        config_fingerprint=ckpt.config_fingerprint(),
        content_hash=content,
    )


def describe(report: ExtractReport) -> str:
    return json.dumps(
        {
            "path": str(report.path),
            "tensors": report.tensors,
            "elements": report.elements,
            "corrections": report.corrections,
            "size_bytes": report.size_bytes,
            "seconds": round(report.seconds, 2),
        }
    )
