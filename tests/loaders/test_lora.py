"""A lowrank delta exported as a PEFT LoRA adapter is served by stock vLLM multi-LoRA like its merge."""

import json
import math

import httpx
import pytest

from loaders.engine import EngineProcess, EngineSpec
from tests.server.conftest import PROMPTS, deltagate

pytestmark = pytest.mark.engine

CODECS_YAML = """default: lowrank:rank=8
exclude: ["*embed_tokens*", "lm_head.weight", "*norm*"]
"""


def _greedy(url: str, model: str) -> list[dict]:
    outs = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        outs.append({"tokens": lp["tokens"], "logprobs": lp["token_logprobs"]})
    return outs


def _engine(model, name: str, log, *extra: str) -> EngineProcess:
    spec = EngineSpec(model=str(model), served_name=name, max_model_len=256, extra_args=extra, log_path=log)
    return EngineProcess(spec, with_extension=False)


@pytest.fixture(scope="module")
def lora_setup(untied, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora")
    (work / "codecs.yaml").write_text(CODECS_YAML)
    lowrank = work / "lowrank.safetensors"
    deltagate("compress", untied.delta, "-o", lowrank, "--codec-recipe", work / "codecs.yaml")
    deltagate("export-lora", lowrank, "-o", work / "adapter")
    deltagate("merge", "--base", untied.base, "--delta", lowrank, "-o", work / "merged")
    lora_args = ("--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                 "--lora-modules", f"lowrank={work / 'adapter'}")  # fmt: skip
    engines = {
        "lora": _engine(untied.base, "base", work / "lora.log", *lora_args),
        "merged": _engine(work / "merged", "merged", work / "merged.log"),
    }
    for proc in engines.values():
        proc.start()
    try:
        for proc in engines.values():
            proc.wait_ready(timeout=900)
        yield work, engines
    finally:
        for proc in engines.values():
            proc.stop()


def test_adapter_is_peft_shaped(lora_setup):
    work, _ = lora_setup
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
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


def test_lora_served_side_by_side_equals_the_merged_lowrank_variant(lora_setup):
    _, engines = lora_setup
    via_lora = _greedy(engines["lora"].url, "lowrank")
    merged = _greedy(engines["merged"].url, "merged")
    base = _greedy(engines["lora"].url, "base")  # same engine, no swap: the base is still served
    assert via_lora != base  # the adapter does change the model
    for got, want in zip(via_lora, merged, strict=True):
        assert got["tokens"] == want["tokens"]
        # x·W + (x·A)·B vs x·(W + B·A) in fp32: equal up to rounding
        assert all(
            math.isclose(a, b, abs_tol=2e-3) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)
        )
