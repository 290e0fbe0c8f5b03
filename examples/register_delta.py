"""Upload a delta artifact, define a variant of a base with it, and call the variant.

python examples/register_delta.py --artifact my-delta.safetensors --base pico --alpha 0.5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
from _gateway import URL, admin_token
from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--artifact", type=Path, required=True, help="a delta made by `deltagate extract`")
parser.add_argument("--base", required=True, help="the base the delta was extracted on")
parser.add_argument("--name", default="example", help="name of the delta and of the variant")
parser.add_argument("--alpha", type=float, default=1.0)
args = parser.parse_args()

admin = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {admin_token()}"}, timeout=300)
with args.artifact.open("rb") as body:  # streamed: an artifact can be gigabytes
    r = admin.post(
        "/v1/deltas",
        params={"name": args.name},
        content=body,
        headers={"Content-Type": "application/octet-stream"},
    )
r.raise_for_status()
print("delta:  ", r.json()["name"], r.json()["tensors"], "tensors,", r.json()["size_bytes"], "bytes")

recipe = {"name": args.name, "base": args.base, "deltas": [{"delta": args.name, "alpha": args.alpha}]}
r = admin.post("/v1/variants", json=recipe)
r.raise_for_status()
print("variant:", r.json()["name"], "=", args.base, f"+ {args.alpha}·{args.name}")

client = OpenAI(base_url=f"{URL}/v1", api_key="none")
out = client.completions.create(model=args.name, prompt="The capital of France", max_tokens=8, temperature=0)
print("answer: ", repr(out.choices[0].text))  # the first request swaps the engine's weights in place
