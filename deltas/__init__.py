"""Delta artifacts: extraction, codecs, merge methods and verification. Never imports vLLM.

The public surface is the handful of names below; everything else is an implementation module.

Example:
    >>> from deltas import extract_delta, open_artifact
    >>> extract_delta("models/base", "models/post", "post.safetensors")   # verified on write
    >>> artifact = open_artifact("post.safetensors", verify=True)
    >>> artifact.manifest.base.architecture
    'LlamaForCausalLM'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it; imported on first use, so `deltas.__version__` costs nothing
# (no torch import) and a caller's `from deltas import Recipe` reads like the library's API.
_PUBLIC = {
    "open_artifact": "deltas.artifact",  # the one way to open (and verify) an artifact
    "DeltaArtifact": "deltas.artifact",
    "extract_delta": "deltas.extract",
    "compress_artifact": "deltas.compress",
    "CodecPlan": "deltas.codecs.plan",
    "merge_tensor": "deltas.mix",  # base + Σ αᵢ·Δᵢ for one tensor, fp32 accumulation
    "Recipe": "deltas.recipe",
    "DeltaTerm": "deltas.recipe",
    "RecipeFile": "deltas.recipe",
    "get_method": "deltas.merge_methods",
    "Checkpoint": "deltas.checkpoint",
    "ArtifactStore": "deltas.store",
    "DeltaError": "deltas.errors",  # the base class of every error deltas/ raises on purpose
    "InvalidArtifactError": "deltas.errors",
    "IncompatibleError": "deltas.errors",
}
__all__ = [
    "__version__",
    "open_artifact",
    "DeltaArtifact",
    "extract_delta",
    "compress_artifact",
    "CodecPlan",
    "merge_tensor",
    "Recipe",
    "DeltaTerm",
    "RecipeFile",
    "get_method",
    "Checkpoint",
    "ArtifactStore",
    "DeltaError",
    "InvalidArtifactError",
    "IncompatibleError",
]

if TYPE_CHECKING:
    from deltas.artifact import DeltaArtifact, open_artifact
    from deltas.checkpoint import Checkpoint
    from deltas.codecs.plan import CodecPlan
    from deltas.compress import compress_artifact
    from deltas.errors import DeltaError, IncompatibleError, InvalidArtifactError
    from deltas.extract import extract_delta
    from deltas.merge_methods import get_method
    from deltas.mix import merge_tensor
    from deltas.recipe import DeltaTerm, Recipe, RecipeFile
    from deltas.store import ArtifactStore


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deltas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
