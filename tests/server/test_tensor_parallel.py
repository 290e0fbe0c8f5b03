"""Tensor parallelism (TP=2 on vLLM's CPU build, one core per rank): each rank merges only its own
slice of every split weight, and the swapped weights equal stock vLLM's TP=2 load of the offline merge."""

import asyncio

import pytest

from deltas import DeltaTerm, Recipe
from loaders.engine import EngineClient, EngineProcess, EngineSpec
from tests.server.conftest import _merge, completion_outputs

pytestmark = pytest.mark.engine

TP = ("--tensor-parallel-size", "2")
BIND = (("VLLM_CPU_OMP_THREADS_BIND", "0|1"),)  # one core per rank (one NUMA node: no auto-binding)


# The engine's staging budget for prepared modules (loaders/prepared.py): 1 KiB, less than any swap
# here needs, so every commit falls back to vLLM's reload and says why. The prepared path at TP=2 is
# the model matrix's (its Qwen3-MoE row).
BUDGET = (("DELTAGATE_PREPARE_MIB", str(1 / 1024)),)


def _engine(model, log, *, extension: bool) -> EngineProcess:
    env = BIND + BUDGET if extension else BIND
    spec = EngineSpec(
        model=str(model), served_name="ref", max_model_len=512, extra_args=TP, log_path=log, env=env
    )
    return EngineProcess(spec, with_extension=extension)


def test_tp2_swaps_merge_per_rank_and_equal_stock_vllm_tp2(tied, tied_parts, tmp_path):
    # one reference (each TP=2 engine start is ~2 engines' work here): the full swap is compared with
    # it, the partial swap back to the base with the base's own answers before any swap
    mix = _merge(tied.base, [f"{tied.delta}:0.7"], tmp_path / "mix")
    refs = {"mix": _engine(mix, tmp_path / "ref-mix.log", extension=False)}
    engine = _engine(tied.base, tmp_path / "engine.log", extension=True)
    want = {}
    for proc in refs.values():
        proc.start()
    engine.start()
    try:
        for name, proc in refs.items():
            proc.wait_ready(timeout=900)
            want[name] = completion_outputs(proc.url, "ref")
            proc.stop()
        engine.wait_ready(timeout=900)
        base_before = completion_outputs(engine.url, "ref")

        async def swaps() -> list:
            client = EngineClient(engine.url, "ref")
            try:
                results = []
                for recipe in (
                    Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied.delta), alpha=0.7)]),
                    Recipe(base=str(tied.base), deltas=[DeltaTerm(path=str(tied_parts.part1))]),
                    Recipe(base=str(tied.base)),  # from part1: only part1's modules rewritten
                ):
                    results.append(await client.apply(recipe))
                    results.append(await asyncio.to_thread(completion_outputs, engine.url, "ref"))
                return results
            finally:
                await client.close()

        mix_result, mix_out, part_result, _, back_result, base_out = asyncio.run(swaps())
    finally:
        for proc in (*refs.values(), engine):
            proc.stop()
    assert mix_out == want["mix"]
    assert base_out == base_before  # after a partial swap back: every rank's slices came back exact
    # the split weights (q/k/v, o, gate/up, down, embeddings: all but the 5 replicated norms) were
    # merged on each rank's slice only, the rest of what the loader got being NaN: an exact answer
    # means no loader read outside its slice
    assert (mix_result.tensors, mix_result.sharded) == (20, 15)
    assert (part_result.tensors, part_result.sharded) == (20, 15)  # mix covered all: all change
    rewrites = len(tied_parts.part1_rewrites)  # the embedding, qkv and gate_up of layer 0: all split
    assert (back_result.tensors, back_result.sharded) == (rewrites, rewrites)
    for result in (mix_result, part_result, back_result):  # over the budget: reloaded, and said so
        assert result.prepared_modules == 0 and result.fallback_modules > 0, result
        assert "over the 0.000977 MiB budget" in result.fallback_reason, result.fallback_reason
