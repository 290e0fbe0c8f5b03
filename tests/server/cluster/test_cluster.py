"""deltagate on a real Ray cluster of two nodes (ray.cluster_utils.Cluster, one machine): `serve
--ray --ray-address`, a replica (one real vLLM CPU engine) on each node, artifacts in a real
S3-compatible store. Each node has its own directory (engine logs, artifact cache) and no access
to the gateway's state dir. Every call goes through the gateway: the same app as on one machine.

References are the stack's stock vLLM answers on checkpoints merged offline (conftest.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deltas import ArtifactStore
from loaders.engine import free_port
from tests.server.conftest import (
    ADMIN,
    API_TEXT,
    MAX_TOKENS,
    PROMPTS,
    completion_outputs,
    completion_params,
    start_gateway,
    stop_gateway,
    wait_healthy,
)

pytestmark = pytest.mark.engine
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
ENGINE = "x-deltagate-engine"


@dataclass
class Cluster:
    url: str
    state: Path
    proc: object
    delta_uri: str
    nodes: dict[str, Path]  # Ray node id -> that node's own directory
    args: list[str]
    log: Path


@pytest.fixture(scope="module")
def cluster(tied, s3_server, tmp_path_factory) -> Cluster:
    """Deltas in an S3 artifact store: tied-inst from a local file (put into the store at start),
    tied-half named by its store URI only; each engine reads them through its node's cache."""
    import ray
    from ray.cluster_utils import Cluster as RayCluster

    work = tmp_path_factory.mktemp("cluster")
    dirs = [work / "node-a", work / "node-b"]
    ray_cluster = RayCluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "env_vars": {"DELTAGATE_NODE_DIR": str(dirs[0])},
        },
    )
    ray_cluster.add_node(num_cpus=1, env_vars={"DELTAGATE_NODE_DIR": str(dirs[1])})
    nodes = {n.node_id: d for n, d in zip(ray_cluster.list_all_nodes(), dirs, strict=True)}
    port, log = free_port(), work / "serve.log"
    root = f"s3://{s3_server.bucket}/cluster"
    stored = ArtifactStore(root).put(tied.delta)
    args = [
        "--ray",
        "--ray-address",
        ray_cluster.address,
        "--replicas",
        "2",
        "--replicas-per-node",
        "1",
        "--base",
        f"tied={tied.base}",
        "--artifact-store",
        root,
        "--variant",
        f"tied-inst={tied.delta}",
        "--variant",
        f"tied-half={stored.uri}:0.5",
    ]
    proc = start_gateway(args, work / "state", port, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc, log)
        cluster = Cluster(f"http://127.0.0.1:{port}", work / "state", proc, stored.uri, nodes, args, log)
        _both_up(cluster)  # the gateway answers once one engine runs; the tests need both
        yield cluster
    finally:
        stop_gateway(cluster.proc if "cluster" in locals() else proc)
        ray_cluster.shutdown()
        ray.shutdown()


def _engines(cluster: Cluster) -> dict[str, dict]:
    """Every engine that is up, by id (GET /v1/engines)."""
    r = httpx.get(f"{cluster.url}/v1/engines", headers=HEADERS, timeout=60)
    r.raise_for_status()
    return {e["id"]: e for e in r.json()["data"]}


def _both_up(cluster: Cluster, timeout: float = 600) -> dict[str, dict]:
    """Wait until both replicas' engines are up (Ray replaces a dead one; up to `timeout` s); the
    engines then up."""
    deadline = time.monotonic() + timeout
    while len(engines := _engines(cluster)) != 2 and time.monotonic() < deadline:
        time.sleep(1)
    return engines


def _served_by(cluster: Cluster, model: str) -> str:
    r = httpx.post(f"{cluster.url}/v1/completions", json=completion_params(model, PROMPTS[0]), timeout=120)
    r.raise_for_status()
    return r.headers[ENGINE]


def _cached(cluster: Cluster, engine: dict) -> list[str]:
    """The artifacts in the node cache of `engine`'s node."""
    return sorted(p.name for p in (cluster.nodes[engine["node"]] / "artifact-cache").glob("*.safetensors"))


def test_variants_through_ray_equal_stock_vllm_on_merged_weights(cluster, stack):
    assert completion_outputs(cluster.url, "tied-inst") == stack.refs["tied-inst"]
    assert completion_outputs(cluster.url, "tied-half") == stack.refs["tied-half"]
    assert completion_outputs(cluster.url, "tied") == stack.base_before["tied"]
    assert httpx.get(f"{cluster.url}/v1/engines").status_code == 401  # admin route
    r = httpx.post(f"{cluster.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]["message"]
    engines = _engines(cluster)
    assert {e["node"] for e in engines.values()} == set(cluster.nodes)  # a replica on each node


def test_responses_and_messages_through_ray_equal_stock_vllm(cluster, stack):
    """The Responses and Anthropic Messages routes on Ray replicas: the variant's template applied
    by each replica's engine, answers as stock vLLM's (the fleet's references)."""
    import anthropic
    import openai

    want = stack.api_refs["tied-inst"]
    oa = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="k", max_retries=0)
    r = oa.responses.create(
        model="tied-inst",
        input=API_TEXT,
        max_output_tokens=MAX_TOKENS,
        temperature=0,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
    )
    logprobs = [(lp.token, lp.logprob) for lp in r.output[-1].content[0].logprobs]
    assert r.model == "tied-inst"
    assert (r.output_text, logprobs) == (want["responses"]["text"], want["responses"]["logprobs"])
    an = anthropic.Anthropic(base_url=cluster.url, api_key="k", max_retries=0)
    m = an.messages.create(
        model="tied-inst",
        max_tokens=MAX_TOKENS,
        extra_body={"temperature": 0},
        messages=[{"role": "user", "content": API_TEXT}],
    )
    assert (m.model, m.content[0].text) == ("tied-inst", want["messages"]["text"])


def test_each_variant_stays_on_its_engine(cluster):
    """Alternating variants go to the engine holding each, with no swap once both are placed."""
    placed = {m: _served_by(cluster, m) for m in ("tied-inst", "tied-half")}
    for _ in range(3):
        placed = {m: _served_by(cluster, m) for m in placed}
    assert len(set(placed.values())) == 2, placed  # one engine each
    engines = _engines(cluster)
    assert {engines[e]["resident_variant"] for e in placed.values()} == {"tied-inst", "tied-half"}
    swaps = {e: engines[e]["swaps"] for e in engines}
    for _ in range(3):
        for model, engine in placed.items():
            assert _served_by(cluster, model) == engine
    assert {e: s["swaps"] for e, s in _engines(cluster).items()} == swaps
    for engine in placed.values():  # both engines serve a stored delta, read from their node's cache
        assert _cached(cluster, engines[engine]) == [cluster.delta_uri.rsplit("/", 1)[1]]
    text = httpx.get(f"{cluster.url}/metrics/engines/{placed['tied-half']}").text
    assert 'running_lora_adapters="tied-half"' in text  # residency, per engine, for routers


def test_the_whole_api_through_the_gateway_on_ray(cluster, stack, tied, tied_updated):
    """Upload, define, evaluate, add a base at runtime, delete: the admin API a Ray deployment lacked."""
    url = cluster.url
    r = httpx.post(
        f"{url}/v1/deltas?name=d2",
        content=tied.delta2.read_bytes(),
        timeout=60,
        headers={**HEADERS, "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 201, r.text
    uri = r.json()["path"]
    assert uri.startswith("s3://") and not list((cluster.state / "deltas").glob("*.safetensors"))
    r = httpx.post(f"{url}/v1/deltas", json={"name": "d1", "path": cluster.delta_uri}, headers=HEADERS)
    assert r.status_code == 201, r.text
    terms = [{"delta": "d1", "alpha": 0.7}, {"delta": "d2", "alpha": 0.4}]
    body = {"name": "tied-mix", "base": "tied", "deltas": terms}
    assert httpx.post(f"{url}/v1/variants", json=body, headers=HEADERS).status_code == 201
    assert completion_outputs(url, "tied-mix") == stack.refs["tied-mix"]  # registered after start
    served = _engines(cluster)[_served_by(cluster, "tied-mix")]
    assert uri.rsplit("/", 1)[1] in _cached(cluster, served)  # fetched from the store by its node

    ev = httpx.post(
        f"{url}/v1/evals",
        headers=HEADERS,
        json={
            "name": "ray",
            "data_source": {"type": "jsonl", "content": '{"q": "The capital of France"}'},
            "prompt": "{{item.q}}",
            "endpoint": "completions",
            "testing_criteria": [
                {"type": "string_check", "name": "any", "reference": "", "operation": "like"}
            ],
        },
    )
    assert ev.status_code == 201, ev.text
    runs = f"{url}/v1/evals/{ev.json()['id']}/runs"
    run = httpx.post(runs, json={"variants": ["tied-mix", "tied"], "max_tokens": 4}, headers=HEADERS)
    assert run.status_code == 201, run.text
    deadline = time.monotonic() + 120
    while (got := httpx.get(f"{runs}/{run.json()['id']}", headers=HEADERS).json())["status"] not in (
        "completed",
        "failed",
        "canceled",
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert got["status"] == "completed", got
    assert got["progress"]["done"] == 2, got  # one item on each variant

    base = {"name": "tied-v2", "path": str(tied_updated)}
    r = httpx.post(f"{url}/v1/bases", json=base, headers=HEADERS, timeout=120)
    assert r.status_code == 201 and r.json()["group"] == "tied", r.text  # hot-loaded by the tied engines
    assert completion_outputs(url, "tied-v2") == stack.refs["tied-v2"]
    for path in ("/v1/variants/tied-mix", "/v1/bases/tied-v2", "/v1/deltas/d2"):
        assert httpx.delete(url + path, headers=HEADERS).status_code == 204, path
    assert httpx.post(f"{url}/v1/completions", json=completion_params("tied-mix", "x")).status_code == 404


def test_an_alias_moved_by_a_rebase_on_ray_serves_the_offline_merge(cluster, stack, tied_updated):
    """Aliases and rebases in the distributed mode: the same services behind the Ray pool. A canary
    split answers from the variant its header names; a rebase of tied-inst onto θ′ moves the alias,
    which then answers as stock vLLM on the offline merge θ′ + Δ."""
    url = cluster.url
    split = {"targets": [{"variant": "tied-inst"}, {"variant": "tied-half"}]}
    assert httpx.put(f"{url}/v1/aliases/ray-chat", json=split, headers=HEADERS).status_code == 200
    seen = set()
    for _ in range(8):
        r = httpx.post(f"{url}/v1/completions", json=completion_params("ray-chat", PROMPTS[0]), timeout=120)
        variant = r.headers["x-deltagate-variant"]
        seen.add(variant)
        choice = r.json()["choices"][0]
        answer = {"text": choice["text"], **choice["logprobs"]}
        answer.pop("text_offset", None)
        assert answer == stack.refs[variant][0], variant
    assert seen == {"tied-inst", "tied-half"}
    one = {"targets": [{"variant": "tied-inst"}]}
    assert httpx.put(f"{url}/v1/aliases/ray-chat", json=one, headers=HEADERS).status_code == 200
    base = {"name": "tied-v2", "path": str(tied_updated)}
    assert httpx.post(f"{url}/v1/bases", json=base, headers=HEADERS, timeout=120).status_code == 201
    ev = httpx.post(
        f"{url}/v1/evals",
        headers=HEADERS,
        json={
            "name": "ray-gate",
            "data_source": {"type": "jsonl", "content": '{"q": "a"}\n{"q": "b"}'},
            "prompt": "{{item.q}}",
            "endpoint": "completions",
            "testing_criteria": [
                {"type": "string_check", "name": "any", "reference": "", "operation": "like"}
            ],
        },
    )
    assert ev.status_code == 201, ev.text
    body = {
        "from_base": "tied",
        "to_base": "tied-v2",
        "variants": ["tied-inst"],
        "eval_id": ev.json()["id"],
        "holdout": 2,
        "max_tokens": 2,
        "gate": {"min_difference": -0.5},
    }
    r = httpx.post(f"{url}/v1/rebases", json=body, headers=HEADERS)
    assert r.status_code == 201, r.text
    deadline = time.monotonic() + 300
    while (got := httpx.get(f"{url}/v1/rebases/{r.json()['id']}", headers=HEADERS).json())["status"] in (
        "queued",
        "in_progress",
    ):
        assert time.monotonic() < deadline, got
        time.sleep(0.5)
    assert got["status"] == "completed" and got["report"]["variants"]["tied-inst"]["promoted"], got
    assert completion_outputs(url, "ray-chat") == stack.refs["tied-v2-inst"]
    for path in ("/v1/aliases/ray-chat", "/v1/variants/tied-inst:tied-v2", "/v1/bases/tied-v2"):
        assert httpx.delete(url + path, headers=HEADERS).status_code == 204, path


def test_stream_and_client_disconnect_release_the_slot(cluster):
    """A client that goes away mid-stream: the gateway closes the engine's stream and releases the
    slot, as on one machine (the stream never passes through Ray)."""
    body = {
        "model": "tied-inst",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 400,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        engine = r.headers[ENGINE]
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"model":"tied-inst"' in first
    deadline = time.monotonic() + 30
    while _engines(cluster)[engine]["inflight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _engines(cluster)[engine]["inflight"] == 0  # the slot was released


def test_kill_one_engine_under_mixed_load(cluster, stack):
    """kill -9 of one engine of two: only requests it was serving may fail; then the other replica
    serves both variants, exactly, and Ray replaces the dead replica."""
    want = {m: stack.refs[m][0]["tokens"] for m in ("tied-inst", "tied-half")}
    results: list[tuple[float, float, str, int, list | None]] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=120) as http:
            n = i
            while not stop.is_set():
                model = ("tied-inst", "tied-half")[n % 2]
                n += 1
                start = time.monotonic()
                r = http.post(f"{cluster.url}/v1/completions", json=completion_params(model, PROMPTS[0]))
                tokens = r.json()["choices"][0]["logprobs"]["tokens"] if r.status_code == 200 else None
                results.append((start, time.monotonic(), model, r.status_code, tokens))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    victim = _engines(cluster)[_served_by(cluster, "tied-inst")]
    killed_at = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(15)
    stop.set()
    for t in threads:
        t.join()
    after = [r for r in results if r[0] > killed_at]
    failed_after = [r for r in after if r[3] != 200]
    assert not failed_after, failed_after[:3]
    assert all(r[4] == want[r[2]] for r in after)  # exact answers from the surviving engine
    assert {r[2] for r in after} == {"tied-inst", "tied-half"} and len(after) >= 8
    assert all(r[1] >= killed_at for r in results if r[3] != 200)  # failures: in flight at the kill
    # Ray replaces the replica (a new engine, a new id); what was left of the killed one is gone
    engines = _both_up(cluster)
    assert len(engines) == 2 and victim["id"] not in engines
    assert completion_outputs(cluster.url, "tied-half") == stack.refs["tied-half"]
    with pytest.raises(ProcessLookupError):
        os.killpg(victim["pid"], 0)


def test_a_killed_gateway_comes_back_with_everything_registered(cluster, stack, tied):
    """kill -9 of the gateway: the engines (Ray's) keep running; a new gateway on the same state dir
    finds them, with the weights each holds, and every registered variant."""
    _both_up(cluster)  # the premise (the kill test waits for it; if it failed, this one need not)
    body = {"name": "tied-half-again", "base": "tied", "deltas": [{"delta": "tied-half.0", "alpha": 0.5}]}
    deltas = httpx.get(f"{cluster.url}/v1/deltas", headers=HEADERS).json()["data"]
    body["deltas"][0]["delta"] = next(d["name"] for d in deltas if d["path"] == cluster.delta_uri)
    assert httpx.post(f"{cluster.url}/v1/variants", json=body, headers=HEADERS).status_code == 201
    before = _engines(cluster)
    os.killpg(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait()
    port = int(cluster.url.rsplit(":", 1)[1])
    cluster.proc = start_gateway(cluster.args, cluster.state, port, cluster.log)
    wait_healthy(cluster.url, cluster.proc, cluster.log)
    deadline = time.monotonic() + 120
    while _engines(cluster).keys() != before.keys() and time.monotonic() < deadline:
        time.sleep(1)
    after = _engines(cluster)
    assert after.keys() == before.keys()  # the same engines: not restarted
    holds = {e: s["resident_variant"] for e, s in before.items()}
    assert {e: s["resident_variant"] for e, s in after.items()} == holds  # read back from the engines
    assert completion_outputs(cluster.url, "tied-half-again") == stack.refs["tied-half"]
    assert completion_outputs(cluster.url, "tied-inst") == stack.refs["tied-inst"]


def test_a_gateway_killed_with_an_engine_keeps_the_live_engine_while_ray_replaces_the_dead(cluster, stack):
    """kill -9 of one engine and of the gateway together (as when a node goes): Serve's application
    is UNHEALTHY while it replaces the dead replica, and the new gateway must keep it as it is (a
    redeploy would restart the live engine too, dropping the weights it holds)."""
    engines = _engines(cluster)
    assert len(engines) == 2
    live = _served_by(cluster, "tied-inst")
    victim = next(e for id, e in engines.items() if id != live)
    os.kill(victim["pid"], signal.SIGKILL)
    os.killpg(cluster.proc.pid, signal.SIGKILL)
    cluster.proc.wait()
    port = int(cluster.url.rsplit(":", 1)[1])
    cluster.proc = start_gateway(cluster.args, cluster.state, port, cluster.log)
    wait_healthy(cluster.url, cluster.proc, cluster.log)  # waits out the killed one's heartbeat (10 s)
    after = _engines(cluster)
    assert victim["id"] not in after
    assert after[live]["pid"] == engines[live]["pid"] and after[live]["resident_variant"] == "tied-inst"
    assert completion_outputs(cluster.url, "tied-inst") == stack.refs["tied-inst"]
    engines = _both_up(cluster)  # and Serve brings the dead one back (a new engine, a new id)
    assert len(engines) == 2 and live in engines and victim["id"] not in engines
    assert completion_outputs(cluster.url, "tied-half") == stack.refs["tied-half"]


def test_shutdown_leaves_no_engine_behind(cluster):
    groups = [e["pid"] for e in _engines(cluster).values()]
    assert len(groups) == 2
    stop_gateway(cluster.proc)
    assert cluster.proc.poll() is not None
    deadline = time.monotonic() + 60
    for group in groups:
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
