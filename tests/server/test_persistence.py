"""The registry survives a gateway restart; a gateway can attach to running engines."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from loaders.engine import free_port
from tests.server.conftest import (
    PROMPTS,
    completion_outputs,
    completion_params,
    engine_leader,
    metric_families,
    sample_value,
    start_gateway,
    stop_gateway,
    wait_healthy,
)

pytestmark = pytest.mark.engine


def test_second_gateway_attaches_and_sees_the_registry(stack, tied, untied):
    bases = httpx.get(stack.url + "/v1/bases", headers=stack.admin).json()["data"]
    urls = {b["name"]: b["engine_url"] for b in bases}
    # make tied-inst resident so the attached gateway serves without swapping
    assert completion_outputs(stack.url, "tied-inst") == stack.refs["tied-inst"]
    port = free_port()
    log = stack.state_dir.parent / "gateway2.log"
    proc = start_gateway(
        [
            "--base",
            f"tied={tied.base}",
            "--base",
            f"untied={untied.base}",
            "--engine-url",
            f"tied={urls['tied']}",
            "--engine-url",
            f"untied={urls['untied']}",
        ],
        stack.state_dir,
        port,
        log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log, timeout=120)
        models = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"tied-inst", "tied-half", "tied-mix", "untied-inst"} <= models
        deltas = {d["name"] for d in httpx.get(url + "/v1/deltas", headers=stack.admin).json()["data"]}
        assert "untied-d" in deltas
        # it learned from the engine which weights are resident: no swap needed
        assert completion_outputs(url, "tied-inst") == stack.refs["tied-inst"]
        assert "deltagate_swaps_total{" not in httpx.get(url + "/metrics").text
    finally:
        stop_gateway(proc)


def test_an_engine_killed_mid_swap_comes_back_with_the_weights_the_gateway_believes(stack):
    """Freeze the engine, ask for a variant it does not hold (the swap's request to the engine
    hangs), then kill it: the request waits for the restart and is answered by the right weights
    (or gets 503 + Retry-After after --engine-wait); afterwards every variant is exact again."""
    assert completion_outputs(stack.url, "untied") == stack.base_before["untied"]  # resident: the base
    restarts = sample_value(metric_families(stack.url), "deltagate_engine_restarts_total", engine="untied")
    group = os.getpgid(engine_leader(stack, "untied").pid)
    ((status, retry_after, text),) = _ask_frozen_then_kill(stack, group, "untied-inst")  # the swap's
    assert status == 200 or (status == 503 and retry_after), text
    if status == 200:
        choice = json.loads(text)["choices"][0]
        answer = {"text": choice["text"], **choice["logprobs"]}
        answer.pop("text_offset", None)
        assert answer == stack.refs["untied-inst"][0]  # as completion_outputs records it
    _wait_for_restart(stack, "untied", restarts=restarts + 1)
    assert completion_outputs(stack.url, "untied-inst") == stack.refs["untied-inst"]
    assert completion_outputs(stack.url, "untied") == stack.base_before["untied"]


def test_an_engine_killed_while_staging_comes_back_exact(stack):
    """A stream holds the base resident; the engine is frozen; a request for the variant arrives, so
    the gateway asks the engine to stage it (the request hangs with the frozen engine); then the engine
    is killed. The stream ends with an error event, not a hang; requests arriving while the engine is
    down wait for its restart (up to --engine-wait, then 503 with Retry-After), no burst of instant
    502s; nothing staged survives or is believed: after the restart every answer is exact."""
    assert completion_outputs(stack.url, "untied") == stack.base_before["untied"]  # resident: the base
    restarts = sample_value(metric_families(stack.url), "deltagate_engine_restarts_total", engine="untied")
    group = os.getpgid(engine_leader(stack, "untied").pid)
    with _a_stream_held_by_the_frozen_engine(stack, group) as lines:
        asked = _ask_frozen_then_kill(stack, group, "untied-inst", ["untied-inst", "untied"] * 2, held=1)
        rest = list(lines)  # a hang would be a read timeout here
    # cut mid-way: an error event; a pico engine may also finish the 400 tokens before the kill lands
    cut = any('"type": "engine_error"' in line and "broke off" in line for line in rest)
    assert cut or "data: [DONE]" in rest, rest[-3:]
    for status, retry_after, text in asked:  # the stage request, then those sent while it was down
        assert status == 200 or (status == 503 and retry_after), text
        assert "previous weights" not in text
    _wait_for_restart(stack, "untied", restarts=restarts + 1)
    assert completion_outputs(stack.url, "untied-inst") == stack.refs["untied-inst"]
    assert completion_outputs(stack.url, "untied") == stack.base_before["untied"]
    gateway_log = (stack.state_dir.parent / "gateway.log").read_text()
    assert "could not stage untied-inst" in gateway_log


@contextmanager
def _a_stream_held_by_the_frozen_engine(stack, group: int):
    """A long stream on `untied` whose engine is frozen after its first token, so the base stays
    resident (in flight) until the engine dies; its remaining lines. A pico engine can finish the
    400 tokens before the freeze lands; then the stream is read out and another one tried."""
    body = {"model": "untied", "prompt": "x", "max_tokens": 400, "stream": True, "ignore_eos": True}
    for _ in range(5):
        with httpx.stream("POST", f"{stack.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert '"text"' in next(line for line in lines if line.startswith("data: "))
            os.killpg(group, signal.SIGSTOP)
            time.sleep(0.5)  # what the engine had sent before it froze reaches the gateway
            if _inflight(stack) >= 1:
                yield lines
                return
            os.killpg(group, signal.SIGCONT)
            list(lines)
    raise AssertionError("the engine finished every stream before it could be frozen")


def _inflight(stack) -> float:
    return sample_value(metric_families(stack.url), "deltagate_inflight_requests", engine="untied")


def _ask_frozen_then_kill(stack, group: int, model: str, then: list[str] = (), held: int = 0) -> list:
    """Freeze the engine's process group, ask for `model` (which needs the engine: a swap or a stage
    request then hangs with it), kill the group, ask for each of `then` while it is down; the answers
    (status, Retry-After, body), once the engine is back. `held`: requests in flight on the frozen
    engine when `model` waits (with one, the gateway stages `model` rather than swapping)."""
    os.killpg(group, signal.SIGSTOP)
    with ThreadPoolExecutor(1 + len(then)) as pool:
        asked = pool.submit(_ask_while_down, model, stack.url)
        deadline = time.monotonic() + 30
        while sample_value(metric_families(stack.url), "deltagate_queued_requests", engine="untied") < 1:
            assert time.monotonic() < deadline, "the request never waited for its swap"
            time.sleep(0.05)
        assert _inflight(stack) == held, "what held the engine when the request arrived was not in flight"
        time.sleep(1.0)  # what the engine was asked is now with the frozen engine
        os.killpg(group, signal.SIGKILL)
        down = [pool.submit(_ask_while_down, other, stack.url) for other in then]
        return [asked.result(), *(f.result() for f in down)]


def _wait_for_restart(stack, base: str, restarts: float) -> None:
    """Until the gateway has restarted `base`'s engine `restarts` times in all and it is healthy."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(2)
        done = sample_value(metric_families(stack.url), "deltagate_engine_restarts_total", engine=base)
        if done >= restarts and httpx.get(stack.url + "/health").json()["engines"][base]:
            return
    raise AssertionError(f"the engine for {base} was not restarted")


def _ask_while_down(model: str, url: str) -> tuple[int, str | None, str]:
    r = httpx.post(f"{url}/v1/completions", json=completion_params(model, PROMPTS[0]), timeout=300)
    return r.status_code, r.headers.get("retry-after"), r.text
