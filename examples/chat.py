"""Chat with a variant through the openai SDK: one answer whole, then the same answer streamed.

python examples/chat.py --model pico-inst      # any model of GET /v1/models
"""

from __future__ import annotations

import argparse
import os

from _gateway import URL
from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True)
parser.add_argument("--prompt", default="What is the capital of France?")
args = parser.parse_args()

# Inference keys are optional: a gateway started without --api-key takes any.
client = OpenAI(base_url=f"{URL}/v1", api_key=os.environ.get("DELTAGATE_API_KEY", "none"))
messages = [{"role": "user", "content": args.prompt}]

answer = client.chat.completions.create(model=args.model, messages=messages, max_tokens=16, temperature=0)
print("whole:   ", answer.choices[0].message.content)

stream = client.chat.completions.create(
    model=args.model, messages=messages, max_tokens=16, temperature=0, stream=True
)
pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
print("streamed:", "".join(pieces))  # greedy: the same text, token by token
