"""Rebase mechanics through a real gateway on a mock engine (fast; the real-engine rebase with an α
search and exactness is test_rebase_engines.py): the gate promotes or not, canary steps with a
hold, rollback, cancel, a gateway killed mid-rebase, and refusals.

The eval is a JSONL one graded `is_base` (the mock answers `wbase` only on a plain base): the θ
variant and its transfer both score 0, so their paired difference is exactly 0 — a gate of
"lower bound ≥ −0.5" passes and one of "≥ +0.5" fails, whatever the sampling."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import ADMIN, deltagate, restartable_mock_gateway

AUTH = {"Authorization": f"Bearer {ADMIN}"}
IS_BASE = {"type": "string_check", "name": "is_base", "reference": "wbase", "operation": "like"}
ITEMS = "\n".join(json.dumps({"q": f"question {i}"}) for i in range(12))


@pytest.fixture(scope="module")
def gateway(tied, tied_updated, tmp_path_factory):
    """(url, restart, eval id): base mock with variant mock-inst, θ′ registered as mock-v2, a JSONL
    eval, and alias `assistant` → mock-inst."""
    work = tmp_path_factory.mktemp("rebase")
    with restartable_mock_gateway(tied, work) as (url, restart, _):
        r = httpx.post(f"{url}/v1/bases", json={"name": "mock-v2", "path": str(tied_updated)}, headers=AUTH)
        assert r.status_code == 201, r.text
        r = httpx.post(f"{url}/v1/evals", json=_gate_eval("rebase-gate"), headers=AUTH)
        assert r.status_code == 201, r.text
        yield url, restart, r.json()["id"]


def _gate_eval(name: str) -> dict:
    """The JSONL eval graded `is_base` (the module's docstring)."""
    return {
        "name": name,
        "data_source": {"type": "jsonl", "content": ITEMS},
        "prompt": "{{item.q}}",
        "endpoint": "completions",
        "testing_criteria": [IS_BASE],
    }


def _alias(url: str, name: str = "assistant") -> dict:
    return httpx.get(f"{url}/v1/aliases/{name}", headers=AUTH).json()


def _point(url: str, *targets: tuple[str, float], name: str = "assistant") -> None:
    body = {"targets": [{"variant": v, "weight": w} for v, w in targets]}
    httpx.put(f"{url}/v1/aliases/{name}", json=body, headers=AUTH).raise_for_status()


def _rebase(url: str, eval_id: str, **extra) -> dict:
    body = {
        "from_base": "mock",
        "to_base": "mock-v2",
        "eval_id": eval_id,
        "holdout": 6,
        "max_tokens": 2,
        "gate": {"min_difference": -0.5},
        **extra,
    }
    r = httpx.post(f"{url}/v1/rebases", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


def _wait(
    url: str,
    rebase_id: str,
    until=lambda r: r["status"] not in ("queued", "in_progress"),
    timeout: float = 120,
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/rebases/{rebase_id}", headers=AUTH, timeout=30)
        if r.status_code == 200 and until(r.json()):
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)


def test_a_passing_gate_promotes_through_canary_steps_and_rollback_goes_back(gateway):
    url, _, eval_id = gateway
    _point(url, ("mock-inst", 1))
    job = _rebase(
        url, eval_id, alphas=[0.5, 1.0], validation=4, promote={"steps": [50, 100], "hold_seconds": 2}
    )
    # the canary step: half of the θ variant's share on the transferred variant, for the hold time
    mid = _wait(url, job["id"], lambda r: r["report"]["promotion_step"] == 1)
    assert _alias(url)["shares"] == {"mock-inst": 0.5, "mock-inst:mock-v2": 0.5}
    assert mid["status"] == "in_progress"
    done = _wait(url, job["id"])
    assert done["status"] == "completed", done
    entry = done["report"]["variants"]["mock-inst"]
    assert entry["gate"]["passed"] and entry["promoted"] and entry["aliases"] == ["assistant"]
    assert set(entry["validation"]) == {"0.5", "1.0"} and entry["alpha"] == 1.0  # a tie: α nearest 1
    assert set(entry["scores"]) == {"from", "candidate", "to_base"}
    assert entry["scores"]["to_base"]["value"] == 1.0  # θ′ alone answers `wbase`
    assert entry["difference"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": 6}
    assert len(done["report"]["validation_items"]) == 4 and len(done["report"]["holdout_items"]) == 6
    assert not set(done["report"]["validation_items"]) & set(done["report"]["holdout_items"])
    variants = {v["name"]: v for v in httpx.get(f"{url}/v1/variants", headers=AUTH).json()["data"]}
    assert "mock-inst:mock-v2:a0.5" not in variants  # the losing candidate is gone
    assert variants["mock-inst:mock-v2"]["base"] == "mock-v2"
    assert variants["mock-inst:mock-v2"]["deltas"][0]["provenance"] == "transferred"
    alias = _alias(url)
    assert alias["shares"] == {"mock-inst:mock-v2": 1.0}
    assert alias["previous"] == [{"variant": "mock-inst", "weight": 1.0}]  # each step rolls back to the start
    r = httpx.post(f"{url}/v1/completions", json={"model": "assistant", "prompt": "x", "max_tokens": 1})
    assert r.headers["x-deltagate-variant"] == "mock-inst:mock-v2" and r.json()["model"] == "assistant"
    httpx.post(f"{url}/v1/aliases/assistant/rollback", headers=AUTH).raise_for_status()
    assert _alias(url)["shares"] == {"mock-inst": 1.0}


def test_a_failing_gate_promotes_nothing(gateway):
    url, _, eval_id = gateway
    _point(url, ("mock-inst", 3), ("mock", 1))
    before = _alias(url)
    done = _wait(url, _rebase(url, eval_id, gate={"min_difference": 0.5, "min_ratio": 0.9})["id"])
    assert done["status"] == "completed", done
    entry = done["report"]["variants"]["mock-inst"]
    assert entry["gate"]["passed"] is False and not entry["promoted"]
    assert any("< +0.5000" in reason for reason in entry["gate"]["reasons"]), entry["gate"]
    assert _alias(url) == before


def test_cancel_during_a_canary_puts_the_alias_back(gateway):
    url, _, eval_id = gateway
    _point(url, ("mock-inst", 1))
    job = _rebase(url, eval_id, promote={"steps": [10, 100], "hold_seconds": 60})
    _wait(url, job["id"], lambda r: r["report"]["promotion_step"] == 1)
    assert _alias(url)["shares"] == {"mock-inst": 0.9, "mock-inst:mock-v2": 0.1}
    r = httpx.post(f"{url}/v1/rebases/{job['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    _wait(url, job["id"], lambda r: any("back to their targets" in line for line in r["report"]["log"]))
    assert _alias(url)["shares"] == {"mock-inst": 1.0}


def test_a_gateway_killed_mid_rebase_resumes_it(gateway):
    """Killed during the held canary step: at the next start the alias is put back, and the
    promotion runs again from the first step to the end."""
    url, restart, eval_id = gateway
    _point(url, ("mock-inst", 1))
    job = _rebase(url, eval_id, promote={"steps": [20, 100], "hold_seconds": 3})
    _wait(url, job["id"], lambda r: r["report"]["promotion_step"] == 1)
    restart(kill=True)
    done = _wait(url, job["id"])
    assert done["status"] == "completed", done
    assert any("resumed" in line for line in done["report"]["log"]), done["report"]["log"]
    assert done["report"]["variants"]["mock-inst"]["promoted"]
    assert _alias(url)["shares"] == {"mock-inst:mock-v2": 1.0}


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"from_base": "nope"}, 404, "unknown base 'nope'"),
        ({"variants": ["mock"]}, 400, "is not a variant of base 'mock'"),
        ({"gate": {"criterion": "bleu", "min_ratio": 1}}, 400, "gate criterion 'bleu'"),
        ({"holdout": 13}, 400, "exceed the eval's 12"),
        ({"alphas": [0.5, 1]}, 422, "needs a validation split"),
        ({"gate": {}}, 422, "state the gate"),
        ({"promote": {"steps": [50]}}, 422, "ending at 100"),
        ({"to_base": "mock"}, 422, "the same base"),
        ({"eval_id": "eval_x"}, 404, "eval 'eval_x' not found"),
    ],
)
def test_bad_rebases_are_refused_before_any_work(gateway, change, status, words):
    url, _, eval_id = gateway
    body = {
        "from_base": "mock",
        "to_base": "mock-v2",
        "eval_id": eval_id,
        "holdout": 6,
        "gate": {"min_difference": -0.5},
        **change,
    }
    r = httpx.post(f"{url}/v1/rebases", json=body, headers=AUTH)
    assert r.status_code == status and words in r.text, r.text


def test_the_cli_sets_aliases_runs_a_rebase_and_plots_its_report(gateway, tmp_path):
    url, _, eval_id = gateway
    common = ["--url", url, "--admin-token", ADMIN]
    out = deltagate("alias", "set", "cli-chat", "mock-inst=95", "mock=5", *common).stdout
    assert "cli-chat -> mock-inst 95.0%, mock 5.0%" in out
    png = tmp_path / "rebase.png"
    done = deltagate(
        "rebase",
        "--from",
        "mock",
        "--to",
        "mock-v2",
        "--eval",
        eval_id,
        "--holdout",
        "4",
        "--variant",
        "mock-inst",
        "--min-difference",
        "-0.5",
        "--max-tokens",
        "2",
        "--plot",
        png,
        *common,
    )
    assert "pass" in done.stdout and "mock-inst:mock-v2" in done.stdout, done.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    listed = deltagate("alias", "list", *common).stdout
    assert "cli-chat -> mock-inst:mock-v2 95.0%, mock 5.0%" in listed
    back = deltagate("alias", "rollback", "cli-chat", *common).stdout
    assert "cli-chat -> mock-inst 95.0%, mock 5.0%" in back
    failed = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "rebase",
            "--from",
            "nope",
            "--to",
            "mock-v2",
            "--eval",
            eval_id,
            "--holdout",
            "2",
            "--min-ratio",
            "1",
            *common,
        ],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2 and "unknown base 'nope'" in failed.stderr


# Last in this module: once a key exists, every inference call needs one.
def test_a_project_admin_key_rebases_its_own_variants_with_its_own_eval(gateway, tied):
    """A project's admin key rebases the variants it manages, with its own eval, onto a base its scopes
    allow, and moves only its own aliases; another project sees none of it; root sees all of it."""
    url = gateway[0]

    def key(project: str, models: list[str]) -> dict:
        body = {"name": "ops", "admin": True, "models": models}
        r = httpx.post(f"{url}/v1/projects/{project}/keys", json=body, headers=AUTH)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['secret']}"}

    ops = key("team-r", ["team-r/*", "base:mock", "base:mock-v2"])
    peer = key("team-s", ["team-s/*", "base:mock"])
    assert httpx.post(
        f"{url}/v1/deltas", json={"name": "team-r/d", "path": str(tied.delta)}, headers=ops
    ).is_success
    body = {"name": "team-r/inst", "base": "mock", "deltas": [{"delta": "team-r/d"}]}
    assert httpx.post(f"{url}/v1/variants", json=body, headers=ops, timeout=60).status_code == 201
    _point(url, ("team-r/inst", 1), name="team-r/prod")
    _point(url, ("team-r/inst", 1), name="root-owned")  # root's alias onto team R's variant: not R's to move
    eval_id = httpx.post(f"{url}/v1/evals", json=_gate_eval("team-r's gate"), headers=ops).json()["id"]
    base = {"from_base": "mock", "to_base": "mock-v2", "holdout": 6, "max_tokens": 2}
    base |= {"gate": {"min_difference": -0.5}, "eval_id": eval_id}
    refused = [
        (
            httpx.post(f"{url}/v1/rebases", json=base | {"variants": ["mock-inst"]}, headers=ops),
            403,
            "team-r/",
        ),
        (httpx.post(f"{url}/v1/rebases", json=base | {"eval_id": gateway[2]}, headers=ops), 404, "eval"),
        (httpx.post(f"{url}/v1/rebases", json=base, headers=peer), 404, "unknown base 'mock-v2'"),
    ]
    for r, status, words in refused:
        assert r.status_code == status and words in r.text, r.text
    r = httpx.post(f"{url}/v1/rebases", json=base, headers=ops)  # every variant of mock it manages
    assert r.status_code == 201, r.text
    assert list(r.json()["report"]["variants"]) == ["team-r/inst"]
    done = _wait(url, r.json()["id"])
    assert done["status"] == "completed", done
    entry = done["report"]["variants"]["team-r/inst"]
    assert entry["gate"]["passed"] and entry["aliases"] == ["team-r/prod"] and entry["promoted"]
    assert httpx.get(f"{url}/v1/aliases/team-r/prod", headers=ops).json()["shares"] == {
        "team-r/inst:mock-v2": 1.0
    }
    assert _alias(url, "root-owned")["shares"] == {"team-r/inst": 1.0}
    assert httpx.get(f"{url}/v1/rebases/{done['id']}", headers=peer).status_code == 404
    assert httpx.post(f"{url}/v1/rebases/{done['id']}/cancel", headers=peer).status_code == 404
    assert done["id"] not in [x["id"] for x in httpx.get(f"{url}/v1/rebases", headers=peer).json()["data"]]
    assert [x["id"] for x in httpx.get(f"{url}/v1/rebases", headers=ops).json()["data"]] == [done["id"]]
    assert done["id"] in [x["id"] for x in httpx.get(f"{url}/v1/rebases", headers=AUTH).json()["data"]]
    usage = httpx.get(f"{url}/v1/usage", params={"project": "team-r"}, headers=AUTH).json()["data"]
    assert {u["key"] for u in usage} == {"team-r/ops"} and sum(u["requests"] for u in usage) >= 18  # its runs
