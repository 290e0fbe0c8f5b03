"""The relay through a real gateway (uvicorn subprocess) to a mock engine: fast, no vLLM.

The mock generates one word per token derived from its resident recipe (`wbase` for the plain
base), so every answer shows which weights produced it.
"""

import asyncio
import http.client
import json
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loaders.mock_engine import weights_tag
from tests.server.conftest import metric_families, mock_gateway, sample_value


def _body(model: str, **extra) -> dict:
    return {"model": model, "prompt": "one two three", "max_tokens": 4, "temperature": 0, **extra}


def _events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def _metric(stack, name: str, **labels) -> float:
    return sample_value(metric_families(stack.url), name, **labels)


def _tag(stack, model: str) -> str:
    """The word `model`'s weights generate (learned from one request on its own)."""
    r = httpx.post(stack.url + "/v1/completions", json=_body(model, max_tokens=1), timeout=30)
    r.raise_for_status()
    return r.json()["choices"][0]["text"].strip()


def test_non_streaming_answer_has_the_variant_name_and_usage(mock_stack):
    r = httpx.post(mock_stack.url + "/v1/completions", json=_body("mock-inst"), timeout=30)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["model"] == "mock-inst"
    assert data["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    words = data["choices"][0]["text"].split()
    assert len(words) == 4 and len(set(words)) == 1 and words[0] != "wbase"


@pytest.mark.parametrize("include_usage", [True, False])
def test_streaming_renames_every_chunk_and_passes_usage_only_when_asked(mock_stack, include_usage):
    body = _body("mock-half", stream=True, max_tokens=6)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    r = httpx.post(mock_stack.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "mock-half" for c in chunks)
    usage = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 6
    else:
        assert usage == []  # the gateway asked the engine for usage (metrics); the client did not
    assert sum(len(c["choices"]) for c in chunks) == 6


def test_chat_streaming_with_the_openai_client(mock_stack):
    client = openai.OpenAI(base_url=mock_stack.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="mock-inst", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.model == "mock-inst" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.split() == [_tag(mock_stack, "mock-inst")] * 3


async def test_mixed_streams_are_each_served_by_their_own_weights(mock_stack):
    """Concurrent streams over three models: each answer is entirely its own variant's word."""
    tags = {m: _tag(mock_stack, m) for m in ("mock", "mock-inst", "mock-half")}
    assert len(set(tags.values())) == 3 and tags["mock"] == "wbase"
    client = openai.AsyncOpenAI(base_url=mock_stack.url + "/v1", api_key="unused")

    async def one(i: int) -> tuple[str, list[str]]:
        model = ["mock", "mock-inst", "mock-half"][i % 3]
        stream = await client.completions.create(model=model, prompt="x", max_tokens=5, stream=True)
        return model, "".join([c.choices[0].text async for c in stream if c.choices]).split()

    results = await asyncio.gather(*(one(i) for i in range(30)))
    for model, words in results:
        assert words == [tags[model]] * 5, model


def test_client_disconnect_mid_stream_frees_the_slot(mock_stack):
    """A client that leaves mid-stream is counted out at once, so the next swap can start."""
    before = _metric(
        mock_stack,
        "deltagate_requests_total",
        variant="mock-inst",
        endpoint="/v1/completions",
        status_class="4xx",
    )
    with httpx.stream(
        "POST",
        mock_stack.url + "/v1/completions",
        json=_body("mock-inst", stream=True, max_tokens=1000),
        timeout=30,
    ) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream runs (1000 tokens would take 20 s)
        assert _metric(mock_stack, "deltagate_inflight_requests", engine="mock") == 1
    deadline = time.monotonic() + 5
    while _metric(mock_stack, "deltagate_inflight_requests", engine="mock") != 0:
        assert time.monotonic() < deadline, "slot still held after the client left"
        time.sleep(0.05)
    # a request for another variant is admitted (needs a swap, i.e. nothing in flight) promptly
    start = time.monotonic()
    assert _tag(mock_stack, "mock-half") != "wbase"
    assert time.monotonic() - start < 5
    after = _metric(
        mock_stack,
        "deltagate_requests_total",
        variant="mock-inst",
        endpoint="/v1/completions",
        status_class="4xx",
    )
    assert after == before + 1  # recorded as 499: client closed


def test_a_client_that_stops_reading_is_cut_off_and_frees_the_slot(tied, tmp_path):
    """A client that keeps its connection but reads nothing: once its writes have blocked for
    --stream-write-timeout, the stream ends, the admission is released (another variant's swap
    proceeds) and the stall is counted; the client sees a connection closed before the stream's end."""
    with mock_gateway(
        tied, tmp_path, tokens_per_second=0, gateway_args=("--stream-write-timeout", "1")
    ) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader = socket.socket()
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: writes block soon
        reader.connect((host, int(port)))
        body = json.dumps(_body("mock-inst", stream=True, max_tokens=65536)).encode()
        reader.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert reader.recv(1024).startswith(b"HTTP/1.1 200")  # then it reads nothing
        deadline = time.monotonic() + 20
        while _metric(gw, "deltagate_stalled_streams_total", variant="mock-inst") != 1:
            assert time.monotonic() < deadline, "a stream nobody reads was not ended"
            time.sleep(0.2)
        assert _metric(gw, "deltagate_inflight_requests", engine="mock") == 0
        assert _tag(gw, "mock-half") != "wbase"  # another variant swaps in and answers
        reader.settimeout(20)
        received = b""
        while chunk := reader.recv(65536):  # what was buffered, then the close
            received += chunk
        reader.close()
        assert b"data: " in received and not received.endswith(b"0\r\n\r\n")  # cut, not finished
        assert "read nothing for 1 s" in gw.log.read_text()


def test_requests_waiting_for_a_swap_are_counted_as_queued(mock_stack):
    """While a stream holds one variant's weights, a request for another waits, and /metrics says so."""
    import concurrent.futures

    with (
        httpx.stream(
            "POST",
            mock_stack.url + "/v1/completions",
            json=_body("mock-inst", stream=True, max_tokens=1000),
            timeout=30,
        ) as r,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream (the client "leaves")
        assert next(lines).startswith("data: ")
        other = pool.submit(_tag, mock_stack, "mock-half")
        deadline = time.monotonic() + 5
        while _metric(mock_stack, "deltagate_queued_requests", engine="mock") != 1:
            assert time.monotonic() < deadline, "the waiting request was not counted"
            time.sleep(0.05)
        assert not other.done()
        # routers that place requests by adapter residency read vLLM's lora gauge; the gateway fills it in
        engine_metrics = httpx.get(mock_stack.url + "/metrics/engines/mock").text
        (info,) = [
            s
            for f in text_string_to_metric_families(engine_metrics)
            for s in f.samples
            if s.name == "vllm:lora_requests_info"
        ]
        assert info.labels == {
            "max_lora": "1",
            "running_lora_adapters": "mock-inst",
            "waiting_lora_adapters": "mock-half",
        }
    assert other.result(timeout=10) != "wbase"  # admitted once the stream ended, after its swap
    assert _metric(mock_stack, "deltagate_queued_requests", engine="mock") == 0


def test_engine_errors_are_relayed_in_the_envelope_and_counted(mock_stack):
    r = httpx.post(mock_stack.url + "/v1/completions", json=_body("mock-inst", max_tokens=10**6), timeout=30)
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    errors = _metric(mock_stack, "deltagate_upstream_errors_total", engine="mock", kind="status")
    r = httpx.post(mock_stack.url + "/v1/completions", json=_body("mock-inst", prompt="mock:500"), timeout=30)
    assert r.status_code == 500 and r.json()["error"]["message"] == "mock engine failure"
    assert _metric(mock_stack, "deltagate_upstream_errors_total", engine="mock", kind="status") == errors + 1


def test_engine_breaking_off_a_stream_ends_it_with_an_error_event(mock_stack):
    before = _metric(mock_stack, "deltagate_upstream_errors_total", engine="mock", kind="stream")
    body = _body("mock-inst", prompt="mock:break", stream=True, max_tokens=10)
    r = httpx.post(mock_stack.url + "/v1/completions", json=body, timeout=30)
    events = _events(r.text)
    assert len(events) == 3 and "[DONE]" not in events  # two tokens, then the error
    assert "broke off the stream" in json.loads(events[-1])["error"]["message"]
    assert _metric(mock_stack, "deltagate_upstream_errors_total", engine="mock", kind="stream") == before + 1
    assert _metric(mock_stack, "deltagate_inflight_requests", engine="mock") == 0


def test_unknown_model_is_a_404_in_the_envelope(mock_stack):
    r = httpx.post(mock_stack.url + "/v1/completions", json=_body("nope"), timeout=30)
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_trace_context_reaches_the_engine(mock_stack):
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {"traceparent": trace, "tracestate": "vendor=1"}
    r = httpx.post(mock_stack.url + "/v1/completions", json=_body("mock", prompt="traced"), headers=headers)
    assert r.status_code == 200
    seen = [
        s
        for s in httpx.get(mock_stack.engine_url + "/mock/requests").json()
        if s["body"].get("prompt") == "traced"
    ]
    assert seen[-1]["headers"]["traceparent"] == trace and seen[-1]["headers"]["tracestate"] == "vendor=1"


def test_weights_tag_is_stable():
    assert weights_tag(None) == "wbase" == weights_tag('{"base": "/x", "deltas": []}')
    assert weights_tag('{"base": "/x", "deltas": [{"path": "d"}]}').startswith("w")


def test_an_engine_that_cannot_take_a_variants_template_there_gets_a_400_not_a_wrong_answer(mock_stack):
    """An engine the gateway did not start (here the mock) may lack loaders/engine_chat.py: on
    /v1/responses and /v1/messages a variant with its own chat template is refused, naming the
    route that works, instead of being rendered with the base's template."""
    for path, body in (
        ("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/responses", {"input": "hi"}),
    ):
        r = httpx.post(mock_stack.url + path, json={"model": "mock-inst", **body}, timeout=30)
        assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"], r.text


def test_an_idle_client_connection_outlives_the_clients_own_keep_alive(mock_stack):
    """The gateway keeps an idle connection longer (--keep-alive-seconds) than the openai SDK's httpx
    pool keeps it (5 s): a client, not the gateway, hangs up first (bench/keepalive.py)."""
    conn = http.client.HTTPConnection(mock_stack.url.removeprefix("http://"), timeout=10)
    try:
        conn.request("GET", "/health")
        assert conn.getresponse().read()
        sock = conn.sock
        time.sleep(httpx.Limits().keepalive_expiry + 1)  # longer than uvicorn's default keep-alive too
        conn.request("GET", "/health")  # on the same socket: http.client reopens only a closed one
        assert conn.getresponse().status == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_a_variant_registered_while_serving_is_warmed_on_its_engine(mock_stack, tied):
    """POST /v1/variants has the base's engine read the variant's inputs (--warm-on-register, the
    default); the warm endpoint asks again and reports what the engine said."""
    body = {"name": "mock-warm", "base": "mock", "deltas": [{"delta": "mock-inst", "alpha": 0.25}]}
    delta = httpx.get(mock_stack.url + "/v1/variants/mock-inst", headers=mock_stack.admin).json()["deltas"][0]
    body["deltas"][0]["delta"] = delta["delta"]
    r = httpx.post(mock_stack.url + "/v1/variants", json=body, headers=mock_stack.admin)
    assert r.status_code == 201, r.text
    try:
        warmed = [json.loads(w) for w in httpx.get(mock_stack.engine_url + "/mock/warmed").json()]
        assert any(w["deltas"] and w["deltas"][0]["alpha"] == 0.25 for w in warmed), warmed
        r = httpx.post(mock_stack.url + "/v1/variants/mock-warm/warm", headers=mock_stack.admin)
        assert r.status_code == 202 and r.json()["engines"][0]["engine"] == "mock", r.text
        assert len(httpx.get(mock_stack.engine_url + "/mock/warmed").json()) == len(warmed) + 1
    finally:
        httpx.delete(mock_stack.url + "/v1/variants/mock-warm", headers=mock_stack.admin)
