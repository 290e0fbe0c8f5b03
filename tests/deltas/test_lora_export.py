"""PEFT LoRA export: keys, shapes and B·A against the artifact's own low-rank delta."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltas import CodecPlan, DeltaError, compress_artifact, open_artifact
from deltas.lora import adapter_rank, export_lora, export_lora_mix

MODULE = "model.layers.1.mlp.down_proj"


def test_lowrank_artifact_exports_its_own_factors(untied, tmp_path):
    lowrank = tmp_path / "lr.safetensors"
    compress_artifact(untied.delta, lowrank, CodecPlan.uniform("lowrank:rank=4"))
    result = export_lora(lowrank, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = weights[f"base_model.model.{MODULE}.lora_A.weight"]
    b = weights[f"base_model.model.{MODULE}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == result.rank == 4
    assert torch.allclose(b @ a, open_artifact(lowrank).delta(MODULE + ".weight").full(), atol=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4  # scale 1
    assert "model.embed_tokens.weight" in result.left_out and "lm_head.weight" in result.left_out
    assert 0 < result.left_out_energy < 1


def test_other_encodings_need_a_rank(untied, tmp_path):
    with pytest.raises(DeltaError, match="--rank"):
        export_lora(untied.delta, tmp_path / "adapter")
    result = export_lora(untied.delta, tmp_path / "adapter", rank=2)
    assert result.rank == 2 and len(result.modules) == 2 * 7  # 2 layers x 7 projections


def _projection_lowrank(delta, out, rank: int):
    plan = CodecPlan.model_validate(
        {"default": f"lowrank:rank={rank}", "exclude": ["*embed_tokens*", "lm_head.weight", "*norm*"]}
    )
    compress_artifact(delta, out, plan)
    return out


def test_adapter_rank_says_which_deltas_an_adapter_carries_exactly(untied, tmp_path):
    lowrank = _projection_lowrank(untied.delta, tmp_path / "lr.safetensors", 4)
    assert adapter_rank(open_artifact(lowrank).manifest) == 4
    with pytest.raises(DeltaError, match="not a projection matrix"):
        adapter_rank(open_artifact(untied.delta).manifest)  # embeddings, norms, lm_head too
    everything = tmp_path / "all.safetensors"
    compress_artifact(untied.delta, everything, CodecPlan.uniform("lowrank:rank=4"))
    with pytest.raises(DeltaError, match="not a projection matrix"):
        adapter_rank(open_artifact(everything).manifest)


def test_mixed_adapter_is_the_weighted_sum_of_its_deltas(untied, tmp_path):
    a = _projection_lowrank(untied.delta, tmp_path / "a.safetensors", 4)
    b = _projection_lowrank(untied.delta2, tmp_path / "b.safetensors", 2)
    rank = export_lora_mix([(a, 0.5), (b, -1.5)], tmp_path / "adapter")
    assert rank == 6  # ranks add up
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    got = (
        weights[f"base_model.model.{MODULE}.lora_B.weight"]
        @ weights[f"base_model.model.{MODULE}.lora_A.weight"]
    )
    name = MODULE + ".weight"
    want = 0.5 * open_artifact(a).delta(name).full() - 1.5 * open_artifact(b).delta(name).full()
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(DeltaError, match="not lowrank|not a projection"):
        export_lora_mix([(untied.delta, 1.0)], tmp_path / "refused")
