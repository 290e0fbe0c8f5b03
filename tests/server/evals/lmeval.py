"""lm-evaluation-harness as the tests run it: two local tasks (multiple choice by loglikelihood, and
GSM8K generation), and the real `lm_eval` CLI's per-sample log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.evals.tasks import gsm8k_rows

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


PROMPT = {"prompt": "The capital of France is", "add_special_tokens": False}
MESSAGES = [{"role": "user", "content": "hi"}]


def write_tasks(root: Path) -> Path:
    """Local task files in `root`: the datasets are JSONL written there (no hub access)."""
    root.mkdir(parents=True, exist_ok=True)
    mc = root / "mc.jsonl"
    items = (json.dumps({"question": q, "choices": c, "label": a}) for q, c, a in MC_ITEMS)
    mc.write_text("".join(line + "\n" for line in items))
    gsm = root / "gsm8k.jsonl"
    rows = gsm8k_rows()[:6]
    gsm.write_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    (root / "dg_mc.yaml").write_text(MC_TASK.format(path=mc))
    (root / "dg_gsm8k.yaml").write_text(GSM_TASK.format(path=gsm))
    return root


def lm_eval_samples(
    url: str, model: str, tokenizer: Path, task_dir: Path, out: Path
) -> dict[str, list[dict]]:
    """Run the real `lm_eval` CLI (local-completions) and read its per-sample log, by task."""
    model_args = (
        f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={tokenizer},num_concurrent=2,max_retries=1,max_length=512"
    )
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "local-completions",
        "--model_args",
        model_args,
        "--tasks",
        "dg_mc,dg_gsm8k",
        "--include_path",
        str(task_dir),
        "--output_path",
        str(out),
        "--log_samples",
        "--seed",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(out / "hf")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    samples: dict[str, list[dict]] = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


def tokenized(url: str, model: str) -> dict:
    """What an engine's /tokenize answers for PROMPT and, with the chat template, for MESSAGES."""
    import httpx

    plain = httpx.post(url + "/tokenize", json={"model": model, **PROMPT}, timeout=60).json()
    chat = httpx.post(url + "/tokenize", json={"model": model, "messages": MESSAGES}, timeout=60).json()
    return {"prompt": plain["tokens"], "chat": chat["tokens"]}
