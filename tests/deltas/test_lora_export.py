"""PEFT LoRA export: keys, shapes and B·A against the artifact's own low-rank delta."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from deltas import CodecPlan, DeltaError, compress_artifact, extract_delta, open_artifact
from deltas.lora import adapter_rank, export_lora, export_lora_mix
from loaders.families import FAMILIES, make_family_base, make_family_post, projection_pattern

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


@pytest.mark.parametrize("family", [f for f in FAMILIES.values() if not f.moe], ids=lambda f: f.name)
def test_every_family_exports_the_modules_its_checkpoint_names(family, tmp_path):
    """A LoRA fine-tune of a family (its projections moved), compressed and exported: the adapter
    names exactly the checkpoint's projection modules (Phi-3's fused qkv_proj and gate_up_proj
    included), leaves nothing out, and each B·A is the artifact's delta. vLLM (and PEFT) look an
    adapter's modules up by these names: a name the model lacks would be ignored or refused."""
    base = make_family_base(family, tmp_path / "base", "float32")
    post = make_family_post(base, tmp_path / "post", seed=1, only=projection_pattern())
    extract_delta(base, post, tmp_path / "d.safetensors")
    lowrank = tmp_path / "lr.safetensors"
    compress_artifact(tmp_path / "d.safetensors", lowrank, CodecPlan.uniform("lowrank:rank=4"))
    result = export_lora(lowrank, tmp_path / "adapter")
    assert result.left_out == [] and adapter_rank(open_artifact(lowrank).manifest) == 4
    projections = {
        name.removesuffix(".weight")
        for name in load_file(base / "model.safetensors")
        if re.search(projection_pattern(), name)
    }
    assert set(result.modules) == projections
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for module in projections:
        b, a = (weights[f"base_model.model.{module}.lora_{x}.weight"] for x in "BA")
        assert torch.allclose(b @ a, open_artifact(lowrank).delta(module + ".weight").full(), atol=1e-6)
