"""Stream the merged weights of a recipe, tensor by tensor, in checkpoint naming."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from deltas import Checkpoint, DeltaArtifact, IncompatibleError, Recipe, open_artifact
from deltas.merge_methods import MergeTerm
from deltas.merge_methods.linear import LinearMerge
from deltas.mix import Delta, merge_tensor
from deltas.store import file_identity
from deltas.stream_writer import StreamingSafetensorsWriter
from loaders.shards import Shard


def check_recipe(recipe: Recipe) -> None:
    """Refuse, naming the tensor, a recipe whose deltas do not fit its base's tensors."""
    base = Checkpoint(recipe.base)
    names = set(base.tensor_names())
    for term in recipe.deltas:
        artifact = open_artifact(term.path)
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


class CheckpointSource:
    """Where a merge reads its inputs: here straight from the files, every time, on the host.

    loaders.resident.ResidentWeights keeps them in memory (and on a device) instead.
    """

    device = torch.device("cpu")

    def __init__(self) -> None:
        self._checkpoints: dict[str, Checkpoint] = {}
        self._artifacts: dict[str, tuple[tuple, DeltaArtifact]] = {}

    def checkpoint(self, path: str) -> Checkpoint:
        """The base checkpoint at `path` (opened once)."""
        if path not in self._checkpoints:
            self._checkpoints[path] = Checkpoint(path)
        return self._checkpoints[path]

    def artifact(self, path: str) -> DeltaArtifact:
        """The delta artifact at `path` (opened again if another file took its place since)."""
        identity = file_identity(path)
        cached = self._artifacts.get(path)
        if cached is None or cached[0] != identity:
            cached = self._artifacts[path] = (identity, open_artifact(path))
        return cached[1]

    def base_tensor(self, path: str, name: str) -> torch.Tensor:
        """Base tensor `name` of the checkpoint at `path`."""
        return self.checkpoint(path).get(name)

    def delta(self, path: str, name: str, device: torch.device) -> Delta:
        """The decoded delta of tensor `name` in artifact `path`, on `device`."""
        return self.artifact(path).delta(name, device)


def _decode_device(recipe: Recipe, source: CheckpointSource) -> torch.device:
    # ties/dare_* select entries with top-k and seeded masks, defined on the host: they combine
    # there; linear (the exact ParamΔ method) decodes and merges on the device.
    return source.device if isinstance(recipe.merge_method(), LinearMerge) else torch.device("cpu")


def read_inputs(recipe: Recipe, names: Iterable[str], source: CheckpointSource) -> None:
    """Read what merging `recipe`'s `names` needs through `source` — base tensors, decoded deltas, as
    merged_tensors asks for them — without merging: a source that keeps them (loaders/resident.py)
    has them ready for the first swap to the recipe."""
    decode_on = _decode_device(recipe, source)
    artifacts = [(source.artifact(t.path), t) for t in recipe.deltas]
    for name in names:
        source.base_tensor(recipe.base, name)
        for artifact, term in artifacts:
            if artifact.has_tensor(name):
                source.delta(term.path, name, decode_on)


def merged_tensors(
    recipe: Recipe,
    names: Iterable[str] | None = None,
    source: CheckpointSource | None = None,
    shards: dict[str, Shard] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, base + merge(Δ…)) for `names` (default: every base tensor, sorted so layers stay
    together), merged on `source.device`; tensors no delta covers are yielded as the base's. A
    tensor with a shard (a tensor-parallel rank's slice) is merged only there, NaN elsewhere.

    `buffers`: output tensors to merge into, by name, kept (and added to) for the next call — memory
    that is already mapped, so a merge does not pay the page faults of a fresh allocation. A
    yielded buffer is overwritten by the next call that merges that tensor."""
    source = source or CheckpointSource()
    method = recipe.merge_method()
    decode_on = _decode_device(recipe, source)
    artifacts = [(source.artifact(t.path), t) for t in recipe.deltas]
    for name in names if names is not None else source.checkpoint(recipe.base).tensor_names():
        tensor = source.base_tensor(recipe.base, name)
        covering = [t for a, t in artifacts if a.has_tensor(name)]
        if not covering:
            yield name, tensor
            continue
        terms = [MergeTerm(source.delta(t.path, name, decode_on), t.alpha, t.density) for t in covering]
        combined = method.combine(name, terms)
        if decode_on != source.device:
            combined = [(d.to(source.device), alpha) for d, alpha in combined]
        tensor = tensor.to(source.device, non_blocking=True)
        shard = shards.get(name) if shards else None
        if shard is None:
            out = buffers.get(name) if buffers is not None else None
            like = (tensor.shape, tensor.dtype, tensor.device)
            if out is None or (out.shape, out.dtype, out.device) != like:
                out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            if buffers is not None:
                buffers[name] = out
            yield name, merge_tensor(tensor, combined, tensor.dtype, out=out)
            continue
        full = torch.full(tensor.shape, float("nan"), dtype=tensor.dtype, device=tensor.device)
        dim, start, size = shard.dim, shard.start, shard.size
        part = [(d.narrow(dim, start, size), alpha) for d, alpha in combined]
        full.narrow(dim, start, size).copy_(merge_tensor(tensor.narrow(dim, start, size), part, tensor.dtype))
        yield name, full


def write_merged_checkpoint(recipe: Recipe, out: str | Path) -> Path:
    """Write the recipe's weights as a standalone checkpoint (config/tokenizer from base)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(recipe.base).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    for term in recipe.deltas[:1]:  # a variant speaks with its (first) post model's tokenizer
        for fname, text in open_artifact(term.path).side_files().items():
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
