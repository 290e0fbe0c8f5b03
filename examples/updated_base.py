"""The ParamΔ workflow: register an updated base θ′ while serving, and serve an old delta on it.

    python examples/updated_base.py --updated /path/to/updated-base --delta my-delta

θ′ must have a running base's architecture, tensor shapes, dtypes and tokenizer; it is loaded into
that base's engine (no new engine). The delta was extracted on the old base θ, so the
variant θ′ + Δ is "transferred", not exact: evaluate it before moving traffic (docs/guides/rebase.md).
"""

from __future__ import annotations

import argparse

import httpx
from _gateway import URL, admin_token
from openai import OpenAI

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--updated", required=True, help="θ′: a checkpoint directory on the gateway's disk")
parser.add_argument("--delta", required=True, help="a registered delta, extracted on the old base")
parser.add_argument("--name", default="updated")
args = parser.parse_args()

admin = httpx.Client(base_url=URL, headers={"Authorization": f"Bearer {admin_token()}"}, timeout=900)
r = admin.post("/v1/bases", json={"name": args.name, "path": args.updated})
r.raise_for_status()
print("base:      ", r.json()["name"], "in engine group", r.json()["group"], "state", r.json()["state"])

variant = f"{args.name}-{args.delta}"
r = admin.post("/v1/variants", json={"name": variant, "base": args.name, "deltas": [{"delta": args.delta}]})
r.raise_for_status()
print("variant:   ", variant, "provenance", r.json()["deltas"][0]["provenance"])

client = OpenAI(base_url=f"{URL}/v1", api_key="none")
for model in (args.name, variant):
    out = client.completions.create(model=model, prompt="The capital of France", max_tokens=8, temperature=0)
    print(f"{model:<12}", repr(out.choices[0].text))
