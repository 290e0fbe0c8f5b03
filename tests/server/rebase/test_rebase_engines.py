"""Rebases through real engines (the stack: pico, tied embeddings; θ′ is the stack's updated base,
registered here as `tied-next`). The eval is perplexity on held-out text, a metric where every α
scores differently.

- A rebase of tied-inst with α = 1 whose gate passes: the alias moves, and what it serves is
  bit-identical to stock vLLM on `deltagate merge --base θ′ --delta Δ` (the fleet's tied-v2-inst).
- A rebase of tied-half with an α search whose gate fails: the chosen α is the validation split's
  best (re-measured by an independent eval run), and no alias moves.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.server.conftest import completion_outputs

pytestmark = pytest.mark.engine
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Numbers: 1 2 3 4 5 6 7 8 9 10",
    "The capital of France is Paris.",
    "import os\nprint(os.getcwd())",
    "A delta is the difference between two sets of weights.",
    "for i in range(10):\n    print(i)",
    "Rain falls on the plain in Spain.",
    "class Point:\n    x: int\n    y: int",
    "Red, green and blue.",
    "The model answered the question in one word.",
    "while True:\n    break",
]


@pytest.fixture(scope="module")
def setup(stack, tied_updated):
    """θ′ as runtime base tied-next, a perplexity eval over TEXTS; both removed afterwards."""
    r = httpx.post(
        f"{stack.url}/v1/bases",
        json={"name": "tied-next", "path": str(tied_updated)},
        headers=stack.admin,
        timeout=300,
    )
    assert r.status_code == 201 and r.json()["group"] == "tied", r.text  # hot-loaded by tied's engine
    content = "\n".join(json.dumps({"text": t}) for t in TEXTS)
    r = httpx.post(
        f"{stack.url}/v1/evals",
        json={"name": "ppl", "data_source": {"type": "perplexity", "content": content}},
        headers=stack.admin,
    )
    assert r.status_code == 201, r.text
    yield r.json()["id"]
    for path in (
        "aliases/pico-assistant",
        "aliases/pico-half",
        "variants/tied-inst:tied-next",
        "variants/tied-half:tied-next",
        "bases/tied-next",
    ):
        httpx.delete(f"{stack.url}/v1/{path}", headers=stack.admin)


def _alias(stack, name: str, variant: str) -> None:
    body = {"targets": [{"variant": variant}]}
    httpx.put(f"{stack.url}/v1/aliases/{name}", json=body, headers=stack.admin).raise_for_status()


def _finish(stack, path: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (got := httpx.get(f"{stack.url}{path}", headers=stack.admin).json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    return got


def test_a_passing_rebase_moves_the_alias_to_weights_equal_to_the_offline_merge(stack, setup):
    _alias(stack, "pico-assistant", "tied-inst")
    body = {
        "from_base": "tied",
        "to_base": "tied-next",
        "variants": ["tied-inst"],
        "eval_id": setup,
        "holdout": 6,
        "seed": 1,
        "gate": {"min_difference": -1000},
    }
    r = httpx.post(f"{stack.url}/v1/rebases", json=body, headers=stack.admin)
    assert r.status_code == 201, r.text
    done = _finish(stack, f"/v1/rebases/{r.json()['id']}")
    assert done["status"] == "completed", done
    report = done["report"]
    entry = report["variants"]["tied-inst"]
    assert report["criterion"] == "perplexity" and report["lower_is_better"]
    assert entry["gate"]["passed"] and entry["promoted"] and entry["variant"] == "tied-inst:tied-next"
    scores = entry["scores"]
    assert all(s["n"] == 6 and s["ci95"][0] <= s["value"] <= s["ci95"][1] for s in scores.values()), scores
    difference = scores["candidate"]["value"] - scores["from"]["value"]
    assert difference == pytest.approx(entry["difference"]["value"])
    assert done["progress"] == {"done": 0, "total": 0}  # phase done: no run in flight
    ask = {"model": "pico-assistant", "prompt": "x", "max_tokens": 1}
    r = httpx.post(f"{stack.url}/v1/completions", json=ask)
    assert r.headers["x-deltagate-variant"] == "tied-inst:tied-next"
    assert completion_outputs(stack.url, "pico-assistant") == stack.refs["tied-v2-inst"]


def test_an_alpha_search_picks_the_validation_best_and_a_failing_gate_moves_nothing(stack, setup):
    _alias(stack, "pico-half", "tied-half")
    body = {
        "from_base": "tied",
        "to_base": "tied-next",
        "variants": ["tied-half"],
        "eval_id": setup,
        "alphas": [0.5, 1.0, 2.0],
        "validation": 6,
        "holdout": 6,
        "gate": {"min_ratio": 100},
        "concurrency": 2,
    }
    r = httpx.post(f"{stack.url}/v1/rebases", json=body, headers=stack.admin)
    assert r.status_code == 201, r.text
    done = _finish(stack, f"/v1/rebases/{r.json()['id']}")
    assert done["status"] == "completed", done
    report, entry = done["report"], done["report"]["variants"]["tied-half"]
    validation = {float(a): s["value"] for a, s in entry["validation"].items()}
    assert len(set(validation.values())) == 3, validation  # each α really measured
    assert entry["alpha"] == min(validation, key=validation.get)  # perplexity: lower is better
    assert entry["gate"]["passed"] is False and not entry["promoted"]
    alias = httpx.get(f"{stack.url}/v1/aliases/pico-half", headers=stack.admin).json()
    assert alias["shares"] == {"tied-half": 1.0} and alias["generation"] == 1
    # the chosen variant, measured again by an independent run on the same validation items
    again = {"variants": ["tied-half:tied-next"], "items": report["validation_items"], "concurrency": 2}
    run = httpx.post(f"{stack.url}/v1/evals/{setup}/runs", headers=stack.admin, json=again)
    assert run.status_code == 201, run.text
    again = _finish(stack, f"/v1/evals/{setup}/runs/{run.json()['id']}")
    value = again["per_variant"]["tied-half:tied-next"]["metrics"]["perplexity"]["value"]
    assert value == pytest.approx(validation[entry["alpha"]], rel=1e-6)
    variants = httpx.get(f"{stack.url}/v1/variants", headers=stack.admin).json()["data"]
    names = {v["name"] for v in variants}
    assert not {n for n in names if n.startswith("tied-half:tied-next:a")}  # the other candidates are gone
