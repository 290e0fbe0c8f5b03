"""Extract Δ = θ_post − θ_base into an artifact, streamed tensor by tensor, then verify it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from deltas.artifact import DeltaArtifact
from deltas.build import ArtifactBuilder
from deltas.checkpoint import Checkpoint, check_compatible, tensor_digest
from deltas.codecs import TensorSource
from deltas.codecs.plan import CodecPlan
from deltas.errors import InvalidArtifactError
from deltas.manifest import ModelIdentity
from deltas.mix import merge_tensor

Progress = Callable[[str, int, int], None]  # (tensor name, index, total)
Gradients = Callable[[str], torch.Tensor | None]  # tensor name -> ∇L on calibration data


@dataclass(frozen=True)
class ExtractReport:
    """What an extraction (or compression) produced."""

    path: Path
    tensors: int
    elements: int
    corrections: int
    size_bytes: int
    seconds: float
    lossless: bool = True
    max_rel_error: float = 0.0
    unchanged: int = 0  # tensors bit-equal in base and post: not stored (a swap leaves them alone)


def extract_delta(
    base_dir: str | Path,
    post_dir: str | Path,
    out: str | Path,
    *,
    plan: CodecPlan | None = None,
    gradients: Gradients | None = None,
    progress: Progress | None = None,
) -> ExtractReport:
    """Write post − base to `out` atomically, encoded per `plan` (default: exact), and verify it."""
    start = time.perf_counter()
    base, post = Checkpoint(base_dir), Checkpoint(post_dir)
    check_compatible(base, post)
    builder = ArtifactBuilder(out, plan or CodecPlan())
    names = base.tensor_names()
    base_hash, post_hash = hashlib.sha256(), hashlib.sha256()
    unchanged = 0
    try:
        for i, name in enumerate(names):
            if progress:
                progress(name, i, len(names))
            b, p = base.get(name), post.get(name)
            _require_finite(name, b, "base")
            _require_finite(name, p, "post")
            tensor_digest(base_hash, name, b)
            tensor_digest(post_hash, name, p)  # over every tensor: the identity of the whole model
            if builder.plan.excludes(name):
                continue
            if torch.equal(b, p):  # frozen in the fine-tune (LoRA merges, GMT's masks): Δ is 0, not stored
                unchanged += 1
                continue
            delta = (p.double() - b.double()).float()
            src = TensorSource(name, delta, b, p, gradients(name) if gradients else None)
            builder.add(src, dtype=p.dtype, base_l2=float(b.double().norm()))
        if unchanged == len(names):
            raise InvalidArtifactError("the post model equals its base: every tensor is bit-equal, no delta")
        size = builder.finish(
            base=_identity(base, base_hash.hexdigest()),
            post=_identity(post, post_hash.hexdigest()),
            side_files=post.side_files(),
            chat_template=post.chat_template(),
            generation_config=post.generation_config(),
        )
    except BaseException:
        builder.abort()
        raise
    verify_reconstruction(out, base, post)
    return dataclasses.replace(report_for(out, size, time.perf_counter() - start), unchanged=unchanged)


def verify_reconstruction(path: str | Path, base: Checkpoint, post: Checkpoint) -> None:
    """Re-read the written artifact: exact tensors must give base + Δ == post; all must decode."""
    artifact = DeltaArtifact(path)
    for name in artifact.tensor_names:
        delta = artifact.delta(name)
        if not artifact.entry(name).lossless:
            continue  # lossy by design; its error is recorded in the manifest
        b, p = base.get(name), post.get(name)
        if not torch.equal(merge_tensor(b, [(delta, 1.0)], p.dtype), p):
            Path(path).unlink(missing_ok=True)
            raise InvalidArtifactError(f"verification failed: base + Δ differs from post at tensor {name!r}")


def report_for(path: str | Path, size: int, seconds: float) -> ExtractReport:
    """Summarise a written artifact from its manifest."""
    m = DeltaArtifact(path).manifest
    return ExtractReport(
        path=Path(path),
        tensors=len(m.tensors),
        elements=sum(e.numel for e in m.tensors),
        corrections=m.total_corrections,
        size_bytes=size,
        seconds=seconds,
        lossless=m.lossless,
        max_rel_error=max((t.rel_error for t in m.tensors), default=0.0),
    )


def _require_finite(name: str, tensor: torch.Tensor, which: str) -> None:
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise InvalidArtifactError(f"{which} tensor {name!r} holds NaN or Inf")


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
            "lossless": report.lossless,
            "max_rel_error": round(report.max_rel_error, 6),
            "unchanged": report.unchanged,
        }
    )
