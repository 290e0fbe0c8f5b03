"""Bases: checking a checkpoint, placing it on an engine, and how a delta relates to it.

A base registered while serving is hot-loaded by an engine already running a base of the
same architecture, config, tensor names, shapes and dtypes (its weights are simply another
recipe's `base`); anything else needs an engine of its own. A delta on a base is `exact`
when it was extracted on that very base (same content hash) and `transferred` otherwise
(ParamΔ: an old delta on an updated base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from deltas.checkpoint import (
    Checkpoint,
    check_checkpoint,
    content_hash,
    serving_difference,
    vocabulary_digest,
)
from server.registry import BaseRecord, DeltaRecord

Provenance = Literal["exact", "transferred"]


def describe_base(name: str, path: Path, previous: BaseRecord | None = None) -> BaseRecord:
    """Check the checkpoint at `path` and record what deltas are compared against.

    The content hash reads every tensor; it is reused from `previous` while the weight files
    are unchanged, so restarts stay fast on large bases.
    """
    ckpt = Checkpoint(path)
    check_checkpoint(ckpt)
    files = _weight_files_identity(path)
    if previous is not None and previous.path == str(path) and previous.files == files:
        digest = previous.content_hash
    else:
        digest = content_hash(ckpt)
    return BaseRecord(
        name=name,
        path=str(path),
        architecture=ckpt.architecture,
        content_hash=digest,
        vocab_digest=vocabulary_digest(ckpt.side_files()),
        files=files,
    )


def place(candidate: Path, engines: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """The engine (by its base's name) that can hot-load `candidate`, or why none can.

    `engines` maps each running engine's name to its start-up base path.
    """
    reasons = {}
    ckpt = Checkpoint(candidate)
    for engine, base_path in engines.items():
        problem = serving_difference(Checkpoint(base_path), ckpt)
        if problem is None:
            return engine, {}
        reasons[engine] = problem
    return None, reasons


def provenance(delta: DeltaRecord, base: BaseRecord) -> Provenance:
    """`exact` if `delta` was extracted on `base`, else `transferred`."""
    return "exact" if base.content_hash and delta.base_content_hash == base.content_hash else "transferred"


def vocabulary_problem(delta: DeltaRecord, base: BaseRecord) -> str | None:
    """Why a transferred `delta` reads token ids differently from `base` (None: same vocabulary)."""
    if provenance(delta, base) == "exact" or not delta.vocab_digest or not base.vocab_digest:
        return None  # extracted on this base, or a side without a tokenizer.json to compare
    if delta.vocab_digest == base.vocab_digest:
        return None
    return (
        f"delta {delta.name!r} was extracted with another tokenizer than base {base.name!r}'s "
        "(their token -> id maps differ), so its embedding rows may mean other tokens; "
        "set allow_vocab_mismatch: true to serve it anyway"
    )


def _weight_files_identity(path: Path) -> str:
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*.safetensors"))]
    return ";".join(f"{n}:{s}:{m}" for n, s, m in stats)
