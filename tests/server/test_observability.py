"""Metrics, promtool, a real Prometheus scraping the gateway, and the Grafana dashboard's queries.

Against the mock-engine stack (no vLLM). promtool and prometheus come from Debian's `prometheus`
package, which `make test` installs; a missing binary fails these tests, it does not skip them.
"""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from loaders.engine import free_port
from tests.server.conftest import metric_families, sample_value

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "deltagate.json"
PROMETHEUS_YML = ROOT / "docker" / "prometheus" / "prometheus.yml"
METRIC_NAME = re.compile(r"\b(deltagate_[a-z_]+|vllm:[a-z_:]+)")


def _binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: install Debian's prometheus package (make test does)"
    return path


def _traffic(stack, model: str, streams: int, plain: int) -> int:
    """Send `streams` streaming and `plain` non-streaming completions; return tokens generated."""
    tokens = 0
    for i in range(streams + plain):
        body = {"model": model, "prompt": "a b c d", "max_tokens": 3, "stream": i < streams}
        r = httpx.post(stack.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        tokens += 3
    return tokens


def test_metrics_count_real_requests_with_bounded_labels(mock_stack):
    before = metric_families(mock_stack.url)
    tokens = _traffic(mock_stack, "mock-half", streams=3, plain=2)
    after = metric_families(mock_stack.url)

    def delta(sample, **labels):
        return sample_value(after, sample, **labels) - sample_value(before, sample, **labels)

    ok = {"variant": "mock-half", "endpoint": "/v1/completions", "status_class": "2xx"}
    assert delta("deltagate_requests_total", **ok) == 5
    assert delta("deltagate_request_duration_seconds_count", variant="mock-half") == 5
    assert delta("deltagate_time_to_first_token_seconds_count", variant="mock-half") == 3  # streams only
    assert delta("deltagate_swap_wait_seconds_count", variant="mock-half") == 5
    assert delta("deltagate_generation_tokens_total", variant="mock-half") == tokens
    assert delta("deltagate_prompt_tokens_total", variant="mock-half") == 5 * 4

    resident = {s.labels["variant"]: s.value for s in after["deltagate_resident_variant"].samples}
    assert resident["mock-half"] == 1 and sum(resident.values()) == 1
    assert set(resident) >= {"mock", "mock-inst", "mock-half"}
    assert sample_value(after, "deltagate_inflight_requests", engine="mock") == 0
    assert sample_value(after, "deltagate_swaps_total", engine="mock", result="ok") >= 1
    assert after["deltagate_build_info"].samples[0].labels["version"]

    registered = {"mock", "mock-inst", "mock-half"}
    for family in after.values():
        for s in family.samples:
            assert s.labels.get("variant", "mock") in registered, s
            assert s.labels.get("engine", "mock") == "mock", s
            assert s.labels.get("status_class", "2xx") in {"2xx", "4xx", "5xx"}, s


def test_promtool_finds_nothing_to_complain_about(mock_stack):
    _traffic(mock_stack, "mock-inst", streams=1, plain=1)
    text = httpx.get(mock_stack.url + "/metrics").text
    done = subprocess.run(
        [_binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), (
        done.stdout + done.stderr
    )


def test_engine_metrics_are_relayed_without_opening_engine_ports(mock_stack):
    r = httpx.get(mock_stack.url + "/metrics/engines/mock")
    assert r.status_code == 200 and 'vllm:num_requests_running{engine="0",model_name="mock"}' in r.text
    r = httpx.get(mock_stack.url + "/metrics/engines/nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def _dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, template variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variable = re.fullmatch(r"label_values\((\w+), (\w+)\)", dashboard["templating"]["list"][0]["definition"])
    exprs.append(f"group by ({variable[2]}) ({variable[1]})")  # what Grafana asks for the variable
    return [e.replace("$__rate_interval", "1m").replace("$variant", ".*") for e in exprs]


def dashboard_metric_names() -> set[str]:
    """Metric names the dashboard reads (histogram series reduced to their family)."""
    names = {m for e in _dashboard_queries() for m in METRIC_NAME.findall(e)}
    return {re.sub(r"_(bucket|count|sum)$", "", m) for m in names}


def test_every_dashboard_query_names_a_metric_the_gateway_exports(mock_stack):
    _traffic(mock_stack, "mock", streams=1, plain=0)
    exported = set(metric_families(mock_stack.url))
    exported |= {f"{name}_total" for name in exported} | {f"{name}_info" for name in exported}
    used = {m for m in dashboard_metric_names() if m.startswith("deltagate_")}
    assert len(used) >= 10
    assert used <= exported, used - exported
    # vllm:* names are checked against a real engine in tests/server/test_serving.py


@pytest.fixture()
def prometheus(mock_stack, tmp_path):
    """A real Prometheus server scraping the gateway every second, with the shipped scrape config."""
    gateway = mock_stack.url.removeprefix("http://")
    config = PROMETHEUS_YML.read_text().replace("gateway:8000", gateway).replace("smollm2", "mock")
    config = config.replace("scrape_interval: 5s", "scrape_interval: 1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    cmd = [
        _binary("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(prometheus: str, expr: str) -> dict:
    r = httpx.get(prometheus + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    return r.json()["data"]


def test_real_prometheus_scrapes_the_gateway_and_its_engines(mock_stack, prometheus):
    _traffic(mock_stack, "mock-inst", streams=2, plain=1)
    want = sample_value(
        metric_families(mock_stack.url), "deltagate_requests_total", variant="mock-inst", status_class="2xx"
    )
    expr = 'sum(deltagate_requests_total{variant="mock-inst",status_class="2xx"})'
    engine_expr = 'vllm:num_requests_running{model_name="mock",job="deltagate-engine-mock"}'
    deadline = time.monotonic() + 60
    while True:
        got = _query(prometheus, expr)["result"] if _ready(prometheus) else []
        engine = _query(prometheus, engine_expr)["result"] if got else []
        if got and float(got[0]["value"][1]) >= want and engine:
            break
        assert time.monotonic() < deadline, f"Prometheus did not scrape in time: {got} {engine}"
        time.sleep(0.5)
    assert float(got[0]["value"][1]) == want
    for query in _dashboard_queries():  # every dashboard query is valid PromQL for this server
        _query(prometheus, query)


def _ready(prometheus: str) -> bool:
    try:
        return httpx.get(prometheus + "/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
