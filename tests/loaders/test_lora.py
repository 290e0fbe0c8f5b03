"""A lowrank delta exported as a PEFT LoRA adapter is served by stock vLLM multi-LoRA like its merge.

The engines are started once for this module and tests/server/test_adapters.py (tests/conftest.py
`lowrank`)."""

import json
import math

import pytest

pytestmark = pytest.mark.engine


def test_adapter_is_peft_shaped(lowrank):
    config = json.loads((lowrank.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_lora_served_side_by_side_equals_the_merged_lowrank_variant(lowrank):
    via_lora, merged = lowrank.refs["peft"], lowrank.refs["lr"]
    assert via_lora != lowrank.refs["peft-base"]  # the adapter does change the model
    for got, want in zip(via_lora, merged, strict=True):
        assert got["tokens"] == want["tokens"]
        # x·W + (x·A)·B vs x·(W + B·A) in fp32: equal up to rounding
        pairs = zip(got["token_logprobs"], want["token_logprobs"], strict=True)
        assert all(math.isclose(a, b, abs_tol=2e-3) for a, b in pairs)
