"""The evals API through a real gateway on a mock engine: runs, paired comparisons, items, cancel,
a run that survives a gateway restart. The mock answers with a word naming its weights, so the
base passes a check for `wbase` and every variant fails it.
"""

import hashlib
import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.server.conftest import ADMIN, restartable_mock_gateway

IS_BASE = {"type": "string_check", "name": "is_base", "reference": "wbase", "operation": "like"}


def _items(n: int, **extra) -> str:
    return "\n".join(json.dumps({"q": f"question {i}", **extra}) for i in range(n))


def _eval(url: str, content: str, **extra) -> dict:
    body = {
        "name": "plumbing",
        "data_source": {"type": "jsonl", "content": content},
        "prompt": "{{item.q}}",
        "endpoint": "completions",
        "testing_criteria": [IS_BASE],
        **extra,
    }
    r = httpx.post(url + "/v1/evals", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()


def _run(url: str, eval_id: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/evals/{eval_id}/runs", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return r.json()


def _get(url: str, path: str, **params) -> dict:
    r = httpx.get(url + path, params=params, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(url: str, eval_id: str, run_id: str, until=("completed", "failed", "canceled"), timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        run = _get(url, f"/v1/evals/{eval_id}/runs/{run_id}")
        if run["status"] in until:
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def test_paired_run_scores_each_variant_with_intervals(mock_stack, tied):
    url = mock_stack.url
    ev = _eval(url, _items(6) + '\n{"q": "mock:500"}')  # the last item makes the engine fail
    assert ev["items"] == 7 and ev["testing_criteria"][0]["name"] == "is_base"
    swaps_before = len(_get(url, "/v1/bases")["data"][0]["recent_swaps"])
    run = _run(url, ev["id"], variants=["mock", "mock-inst"], max_tokens=2, concurrency=3)
    assert run["status"] == "queued" and run["progress"] == {"done": 0, "total": 14}
    run = _wait(url, ev["id"], run["id"])

    assert run["status"] == "completed", run
    assert run["result_counts"] == {"total": 14, "passed": 6, "failed": 6, "errored": 2}
    base, inst = run["per_variant"]["mock"], run["per_variant"]["mock-inst"]
    assert base["criteria"]["is_base"]["score"] == 1.0 and base["errored"] == 1
    assert inst["criteria"]["is_base"]["score"] == 0.0 and inst["criteria"]["is_base"]["n"] == 6
    lo, hi = base["criteria"]["is_base"]["ci95"]
    assert 0.5 < lo < 1.0 and hi == pytest.approx(1.0)
    (cmp,) = run["comparisons"]
    assert (cmp["baseline"], cmp["variant"], cmp["n"], cmp["difference"]) == ("mock", "mock-inst", 6, -1.0)
    # what was measured: the recipe with the artifact's sha256, sampling, seed, item count
    recipe = run["measured"]["recipes"]["mock-inst"]
    assert recipe["deltas"][0]["sha256"] == hashlib.sha256(tied.delta.read_bytes()).hexdigest()
    assert recipe["deltas"][0]["alpha"] == 1.0 and recipe["base"] == "mock"
    assert run["measured"]["sampling"]["max_tokens"] == 2 and run["measured"]["item_count"] == 7
    # variant by variant: at most one swap per variant, however many items
    assert len(_get(url, "/v1/bases")["data"][0]["recent_swaps"]) - swaps_before <= 2

    path = f"/v1/evals/{ev['id']}/runs/{run['id']}/output_items"
    passed = _get(url, path, status="pass", limit=100)["data"]
    assert len(passed) == 6 and all(
        i["variant"] == "mock" and i["grades"] == {"is_base": True} for i in passed
    )
    errors = _get(url, path, status="error")["data"]
    assert len(errors) == 2 and all("mock engine failure" in i["error"] for i in errors)
    first = _get(url, path, limit=5)
    assert len(first["data"]) == 5 and first["has_more"]
    rest = _get(url, path, limit=100, after=first["data"][-1]["id"])
    assert len(rest["data"]) == 9 and not rest["has_more"]
    assert {(i["variant"], i["index"]) for i in first["data"] + rest["data"]} == {
        (v, i) for v in ("mock", "mock-inst") for i in range(7)
    }


def test_limit_and_seed_pick_the_same_items(mock_stack):
    ev = _eval(mock_stack.url, _items(20))
    picks = []
    for _ in range(2):
        run = _wait(
            mock_stack.url,
            ev["id"],
            _run(mock_stack.url, ev["id"], variants=["mock"], limit=5, seed=3, max_tokens=1)["id"],
        )
        items = _get(mock_stack.url, f"/v1/evals/{ev['id']}/runs/{run['id']}/output_items")["data"]
        picks.append(sorted(i["index"] for i in items))
    assert len(picks[0]) == 5 and picks[0] == picks[1]


def test_bad_requests_name_the_problem(mock_stack):
    url, auth = mock_stack.url, {"Authorization": f"Bearer {ADMIN}"}
    body = {
        "name": "x",
        "data_source": {"type": "jsonl", "content": '{"q": 1}'},
        "prompt": "{{item.nope}}",
        "testing_criteria": [IS_BASE],
    }
    r = httpx.post(url + "/v1/evals", json=body, headers=auth)
    assert r.status_code == 422 and "no field 'nope'" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/evals", json=body).status_code == 401
    ev = _eval(url, _items(2))
    r = httpx.post(f"{url}/v1/evals/{ev['id']}/runs", json={"variants": ["mock", "ghost"]}, headers=auth)
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/evals/eval_nope", headers=auth).status_code == 404
    r = httpx.delete(f"{url}/v1/evals/{ev['id']}", headers=auth)
    assert r.status_code == 200
    assert r.json() == {"object": "eval.deleted", "deleted": True, "eval_id": ev["id"]}
    assert httpx.get(f"{url}/v1/evals/{ev['id']}", headers=auth).status_code == 404


def test_cancel_stops_a_run(mock_stack):
    ev = _eval(mock_stack.url, _items(30))
    run = _run(mock_stack.url, ev["id"], variants=["mock"], max_tokens=25, concurrency=1)  # 0.5 s an item
    _wait(mock_stack.url, ev["id"], run["id"], until=("in_progress",))
    r = httpx.post(
        f"{mock_stack.url}/v1/evals/{ev['id']}/runs/{run['id']}/cancel",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 200
    run = _wait(mock_stack.url, ev["id"], run["id"])
    assert run["status"] == "canceled" and run["progress"]["done"] < 30


def test_a_run_survives_a_gateway_restart(tied, tmp_path):
    """kill -9 the gateway mid-run; the restarted gateway resumes the run from its graded items."""
    with restartable_mock_gateway(tied, tmp_path) as (url, restart, log):
        ev = _eval(url, _items(8))
        run = _run(
            url, ev["id"], variants=["mock", "mock-inst"], max_tokens=20, concurrency=1
        )  # 0.4 s an item
        deadline = time.monotonic() + 30
        while _get(url, f"/v1/evals/{ev['id']}/runs/{run['id']}")["progress"]["done"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        restart(kill=True)
        run = _wait(url, ev["id"], run["id"], timeout=90)
        assert run["status"] == "completed" and run["progress"] == {"done": 16, "total": 16}
        assert run["per_variant"]["mock"]["criteria"]["is_base"]["score"] == 1.0
        assert run["per_variant"]["mock-inst"]["criteria"]["is_base"]["score"] == 0.0
        assert "resuming eval run" in log.read_text()


HUMANEVAL = {"name": "he", "data_source": {"type": "builtin", "task": "humaneval"}}


def test_humaneval_is_refused_while_code_execution_is_off(mock_stack):
    r = httpx.post(mock_stack.url + "/v1/evals", json=HUMANEVAL, headers=mock_stack.admin)
    assert r.status_code == 403, r.text
    assert "--allow-code-execution" in r.json()["error"]["message"]


def test_humaneval_runs_sandboxed_when_allowed(tied, tmp_path):
    """With --allow-code-execution the programs run, sandboxed (the mock's words fail every test)."""
    with restartable_mock_gateway(tied, tmp_path, "--allow-code-execution") as (url, _, _log):
        ev = httpx.post(url + "/v1/evals", json=HUMANEVAL, headers={"Authorization": f"Bearer {ADMIN}"})
        assert ev.status_code == 201, ev.text
        assert ev.json()["items"] == 164
        run = _wait(
            url, ev.json()["id"], _run(url, ev.json()["id"], variants=["mock"], limit=3, max_tokens=4)["id"]
        )
        assert run["status"] == "completed", run
        assert run["result_counts"] == {"total": 3, "passed": 0, "failed": 3, "errored": 0}
        assert set(run["per_variant"]["mock"]["criteria"]) == {"pass@1"}
        items = _get(url, f"/v1/evals/{ev.json()['id']}/runs/{run['id']}/output_items")["data"]
        assert all(i["input"].startswith(("def ", "from ", "import ", "\n")) and i["output"] for i in items)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"type": "perplexity"}, "give either 'content'"),
        ({"type": "perplexity", "content": '{"txt": "a"}'}, "'text' must be a non-empty string"),
        ({"type": "fidelity", "reference": "mock-inst", "content": '{"p": 1}'}, "'prompt' must be"),
        ({"type": "builtin", "task": "mmlu"}, "data_source.builtin.task"),
    ],
)
def test_bad_metric_sources_name_the_problem(mock_stack, source, message):
    r = httpx.post(
        mock_stack.url + "/v1/evals", json={"name": "x", "data_source": source}, headers=mock_stack.admin
    )
    assert r.status_code == 422 and message in r.json()["error"]["message"], r.text


def test_fidelity_reference_must_be_a_variant(mock_stack):
    source = {"type": "fidelity", "reference": "ghost"}
    ev = httpx.post(
        mock_stack.url + "/v1/evals", json={"name": "f", "data_source": source}, headers=mock_stack.admin
    )
    assert ev.status_code == 201, ev.text
    r = httpx.post(
        f"{mock_stack.url}/v1/evals/{ev.json()['id']}/runs",
        json={"variants": ["mock"]},
        headers=mock_stack.admin,
    )
    assert r.status_code == 404 and "ghost" in r.json()["error"]["message"]


def _cli(url: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cli", "eval", "--url", url, "--admin-token", ADMIN, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_eval_cli_runs_a_comparison_and_plots_it(mock_stack, tmp_path):
    (tmp_path / "items.jsonl").write_text(_items(4))
    (tmp_path / "criteria.json").write_text(json.dumps([IS_BASE]))
    done = _cli(
        mock_stack.url,
        "--jsonl",
        tmp_path / "items.jsonl",
        "--prompt",
        "{{item.q}}",
        "--criteria",
        tmp_path / "criteria.json",
        "--variant",
        "mock",
        "--variant",
        "mock-inst",
        "--max-tokens",
        "2",
        "--plot",
        tmp_path / "cmp.png",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "completed" and run["per_variant"]["mock"]["criteria"]["is_base"]["score"] == 1.0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    done = _cli(mock_stack.url, "--task", "gsm8k", "--variant", "ghost")
    assert done.returncode == 2 and "ghost" in done.stderr
