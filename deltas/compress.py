"""Re-encode an existing artifact with other codecs: `deltagate compress IN -o OUT --codec ...`."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from deltas.artifact import DeltaArtifact
from deltas.build import ArtifactBuilder
from deltas.codecs import Encoded, TensorSource
from deltas.codecs.plan import CodecPlan
from deltas.errors import CodecError
from deltas.extract import ExtractReport, Gradients, Progress, report_for


def compress_artifact(
    source: str | Path,
    out: str | Path,
    plan: CodecPlan,
    *,
    gradients: Gradients | None = None,
    progress: Progress | None = None,
) -> ExtractReport:
    """Write `source`'s delta re-encoded per `plan`; exact tensors the plan keeps exact are copied."""
    start = time.perf_counter()
    src_art = DeltaArtifact(source)
    src_art.verify()
    m = src_art.manifest
    builder = ArtifactBuilder(out, plan)
    try:
        entries = [e for e in m.tensors if not plan.excludes(e.name)]
        for i, entry in enumerate(entries):
            if progress:
                progress(entry.name, i, len(entries))
            codec = plan.codec_for(entry.name, entry.shape)
            delta = src_art.delta(entry.name).full().reshape(entry.shape)
            src = TensorSource(entry.name, delta, gradient=gradients(entry.name) if gradients else None)
            if codec.lossless:
                if entry.encoding != codec.name:
                    raise CodecError(
                        f"tensor {entry.name!r} is {entry.encoding} in {source}; an exact encoding can only "
                        "be copied from an exact artifact (re-extract from the checkpoints instead)"
                    )
                encoded = Encoded(src_art.payload(entry.name), entry.storage_dtype, entry.corrections)
                builder.add_encoded(src, codec, encoded, dtype=_dtype(entry.dtype), base_l2=entry.base_l2)
            else:
                builder.add(src, dtype=_dtype(entry.dtype), base_l2=entry.base_l2)
        size = builder.finish(
            base=m.base,
            post=m.post,
            side_files=src_art.side_files(),
            chat_template=m.chat_template,
            generation_config=m.generation_config,
        )
    except BaseException:
        builder.abort()
        raise
    DeltaArtifact(out).verify()
    return report_for(out, size, time.perf_counter() - start)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)
