"""Compare two variants on the same items with the openai SDK's Evals client (`client.evals`).

python examples/compare_variants.py --models pico pico-inst
"""

from __future__ import annotations

import argparse
import time

from _gateway import URL, admin_token
from openai import OpenAI

ITEMS = [
    {"question": "The capital of France is", "answer": "Paris"},
    {"question": "1, 2, 3, 4,", "answer": "5"},
    {"question": "The opposite of hot is", "answer": "cold"},
]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--models", nargs=2, required=True)
args = parser.parse_args()

client = OpenAI(base_url=f"{URL}/v1", api_key=admin_token())  # evals are admin calls
schema = {"type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}}}
ev = client.evals.create(
    name="compare",
    data_source_config={"type": "custom", "item_schema": schema, "include_sample_schema": True},
    testing_criteria=[
        {
            "type": "string_check",
            "name": "has_answer",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "ilike",
        }
    ],
)
runs = {
    model: client.evals.runs.create(
        ev.id,
        name=model,
        data_source={
            "type": "completions",
            "model": model,
            "input_messages": {
                "type": "template",
                "template": [{"role": "user", "content": "{{item.question}}"}],
            },
            "sampling_params": {"temperature": 0, "max_completion_tokens": 8},
            "source": {"type": "file_content", "content": [{"item": item} for item in ITEMS]},
        },
    )
    for model in args.models
}
for model, run in runs.items():
    while (run := client.evals.runs.retrieve(run.id, eval_id=ev.id)).status in ("queued", "in_progress"):
        time.sleep(0.5)
    counts = run.result_counts
    print(f"{model}: {run.status}, {counts.passed}/{counts.total} items passed")
