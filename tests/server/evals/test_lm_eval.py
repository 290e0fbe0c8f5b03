"""lm-evaluation-harness pointed at the gateway gives, sample for sample, what it gives against stock
vLLM serving the same weights: a loglikelihood multiple-choice task and a GSM8K generation task
(local task files), for a base and for a variant. lm-eval sends token-id prompts, `echo` and prompt
`logprobs`, so this checks the relay of all three.
"""

from __future__ import annotations

import httpx
import pytest

from tests.server.evals.lmeval import MC_ITEMS, MESSAGES, PROMPT, lm_eval_samples

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("model", ["tied", "tied-inst"])
def test_lm_eval_through_the_gateway_matches_stock_vllm(stack, fleet, tied, tmp_path, model):
    """Same loglikelihoods (bit for bit) and the same generations, sample by sample, as lm-eval
    against stock vLLM (recorded by the fleet, tests/conftest.py)."""
    via_gateway = lm_eval_samples(stack.url, model, tied.base, fleet.lm_eval["tasks"], tmp_path / "gateway")
    direct = fleet.lm_eval[model]
    assert set(via_gateway) == set(direct) == {"dg_mc", "dg_gsm8k"}
    assert len(via_gateway["dg_mc"]) == len(MC_ITEMS) and len(via_gateway["dg_gsm8k"]) == 6
    for task in direct:
        for got, want in zip(via_gateway[task], direct[task], strict=True):
            assert got["doc_id"] == want["doc_id"]
            assert got["resps"] == want["resps"], (task, got["doc_id"])
            assert got["filtered_resps"] == want["filtered_resps"]
    generations = [r["resps"][0][0] for r in direct["dg_gsm8k"]]
    assert any(g.strip() for g in generations)  # real text was compared, not empty answers


def test_tokenize_and_detokenize_per_variant(stack, fleet):
    """The gateway's /tokenize and /detokenize answer as the engine's do; the chat form applies the
    variant's chat template; without a model, a gateway with two bases asks for one."""
    prompt, theirs = PROMPT, fleet.lm_eval["tokenize"]  # stock vLLM's, on the post model
    mine = httpx.post(stack.url + "/tokenize", json={"model": "tied-inst", **prompt})
    assert mine.status_code == 200, mine.text
    assert mine.json()["tokens"] == theirs["prompt"]
    back = httpx.post(stack.url + "/detokenize", json={"model": "tied-inst", "tokens": theirs["prompt"]})
    assert back.status_code == 200 and back.json()["prompt"] == prompt["prompt"]
    chat = {
        m: httpx.post(stack.url + "/tokenize", json={"model": m, "messages": MESSAGES})
        for m in ("tied", "tied-inst")
    }
    assert chat["tied-inst"].json()["tokens"] == theirs["chat"]
    base = chat["tied"]  # the base has no chat template of its own: refused, or tokenized otherwise
    assert base.status_code != 200 or base.json()["tokens"] != theirs["chat"], base.text
    r = httpx.post(stack.url + "/tokenize", json=prompt)
    assert r.status_code == 400 and "several bases" in r.json()["error"]["message"]
    r = httpx.post(stack.url + "/tokenize", json={"model": "ghost", **prompt})
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
