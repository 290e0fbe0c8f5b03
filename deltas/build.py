"""Write an artifact tensor by tensor: encode with the plan's codec, record the manifest entry.

Used by extraction (from two checkpoints) and by compression (from another artifact),
so both write the same format the same way, atomically.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import torch

from deltas import __version__
from deltas.artifact import payload_sha256
from deltas.codecs import Codec, Encoded, TensorSource
from deltas.codecs import zstd as zstd_layer
from deltas.codecs.plan import CodecPlan
from deltas.manifest import (
    FILE_KEY_PREFIX,
    MANIFEST_KEY,
    DeltaManifest,
    ModelIdentity,
    TensorEntry,
)
from deltas.stream_writer import StreamingSafetensorsWriter


class ArtifactBuilder:
    """Streams encoded tensors to `out`; `finish` writes the manifest, `abort` removes the file."""

    def __init__(self, out: str | Path, plan: CodecPlan):
        self.plan = plan
        self.entries: list[TensorEntry] = []
        self._writer = StreamingSafetensorsWriter(out)

    def add(self, src: TensorSource, *, dtype: torch.dtype, base_l2: float) -> TensorEntry:
        """Encode one tensor with the plan's codec and write it."""
        codec = self.plan.codec_for(src.name, list(src.delta.shape))
        encoded = codec.encode(src)
        return self.add_encoded(src, codec, encoded, dtype=dtype, base_l2=base_l2)

    def add_encoded(
        self, src: TensorSource, codec: Codec, encoded: Encoded, *, dtype: torch.dtype, base_l2: float
    ) -> TensorEntry:
        """Write an already encoded tensor (e.g. an exact payload copied from another artifact)."""
        shape = list(src.delta.shape)
        rel_error = (
            0.0 if codec.lossless else relative_error(codec.decode(encoded.payload, shape).full(), src.delta)
        )
        payload = encoded.payload
        if self.plan.zstd:
            payload = {zstd_layer.SUFFIX: zstd_layer.compress_payload(payload)}
        stored = {src.name + suffix: tensor for suffix, tensor in payload.items()}
        for key, tensor in stored.items():
            self._writer.add(key, tensor)
        delta = src.delta.double()
        entry = TensorEntry(
            name=src.name,
            shape=shape,
            dtype=str(dtype).removeprefix("torch."),
            encoding=codec.name,
            params=codec.recorded_params(encoded),
            compression="zstd" if self.plan.zstd else "none",
            storage_dtype=encoded.storage_dtype,
            corrections=encoded.corrections,
            sha256=payload_sha256(stored),
            rel_error=rel_error,
            delta_l2=float(delta.norm()),
            delta_max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
            base_l2=base_l2,
        )
        self.entries.append(entry)
        return entry

    def finish(
        self,
        *,
        base: ModelIdentity,
        post: ModelIdentity,
        side_files: dict[str, str],
        chat_template: str | None,
        generation_config: dict,
    ) -> int:
        """Write the manifest and move the file into place; returns its size in bytes."""
        manifest = DeltaManifest(
            format_version=DeltaManifest.version_for(self.entries),
            tool_version=__version__,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            base=base,
            post=post,
            tensors=self.entries,
            files=sorted(side_files),
            chat_template=chat_template,
            generation_config=generation_config,
        )
        metadata = {MANIFEST_KEY: manifest.model_dump_json()}
        metadata.update({FILE_KEY_PREFIX + k: v for k, v in side_files.items()})
        return self._writer.finish(metadata)

    def abort(self) -> None:
        self._writer.abort()


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """‖approx − exact‖ / ‖exact‖."""
    ref = float(exact.double().norm())
    err = float((approx.double() - exact.double()).norm())
    return err / ref if ref else err  # a zero delta: the absolute error
