"""lm-evaluation-harness pointed at the gateway gives, sample for sample, what it gives against stock
vLLM serving the same weights: a loglikelihood multiple-choice task and a GSM8K generation task
(local task files), for a base and for a variant. lm-eval sends token-id prompts, `echo` and prompt
`logprobs`, so this checks the relay of all three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loaders.engine import EngineProcess, EngineSpec
from server.evals.tasks import gsm8k_rows
from tests.server.conftest import ref_cores

pytestmark = pytest.mark.engine

MC_ITEMS = [
    ("The capital of France", ["is Paris.", "is Rome.", "is a number."], 0),
    ("Numbers: 1 2 3", ["4 5 6", "a b c"], 0),
    ("def add(a, b):", ["return a + b", "print('hello')", "import os"], 0),
    ("The sky is", ["blue", "green", "made of cheese"], 0),
    ("Water boils at", ["100 degrees", "minus ten", "noon"], 0),
    ("One plus one is", ["two", "three"], 0),
]
MC_TASK = """task: dg_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
GSM_TASK = """task: dg_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Local task files: the datasets are JSONL written here (no hub access)."""
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    mc = root / "mc.jsonl"
    mc.write_text(
        "".join(json.dumps({"question": q, "choices": c, "label": a}) + "\n" for q, c, a in MC_ITEMS)
    )
    gsm = root / "gsm8k.jsonl"
    gsm.write_text(
        "".join(
            json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in gsm8k_rows()[:6]
        )
    )
    (root / "dg_mc.yaml").write_text(MC_TASK.format(path=mc))
    (root / "dg_gsm8k.yaml").write_text(GSM_TASK.format(path=gsm))
    return root


@pytest.fixture(scope="module")
def stock(tied, tmp_path_factory):
    """Stock vLLM (no deltagate extension) on the base and on the post model, started together."""
    logs = tmp_path_factory.mktemp("lm-eval-stock")
    procs = {}
    for i, (name, path) in enumerate((("tied", tied.base), ("tied-inst", tied.post))):
        spec = EngineSpec(model=str(path), served_name=name, max_model_len=512, log_path=logs / f"{name}.log",
                          env=(("VLLM_CPU_OMP_THREADS_BIND", ref_cores(i)),))  # fmt: skip
        procs[name] = EngineProcess(spec, with_extension=False)
        procs[name].start()
    try:
        for proc in procs.values():
            proc.wait_ready(timeout=900)
        yield {name: proc.url for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()


def lm_eval_samples(
    url: str, model: str, tokenizer: Path, task_dir: Path, out: Path
) -> dict[str, list[dict]]:
    """Run the real `lm_eval` CLI (local-completions) and read its per-sample log, by task."""
    model_args = (
        f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tokenizer},num_concurrent=2,max_retries=1,max_length=512"
    )
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "dg_mc,dg_gsm8k", "--include_path", str(task_dir), "--output_path", str(out),
           "--log_samples", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    samples: dict[str, list[dict]] = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


@pytest.mark.parametrize("model", ["tied", "tied-inst"])
def test_lm_eval_through_the_gateway_matches_stock_vllm(stack, stock, tied, task_dir, tmp_path, model):
    """Same loglikelihoods (bit for bit) and the same generations, sample by sample."""
    via_gateway = lm_eval_samples(stack.url, model, tied.base, task_dir, tmp_path / "gateway")
    direct = lm_eval_samples(stock[model], model, tied.base, task_dir, tmp_path / "stock")
    assert set(via_gateway) == set(direct) == {"dg_mc", "dg_gsm8k"}
    assert len(via_gateway["dg_mc"]) == len(MC_ITEMS) and len(via_gateway["dg_gsm8k"]) == 6
    for task in direct:
        for got, want in zip(via_gateway[task], direct[task], strict=True):
            assert got["doc_id"] == want["doc_id"]
            assert got["resps"] == want["resps"], (task, got["doc_id"])
            assert got["filtered_resps"] == want["filtered_resps"]
    generations = [r["resps"][0][0] for r in direct["dg_gsm8k"]]
    assert any(g.strip() for g in generations)  # real text was compared, not empty answers


def test_tokenize_and_detokenize_per_variant(stack, stock):
    """The gateway's /tokenize and /detokenize answer as the engine's do; the chat form applies the
    variant's chat template; without a model, a gateway with two bases asks for one."""
    prompt = {"prompt": "The capital of France is", "add_special_tokens": False}
    mine = httpx.post(stack.url + "/tokenize", json={"model": "tied-inst", **prompt})
    assert mine.status_code == 200, mine.text
    theirs = httpx.post(stock["tied-inst"] + "/tokenize", json={"model": "tied-inst", **prompt}).json()
    assert mine.json()["tokens"] == theirs["tokens"]
    back = httpx.post(stack.url + "/detokenize", json={"model": "tied-inst", "tokens": theirs["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == prompt["prompt"]
    messages = [{"role": "user", "content": "hi"}]
    chat = {
        m: httpx.post(stack.url + "/tokenize", json={"model": m, "messages": messages})
        for m in ("tied", "tied-inst")
    }
    want = httpx.post(
        stock["tied-inst"] + "/tokenize", json={"model": "tied-inst", "messages": messages}
    ).json()
    assert chat["tied-inst"].json()["tokens"] == want["tokens"]
    base = chat["tied"]  # the base has no chat template of its own: refused, or tokenized otherwise
    assert base.status_code != 200 or base.json()["tokens"] != want["tokens"], base.text
    r = httpx.post(stack.url + "/tokenize", json=prompt)
    assert r.status_code == 400 and "several bases" in r.json()["error"]["message"]
    r = httpx.post(stack.url + "/tokenize", json={"model": "ghost", **prompt})
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
