"""Stream the merged weights of a recipe, tensor by tensor, in checkpoint naming."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from deltas.artifact import DeltaArtifact
from deltas.checkpoint import Checkpoint
from deltas.errors import IncompatibleError
from deltas.merge_methods import MergeTerm
from deltas.mix import merge_tensor
from deltas.recipe import Recipe
from deltas.stream_writer import StreamingSafetensorsWriter


def check_recipe(recipe: Recipe) -> None:
    """Refuse, naming the tensor, a recipe whose deltas do not fit its base's tensors."""
    base = Checkpoint(recipe.base)
    names = set(base.tensor_names())
    for term in recipe.deltas:
        artifact = DeltaArtifact(term.path)
        if artifact.manifest.base.architecture != base.architecture:
            raise IncompatibleError(
                f"delta {term.path} is for {artifact.manifest.base.architecture}, base is {base.architecture}"
            )
        for entry in artifact.manifest.tensors:
            if entry.name not in names:
                raise IncompatibleError(f"delta {term.path}: base has no tensor {entry.name!r}")
            shape, _ = base.shape_and_dtype(entry.name)
            if shape != entry.shape:
                raise IncompatibleError(
                    f"delta {term.path}: tensor {entry.name!r} is {entry.shape}, base has {shape}"
                )


def merged_tensors(recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, base + merge(Δ…)) for every base tensor, sorted so layers stay together."""
    base = Checkpoint(recipe.base)
    method = recipe.merge_method()
    artifacts = [(DeltaArtifact(t.path), t) for t in recipe.deltas]
    for name in base.tensor_names():
        tensor = base.get(name)
        terms = [MergeTerm(a.delta(name), t.alpha, t.density) for a, t in artifacts if a.has_tensor(name)]
        if not terms:
            yield name, tensor
            continue
        yield name, merge_tensor(tensor, method.combine(name, terms), tensor.dtype)


def write_merged_checkpoint(recipe: Recipe, out: str | Path) -> Path:
    """Write the recipe's weights as a standalone checkpoint (config/tokenizer from base)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(recipe.base).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    for term in recipe.deltas[:1]:  # a variant speaks with its (first) post model's tokenizer
        for fname, text in DeltaArtifact(term.path).side_files().items():
            (out / fname).write_text(text)
    writer = StreamingSafetensorsWriter(out / "model.safetensors")
    try:
        for name, tensor in merged_tensors(recipe):
            writer.add(name, tensor)
        writer.finish({"format": "pt"})
    except BaseException:
        writer.abort()
        raise
    return out
