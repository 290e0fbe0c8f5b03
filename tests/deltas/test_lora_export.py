"""PEFT LoRA export: keys, shapes and B·A against the artifact's own low-rank delta."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltas.artifact import DeltaArtifact
from deltas.codecs.plan import CodecPlan
from deltas.compress import compress_artifact
from deltas.errors import DeltaError
from deltas.lora import export_lora

MODULE = "model.layers.1.mlp.down_proj"


def test_lowrank_artifact_exports_its_own_factors(untied, tmp_path):
    lowrank = tmp_path / "lr.safetensors"
    compress_artifact(untied.delta, lowrank, CodecPlan.uniform("lowrank:rank=4"))
    result = export_lora(lowrank, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = weights[f"base_model.model.{MODULE}.lora_A.weight"]
    b = weights[f"base_model.model.{MODULE}.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == result.rank == 4
    assert torch.allclose(b @ a, DeltaArtifact(lowrank).delta(MODULE + ".weight").full(), atol=1e-6)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4  # scale 1
    assert "model.embed_tokens.weight" in result.left_out and "lm_head.weight" in result.left_out
    assert 0 < result.left_out_energy < 1


def test_other_encodings_need_a_rank(untied, tmp_path):
    with pytest.raises(DeltaError, match="--rank"):
        export_lora(untied.delta, tmp_path / "adapter")
    result = export_lora(untied.delta, tmp_path / "adapter", rank=2)
    assert result.rank == 2 and len(result.modules) == 2 * 7  # 2 layers x 7 projections
