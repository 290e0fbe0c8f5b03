"""Which slice of a checkpoint tensor a tensor-parallel rank loads, so it merges only that slice.

vLLM's weight loaders hand each rank the whole checkpoint tensor and narrow it to the rank's shard.
A rank that merged the whole tensor would do tp_size times the work; with the slice known it merges
only its own. The slices follow vLLM's parallel linear layers and vocabulary embeddings (read from
the layer's attributes, as its loaders compute them): column-parallel layers split the output
dimension (QKV by heads, with key/value heads replicated when there are fewer than ranks; merged
gate/up per part), row-parallel ones the input dimension, embeddings and LM heads the vocabulary.
Anything else (norms, biases, a layer type not listed) is merged whole — still exact, just not
split. The rest of the tensor handed to the loader is NaN, so a loader that read outside its slice
would poison the answer rather than pass silently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """The slice [start, start + size) along `dim` of one checkpoint tensor."""

    dim: int
    start: int
    size: int


UNQUANTIZED = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


def shard_of(module: object, part: int | None) -> Shard | None:
    """The slice of its checkpoint weight that `module` (a vLLM layer) loads on its rank; `part`: the
    tensor's index among the parts a fused module packs (q, k, v / gate, up), None for an unfused
    module. None: the whole tensor (replicated, quantized, or a layer kind not known here)."""
    tp_size = getattr(module, "tp_size", 1)
    kind = type(module).__name__
    if tp_size == 1 or type(getattr(module, "quant_method", None)).__name__ not in UNQUANTIZED:
        return None
    if kind in ("VocabParallelEmbedding", "ParallelLMHead"):
        start, end = module.shard_indices.org_vocab_start_index, module.shard_indices.org_vocab_end_index
        return Shard(0, start, end - start)
    rank = module.tp_rank
    if kind == "QKVParallelLinear" and part is not None:
        if part == 0:
            size = module.num_heads * module.head_size
            return Shard(0, rank * size, size)
        head = module.v_head_size if part == 2 else module.head_size
        size = module.num_kv_heads * head
        return Shard(0, (rank // module.num_kv_head_replicas) * size, size)
    if kind == "MergedColumnParallelLinear" and part is not None:
        size = module.output_sizes[part] // tp_size
        return Shard(0, rank * size, size)
    if kind == "ColumnParallelLinear" and part is None:
        size = module.output_size_per_partition
        return Shard(0, rank * size, size)
    if kind == "RowParallelLinear" and part is None:
        size = module.input_size_per_partition
        return Shard(1, rank * size, size)
    return None


def rank_shards(model, names: list[str], packed: dict[str, list[str]]) -> dict[str, Shard]:
    """Checkpoint weight name -> the slice this rank loads, for every weight of a layer split across
    ranks (empty without tensor parallelism)."""
    fused = {p: (whole, i) for whole, parts in packed.items() for i, p in enumerate(parts)}
    shards = {}
    for name in names:
        *path, leaf = name.split(".")
        if leaf != "weight" or not path:
            continue
        whole, part = fused.get(path[-1], (path[-1], None))
        try:
            module = model.get_submodule(".".join([*path[:-1], whole]))
        except AttributeError:
            continue
        shard = shard_of(getattr(module, "base_layer", module), part)  # a LoRA wrapper holds the layer
        if shard is not None:
            shards[name] = shard
    return shards
