"""What a swap rewrites, staging and commit, and the resident weights — without vLLM (pico tensors)."""

import os
import threading
import time

import pytest
import torch

from deltas import Checkpoint, DeltaTerm, Recipe, open_artifact
from deltas.mix import Delta, merge_tensor
from loaders.merge import CheckpointSource, merged_tensors
from loaders.resident import ResidencyConfig, ResidentWeights
from loaders.staging import Swapper, module_groups

LLAMA_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _swapper(tied, source=None, incremental=True) -> Swapper:
    names = Checkpoint(tied.base).tensor_names()
    source = source or ResidentWeights(torch.device("cpu"))
    return Swapper(
        Recipe(base=str(tied.base)),
        names,
        module_groups(names, LLAMA_PACKED),
        source,
        incremental=incremental,
    )


class Recorder:
    """A reload that keeps what it was given, applied onto a dict of 'engine' weights."""

    def __init__(self, base: Checkpoint):
        self.weights = dict(base.iter_tensors())
        self.calls: list[list[str]] = []

    def __call__(self, tensors):
        self.calls.append([n for n, _ in tensors])
        for name, tensor in tensors:
            self.weights[name] = tensor.clone()


def _expected(recipe: Recipe) -> dict[str, torch.Tensor]:
    return dict(merged_tensors(recipe))


def _equal(weights: dict, recipe: Recipe) -> bool:
    want = _expected(recipe)
    return weights.keys() == want.keys() and all(torch.equal(weights[n], want[n]) for n in want)


def test_fused_modules_group_their_checkpoint_tensors():
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.embed_tokens.weight",
    ]
    groups = module_groups(names, LLAMA_PACKED)
    assert groups[names[0]] == groups[names[1]] == "model.layers.0.self_attn.qkv_proj"
    assert groups[names[2]] == "model.layers.0.self_attn.o_proj"
    assert groups[names[3]] == groups[names[4]] == "model.layers.1.mlp.gate_up_proj"
    assert groups[names[5]] == "model.embed_tokens"


def test_a_swap_rewrites_only_what_either_recipe_covers_widened_to_whole_modules(tied, tied_parts):
    swapper = _swapper(tied)
    part1 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))])
    part2 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part2))])
    full = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    assert set(swapper.plan(part1)) == set(tied_parts.part1_rewrites)  # from the base
    assert len(swapper.plan(full)) == len(swapper.names)
    swapper.resident = part1
    assert set(swapper.plan(part2)) == set(tied_parts.part1_rewrites) | set(tied_parts.part2_rewrites)
    assert swapper.plan(part1) == []
    half = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1), alpha=0.5)])
    assert set(swapper.plan(half)) == set(tied_parts.part1_rewrites)  # α changed: what it covers
    other_base = Recipe(base=str(tied.post), deltas=[DeltaTerm(path=str(tied_parts.part1))])
    assert len(swapper.plan(other_base)) == len(swapper.names)  # another base: every tensor differs


def test_every_sequence_of_swaps_leaves_exactly_the_offline_merge(tied, tied_parts):
    recorder = Recorder(Checkpoint(tied.base))
    swapper = _swapper(tied)
    base = Recipe(base=str(tied.base))
    sequence = [
        Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))]),
        Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))]),
        Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part2))]),
        Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part2), alpha=-0.5)]),
        Recipe(
            base=str(tied.base),
            deltas=[DeltaTerm(path=str(tied_parts.part1)), DeltaTerm(path=str(tied.delta2), alpha=0.3)],
        ),
        base,
    ]
    for i, recipe in enumerate(sequence):
        staged = i % 2 == 0
        if staged:
            assert swapper.stage(recipe)
        result = swapper.commit(recipe, recorder)
        assert result["staged"] is staged
        assert _equal(recorder.weights, recipe), f"step {i}"
    assert recorder.calls[-1] == [n for n in swapper.names if n in set(recorder.calls[-1])]  # ordered


class Prepared:
    """A prepared commit over the Recorder: the modules it prepares are written at commit, not
    reloaded; the rest (`fallback`) go to the reload."""

    def __init__(self, recorder: "Recorder", tensors, reloaded: str):
        self.thread = threading.current_thread().name
        self.recorder = recorder
        self.mine = [(n, t.clone()) for n, t in tensors if reloaded not in n]
        self.fallback = [(n, t) for n, t in tensors if reloaded in n]
        self.prepared_modules, self.fallback_modules = (
            [n for n, _ in self.mine],
            [n for n, _ in self.fallback],
        )
        self.bytes, self.reason, self.committed = 1, "", False
        self.reverse = None

    def snapshot(self) -> None:
        """As PreparedCommit.snapshot: the way back, unless a module falls back to the reload."""
        if not self.fallback:
            back = [(n, self.recorder.weights[n].clone()) for n, _ in self.mine]
            self.reverse = Prepared(self.recorder, back, reloaded="\0")

    def commit(self) -> None:
        self.committed = True
        self.recorder.weights.update(self.mine)


def _preparing(tied, reloaded: str) -> tuple[Swapper, Recorder, list[Prepared]]:
    """A swapper whose stages prepare every module except those named `reloaded` (the Prepared made)."""
    recorder = Recorder(Checkpoint(tied.base))
    made: list[Prepared] = []

    def prepare(tensors):
        made.append(Prepared(recorder, tensors, reloaded=reloaded))
        return made[-1]

    swapper = _swapper(tied)
    swapper.prepare = prepare
    return swapper, recorder, made


def test_a_stage_prepares_its_modules_while_serving_and_the_commit_reloads_only_the_rest(tied, tied_parts):
    swapper, recorder, made = _preparing(tied, reloaded="mlp")
    full = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    assert swapper.stage(full)
    result = swapper.commit(full, recorder)
    assert result["staged"] and made[0].thread == "deltagate-stage" and made[0].committed
    assert recorder.calls == [[n for n in swapper.names if "mlp" in n]]  # the fallback alone is reloaded
    assert result["prepared_modules"] == len(made[0].mine) and result["fallback_modules"] > 0
    assert _equal(recorder.weights, full)
    base = Recipe(base=str(tied.base))
    result = swapper.commit(base, recorder)  # not staged: prepared in the pause, the same way
    assert not result["staged"] and made[1].thread != "deltagate-stage" and made[1].committed
    assert _equal(recorder.weights, base) and result["prepare_seconds"] > 0


def test_swapping_back_uses_the_kept_prepared_form_and_merges_nothing(tied, tied_parts):
    """A -> B keeps A's prepared form (its kernels, a copy of its tensors taken while it served): B -> A
    then commits that, with no merge and no prepare, and keeps B's the same way; exactly the merge
    each time. A swap elsewhere (to C) drops it."""
    swapper, recorder, made = _preparing(tied, reloaded="\0")  # every module prepared
    merges = 0
    merged = swapper._merged

    def counted(target):
        nonlocal merges
        merges += 1
        return merged(target)

    swapper._merged = counted
    base = Recipe(base=str(tied.base))
    full = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    other = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta2))])
    assert swapper.stage(full)
    first = swapper.commit(full, recorder)
    assert _equal(recorder.weights, full) and len(made) == 1
    for target in (base, full, base):  # back and forth: kept forms only
        assert swapper.stage(target)
        result = swapper.commit(target, recorder)
        assert _equal(recorder.weights, target) and len(made) == 1 and result["staged"]
        assert result["tensors"] == first["tensors"] and merges == 1
        assert swapper.memory()["kept_prepared_bytes"] > 0
    assert recorder.calls == []  # nothing went through the reload
    result = swapper.commit(full, recorder)  # not staged: the kept form is used all the same
    assert _equal(recorder.weights, full) and len(made) == 1
    assert swapper.stage(other)  # elsewhere: merged and prepared anew
    swapper.commit(other, recorder)
    assert _equal(recorder.weights, other) and len(made) == 2


def test_what_a_commit_replaced_is_freed_only_by_the_release_after_it(tied, tied_parts):
    """Freeing the old kernel handles and the stage takes longer than the commit, so the commit keeps
    them and the release (sent once the engine runs again: loaders/engine_swap.py) frees them; a
    commit nobody released after frees them itself, before its own work."""
    import gc
    import weakref

    swapper, recorder, made = _preparing(tied, reloaded="mlp")
    full = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    assert swapper.stage(full)
    swapper.commit(full, recorder)
    first = weakref.ref(made.pop())
    gc.collect()
    assert first() is not None  # held until released
    assert swapper.release() >= 0
    gc.collect()
    assert first() is None
    base = Recipe(base=str(tied.base))
    swapper.commit(base, recorder)
    second = weakref.ref(made.pop())
    swapper.commit(full, recorder)  # no release in between: this commit frees the last one's first
    gc.collect()
    assert second() is None and _equal(recorder.weights, full)


def test_a_stage_for_another_swap_is_abandoned_and_its_tensors_never_used(tied, tied_parts):
    recorder = Recorder(Checkpoint(tied.base))
    swapper = _swapper(tied)
    part1 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))])
    part2 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part2))])
    assert swapper.stage(part1)
    assert swapper.stage(part2)  # the policy chose another variant: part1's stage is dropped
    result = swapper.commit(part1, recorder)  # ...and then part1 after all
    assert not result["staged"]
    assert _equal(recorder.weights, part1)
    assert not swapper.stage(part1)  # already resident: nothing to stage


def test_a_reload_that_fails_leaves_the_weights_unknown_so_the_next_swap_rewrites_all(tied, tied_parts):
    swapper = _swapper(tied)
    part1 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))])

    def broken(tensors):
        raise RuntimeError("engine failed mid-reload")

    with pytest.raises(RuntimeError):
        swapper.commit(part1, broken)
    assert swapper.resident is None
    assert len(swapper.plan(part1)) == len(swapper.names)


def test_resident_weights_merge_exactly_as_the_checkpoint_and_report_memory(tied, tied_parts):
    terms = [DeltaTerm(path=str(tied.delta), alpha=0.7), DeltaTerm(path=str(tied_parts.part1), alpha=-0.2)]
    recipe = Recipe(base=str(tied.base), deltas=terms)
    resident = ResidentWeights(torch.device("cpu"))
    for _ in range(2):  # the second time from memory and the delta cache
        got = dict(merged_tensors(recipe, source=resident))
        assert all(torch.equal(got[n], t) for n, t in merged_tensors(recipe))
    memory = resident.memory()
    base = Checkpoint(tied.base)
    assert memory["base_bytes"] == sum(t.numel() * t.element_size() for _, t in base.iter_tensors())
    assert memory["delta_cache_hits"] == memory["delta_cache_misses"] > 0


def test_the_delta_cache_keeps_to_its_budget_and_forgets_a_replaced_file(tied, tmp_path):
    budget = 40_000
    resident = ResidentWeights(torch.device("cpu"), ResidencyConfig(delta_cache_bytes=budget))
    names = Checkpoint(tied.base).tensor_names()
    for name in names:
        resident.delta(str(tied.delta), name, torch.device("cpu"))
    assert 0 < resident.memory()["delta_cache_bytes"] <= budget
    copy = tmp_path / "d.safetensors"
    copy.write_bytes(tied.delta.read_bytes())
    first = resident.delta(str(copy), names[0], torch.device("cpu"))
    copy.write_bytes(tied.delta2.read_bytes())  # replaced in place: another delta
    os.utime(copy, ns=(time.time_ns() + 10**9,) * 2)
    second = resident.delta(str(copy), names[0], torch.device("cpu"))
    assert not torch.equal(first.dense, second.dense)


def test_a_pinned_variants_deltas_stay_and_the_budget_evicts_the_others_first(tied):
    """POST /v1/variants/{name}/warm?pin=true: its decoded deltas are never evicted; the least recently
    used unpinned ones go first, and the memory report names them; unpinned, they are evictable again."""
    names = Checkpoint(tied.base).tensor_names()
    cpu = torch.device("cpu")
    sizes = {n: ResidentWeights(cpu).delta(str(tied.delta), n, cpu).nbytes for n in names}
    resident = ResidentWeights(cpu, ResidencyConfig(delta_cache_bytes=sum(sizes.values())))
    resident.pin({str(tied.delta2)}, True)
    for name in names:
        resident.delta(str(tied.delta2), name, cpu)  # pinned: fills the whole budget
    for name in names:
        resident.delta(str(tied.delta), name, cpu)  # not pinned: each evicted at once
    memory = resident.memory()
    assert memory["pinned"] == [tied.delta2.name] and memory["pinned_bytes"] == memory["delta_cache_bytes"]
    assert memory["evicted"] == [tied.delta.name]
    hits = resident.hits
    for name in names:
        resident.delta(str(tied.delta2), name, cpu)
    assert resident.hits == hits + len(names)  # every pinned tensor was still there
    resident.pin({str(tied.delta2)}, False)
    resident.delta(str(tied.delta), names[0], cpu)  # now the unpinned delta2 tensors go first
    assert resident.memory()["pinned_bytes"] == 0
    assert resident.memory()["delta_cache_bytes"] <= sum(sizes.values())
    assert resident.memory()["evicted"][-1] == tied.delta2.name


def test_no_residency_reads_the_checkpoint_every_time(tied):
    resident = ResidentWeights(torch.device("cpu"), ResidencyConfig(residency="none"))
    recipe = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    assert all(
        torch.equal(a, b)
        for (_, a), (_, b) in zip(
            merged_tensors(recipe, source=resident), merged_tensors(recipe), strict=True
        )
    )
    assert resident.memory()["base_bytes"] == 0


def test_the_full_mode_rewrites_everything_and_stages_nothing(tied, tied_parts):
    swapper = _swapper(tied, CheckpointSource(), incremental=False)
    part1 = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))])
    assert not swapper.stage(part1)
    recorder = Recorder(Checkpoint(tied.base))
    assert swapper.commit(part1, recorder)["tensors"] == len(swapper.names)
    assert _equal(recorder.weights, part1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_merge_equals_one_pass_with_exactness_terms_across_chunks(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g).to(dtype)
    dense = torch.randn(37, 11, generator=g)
    idx = torch.tensor([0, 5, 100, 101, 250, 406])
    delta = Delta(dense, idx, torch.randn(6, generator=g) * 1e-3)
    terms = [(delta, 0.7), (Delta.of(torch.randn(37, 11, generator=g)), -1.3)]
    whole = merge_tensor(base, terms, dtype)
    for chunk in (1, 7, 100, 406, 407, 10_000):
        assert torch.equal(merge_tensor(base, terms, dtype, chunk=chunk), whole), chunk
    out = torch.empty_like(base)
    assert merge_tensor(base, terms, dtype, out=out) is out and torch.equal(out, whole)
    # the reference arithmetic: fp32, alpha·Δ as its own rounding, exactness term after its dense term
    acc = base.float().reshape(-1).clone()
    acc += dense.reshape(-1) * 0.7
    acc[idx] += delta.extra_val * 0.7
    acc += terms[1][0].dense.reshape(-1) * -1.3
    assert torch.equal(acc.to(dtype).view(37, 11), whole)


class _Layer:
    """Stands in for a vLLM parallel layer: the attributes its weight loader shards by."""

    def __init__(self, kind: str, **attrs):
        self.__class__ = type(kind, (_Layer,), {})
        self.quant_method = type("UnquantizedLinearMethod", (), {})()
        self.__dict__.update(attrs)


def test_each_tensor_parallel_rank_merges_only_the_slice_its_loader_takes(tied):
    from loaders.shards import Shard, shard_of

    qkv = dict(tp_size=2, tp_rank=1, num_heads=2, num_kv_heads=1, head_size=32, v_head_size=32)
    assert shard_of(_Layer("QKVParallelLinear", num_kv_head_replicas=1, **qkv), 0) == Shard(0, 64, 64)
    assert shard_of(_Layer("QKVParallelLinear", num_kv_head_replicas=1, **qkv), 2) == Shard(0, 32, 32)
    assert shard_of(_Layer("QKVParallelLinear", num_kv_head_replicas=2, **qkv), 1) == Shard(0, 0, 32)
    merged = _Layer("MergedColumnParallelLinear", tp_size=2, tp_rank=1, output_sizes=[256, 256])
    assert shard_of(merged, 1) == Shard(0, 128, 128)
    row = _Layer("RowParallelLinear", tp_size=2, tp_rank=1, input_size_per_partition=64)
    assert shard_of(row, None) == Shard(1, 64, 64)
    assert shard_of(_Layer("RowParallelLinear", tp_size=1, tp_rank=0), None) is None  # no TP: whole
    quantized = _Layer("RowParallelLinear", tp_size=2, tp_rank=0, input_size_per_partition=64)
    quantized.quant_method = object()
    assert shard_of(quantized, None) is None  # packed codes shard otherwise: merged whole

    name = "model.layers.0.mlp.down_proj.weight"
    recipe = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta), alpha=0.6)])
    whole = dict(merged_tensors(recipe, [name]))[name]
    sliced = dict(merged_tensors(recipe, [name], shards={name: Shard(1, 64, 128)}))[name]
    assert torch.equal(sliced[:, 64:192], whole[:, 64:192])
    assert sliced[:, :64].isnan().all() and sliced[:, 192:].isnan().all()  # never read by the loader


def test_every_expert_of_a_layer_loads_into_one_module():
    """MoE checkpoints store a tensor per expert; vLLM loads them all into one fused-experts module,
    so a swap plans them together (Mixtral's and Qwen3-MoE's names)."""
    names = [
        "model.layers.0.block_sparse_moe.experts.0.w1.weight",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.mlp.experts.12.gate_proj.weight",
        "model.layers.1.mlp.experts.2.up_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ]
    assert module_groups(names, {**LLAMA_PACKED, "experts": ["experts"]}) == {
        names[0]: "model.layers.0.block_sparse_moe.experts",
        names[1]: "model.layers.0.block_sparse_moe.experts",
        names[2]: "model.layers.0.block_sparse_moe.gate",
        names[3]: "model.layers.1.mlp.experts",
        names[4]: "model.layers.1.mlp.experts",
        names[5]: "model.layers.1.self_attn.qkv_proj",
    }


def test_warming_reads_a_recipes_inputs_so_its_first_swap_decodes_nothing(tied):
    source = ResidentWeights(torch.device("cpu"))
    swapper = _swapper(tied, source)
    full = Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta))])
    assert swapper.warm(full)
    swapper._warming[1].join()
    misses = source.misses
    assert misses == len(open_artifact(tied.delta).tensor_names)  # each delta tensor decoded once
    recorder = Recorder(Checkpoint(tied.base))
    swapper.commit(full, recorder)
    assert source.misses == misses and _equal(recorder.weights, full)  # the swap decoded nothing
    assert not _swapper(tied, CheckpointSource()).warm(full)  # nothing kept: nothing to warm
