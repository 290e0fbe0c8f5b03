"""SmolLM2-135M-Instruct (real, tied embeddings) with a real, briefly trained delta,
served through the gateway and checked against stock vLLM serving the trained weights."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from deltas import extract_delta
from loaders.engine import EngineProcess, EngineSpec, free_port
from loaders.smollm2 import smollm2_checkpoint
from server.evals.addition import addition_split
from tests.server.conftest import (
    chat_output,
    completion_outputs,
    ref_cores,
    start_gateway,
    stop_gateway,
    wait_healthy,
)
from training.sft import SFTConfig, finetune

pytestmark = pytest.mark.engine

CACHE = Path(__file__).resolve().parents[2] / ".cache"
SHORT_SFT = SFTConfig(steps=3, batch_size=4, lr=1e-4, seed=0)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Gateway on SmolLM2 with an `addition` variant, and a reference engine on the post model."""
    work = tmp_path_factory.mktemp("real")
    base = smollm2_checkpoint(CACHE / "models")
    post = CACHE / "models" / f"{base.name}-test-sft3"
    if not (post / "model.safetensors").is_file():
        finetune(base, post, addition_split(64, seed=1), SHORT_SFT)
    delta = work / "addition.safetensors"
    report = extract_delta(base, post, delta)
    ref = EngineProcess(
        EngineSpec(
            model=str(post),
            served_name="ref",
            log_path=work / "ref.log",
            env=(("VLLM_CPU_OMP_THREADS_BIND", ref_cores(1)),),
        ),  # the gateway's engine: core 0
        with_extension=False,
    )
    ref.start()
    port = free_port()
    log = work / "gateway.log"
    proc = start_gateway(
        ["--base", f"smollm2={base}", "--variant", f"addition={delta}"], work / "state", port, log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ref.wait_ready(timeout=900)
        refs = {"completions": completion_outputs(ref.url, "ref"), "chat": chat_output(ref.url, "ref")}
        ref.stop()
        wait_healthy(url, proc, log)
        yield {"url": url, "refs": refs, "report": report}
    finally:
        ref.stop()
        stop_gateway(proc)


def test_plain_model_answers_like_the_instruct_model(real):
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    reply = httpx.post(real["url"] + "/v1/chat/completions", json=body, timeout=120).json()
    assert "Paris" in reply["choices"][0]["message"]["content"], reply


def test_real_delta_variant_is_bit_identical_to_the_trained_model(real):
    assert real["report"].tensors == 272  # every SmolLM2 tensor (tied lm_head has none)
    assert completion_outputs(real["url"], "addition") == real["refs"]["completions"]
    assert chat_output(real["url"], "addition") == real["refs"]["chat"]
    # and back: the base again, then the variant again (swaps both ways on a tied model)
    completion_outputs(real["url"], "smollm2")
    assert completion_outputs(real["url"], "addition") == real["refs"]["completions"]
