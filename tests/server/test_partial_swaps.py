"""Swaps that rewrite only what changes, staged while serving — bit-identical to stock vLLM on the
offline merge through real engines (pico, tied embeddings)."""

import asyncio
import os
import shutil
import signal
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from deltas import open_artifact
from tests.server.conftest import (
    completion_outputs,
    engine_leader,
    metric_families,
    same_batched,
    sample_value,
)

pytestmark = pytest.mark.engine


def _swaps(stack, since: float, base: str = "tied") -> list[dict]:
    """The engine's swaps started at or after `since` (time.time()): the list is bounded, so it is
    filtered by time, not sliced by its length before."""
    return [s for s in _base(stack, base)["recent_swaps"] if s["started_at"] >= since]


def _base(stack, base: str = "tied") -> dict:
    bases = httpx.get(stack.url + "/v1/bases", headers=stack.admin).json()["data"]
    return next(b for b in bases if b["name"] == base)


def test_full_then_partial_then_other_partial_then_base_is_exact_and_touches_only_what_changes(
    stack, tied_parts
):
    """The second partial covers none of the first's tensors: those must come back to the base's
    values, and the fused modules either partial touches are rewritten whole."""
    expected = {  # tensors rewritten, of 20: tied-inst covers them all
        "tied-inst": 20,
        "tied-part1": 20,
        "tied-part2": len(set(tied_parts.part1_rewrites) | set(tied_parts.part2_rewrites)),
        "tied": len(tied_parts.part2_rewrites),
    }
    for model, tensors in expected.items():
        since = time.time()
        want = stack.base_before["tied"] if model == "tied" else stack.refs[model]
        assert completion_outputs(stack.url, model) == want, model
        swaps = _swaps(stack, since)
        if swaps:  # a variant resident already needs no swap (the first one may be)
            assert [s["tensors"] for s in swaps] == [tensors], (model, swaps)
            assert swaps[-1]["of_tensors"] == 20 and swaps[-1]["bytes"] > 0
            # every module committed from its prepared kernel form, none reloaded by vLLM
            assert swaps[-1]["prepared_modules"] > 0 and swaps[-1]["fallback_modules"] == 0, swaps
    memory = _base(stack)["swap_memory"]
    assert memory["residency"] == "host" and memory["base_bytes"] > 0 and memory["delta_cache_bytes"] > 0


QUANTUM = 2.0  # the stack's --swap-quantum (the default)


async def _queued(stack, n: int, timeout: float = 60) -> None:
    """Wait until `n` requests wait for a swap on tied's engine."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (
        sample_value(
            await asyncio.to_thread(metric_families, stack.url), "deltagate_queued_requests", engine="tied"
        )
        < n
    ):
        assert asyncio.get_running_loop().time() < deadline, f"fewer than {n} requests queued"
        await asyncio.sleep(0.05)


async def test_a_swap_staged_while_serving_then_abandoned_for_another_pick_is_exact(stack):
    """A stream holds the base resident (its engine frozen mid-stream, so it lasts); a request for
    tied-part1 arrives (staged), then two for tied-part2 (the policy's pick now: part1's stage is
    abandoned, part2's staged). When the stream ends the swap to part2 uses its stage; every answer
    is exact.

    The base's quantum (2 s) must still run when the three requests arrive: were it over, part1
    would be picked as it arrives. So another variant is made resident first, and the stream's own
    request swaps the base in: the window starts then, not before a whole reference run. On a busy
    machine the requests can still arrive after it (seen in a fresh-clone run): then the scenario is
    run again."""
    group = os.getpgid(engine_leader(stack, "tied").pid)
    for _ in range(3):
        swaps, part2_sent = await _stage_then_abandon(stack, group)
        late = part2_sent - swaps[0]["started_monotonic"] - swaps[0]["seconds"] > QUANTUM
        if not (late and [s["variant"] for s in swaps[:2]] == ["tied", "tied-part1"]):
            break
    assert [s["variant"] for s in swaps[:3]] == ["tied", "tied-part2", "tied-part1"], swaps
    assert swaps[1]["staged"] and swaps[1]["staging_seconds"] > 0, swaps[1]
    assert swaps[1]["prepared_bytes"] > 0 and swaps[1]["fallback_modules"] == 0, swaps[
        1
    ]  # prepared while serving
    engine_log = (stack.state_dir / "logs" / "engine-tied.log").read_text()
    assert "abandoned the staged swap" in engine_log
    families = metric_families(stack.url)
    assert sample_value(families, "deltagate_swap_staging_seconds_count", engine="tied") >= 1
    assert sample_value(families, "deltagate_swap_bytes_total", engine="tied") > 0
    assert sample_value(families, "deltagate_swap_modules_total", engine="tied", how="prepared") > 0


async def _stage_then_abandon(stack, group: int) -> tuple[list[dict], float]:
    """The scenario above, once: the swaps since, and when the tied-part2 requests were sent."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client, AsyncExitStack() as held:
        for _ in range(3):  # until the engine is frozen while the stream still runs (the premise)
            assert completion_outputs(stack.url, "tied") == stack.base_before["tied"]
            assert completion_outputs(stack.url, "tied-part1") == stack.refs["tied-part1"]
            since = time.time()
            body = {"model": "tied", "prompt": "x", "max_tokens": 400, "ignore_eos": True, "stream": True}
            stream = await held.enter_async_context(client.stream("POST", "/v1/completions", json=body))
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: "):
                    break  # the stream is running on the base
            os.killpg(group, signal.SIGSTOP)
            await asyncio.sleep(0.5)  # what the engine sent before it stopped reaches the client meanwhile
            families = await asyncio.to_thread(metric_families, stack.url)
            if sample_value(families, "deltagate_inflight_requests", engine="tied") == 1:
                break
            # On a busy machine this test can lag the engine: the whole stream was sent before the
            # engine stopped, and a request arriving now would start a swap on a frozen engine.
            os.killpg(group, signal.SIGCONT)
            async for _ in lines:
                pass
        else:
            pytest.fail("the stream always ended before its engine was frozen")
        try:
            part1 = asyncio.create_task(asyncio.to_thread(completion_outputs, stack.url, "tied-part1"))
            await _queued(stack, 1)  # waits on the gateway, not on a clock: the machine may be busy
            part2_sent = time.monotonic()  # the gateway's swap records use the same clock
            part2 = [
                asyncio.create_task(asyncio.to_thread(completion_outputs, stack.url, "tied-part2"))
                for _ in range(2)
            ]
            await _queued(stack, 3)
        finally:
            os.killpg(group, signal.SIGCONT)
        async for _ in lines:
            pass
    assert (await part1) == stack.refs["tied-part1"]
    for answer in part2:  # the two may share a batch: conftest.same_batched
        assert all(map(same_batched, await answer, stack.refs["tied-part2"]))
    assert completion_outputs(stack.url, "tied-part2") == stack.refs["tied-part2"]  # one at a time: exact
    return _swaps(stack, since), part2_sent


def test_a_registered_variant_is_read_into_memory_before_its_first_swap(stack, tied, tmp_path):
    """Registering a variant has its engine decode its delta in the background (POST
    /v1/variants/{name}/warm does it again and reports the memory): its first swap decodes nothing."""
    delta = tmp_path / "warm.safetensors"
    shutil.copy(tied.delta2, delta)  # a file the engine has never read
    tensors = len(open_artifact(delta).tensor_names)
    admin = stack.admin
    r = httpx.post(stack.url + "/v1/deltas", headers=admin, json={"name": "warm-d", "path": str(delta)})
    assert r.status_code == 201, r.text
    misses = _base(stack)["swap_memory"][
        "delta_cache_misses"
    ]  # as of the last swap; only swaps and warms read
    variant = {"name": "tied-warm", "base": "tied", "deltas": [{"delta": "warm-d"}]}
    assert httpx.post(stack.url + "/v1/variants", headers=admin, json=variant).status_code == 201
    deadline = time.monotonic() + 60
    while True:  # the warm-up runs in the engine's background
        r = httpx.post(stack.url + "/v1/variants/tied-warm/warm", headers=admin)
        assert r.status_code == 202, r.text
        (engine,) = r.json()["engines"]
        assert engine["warming"] and engine["engine"] == "tied"
        if engine["memory"]["delta_cache_misses"] >= misses + tensors:
            break
        assert time.monotonic() < deadline, engine
        time.sleep(0.2)
    assert engine["memory"]["delta_cache_misses"] == misses + tensors  # each decoded once
    since = time.time()
    assert completion_outputs(stack.url, "tied-warm") != stack.base_before["tied"]
    (swap,) = _swaps(stack, since)
    assert swap["variant"] == "tied-warm"
    assert _base(stack)["swap_memory"]["delta_cache_misses"] == misses + tensors  # the swap decoded nothing
    pinned = httpx.post(stack.url + "/v1/variants/tied-warm/warm?pin=true", headers=admin)
    (engine,) = pinned.json()["engines"]
    assert engine["memory"]["pinned"] == ["warm.safetensors"] and engine["memory"]["pinned_bytes"] > 0
    unpinned = httpx.post(stack.url + "/v1/variants/tied-warm/warm?pin=false", headers=admin)
    assert unpinned.json()["engines"][0]["memory"]["pinned"] == []
    assert httpx.post(stack.url + "/v1/variants/nope/warm", headers=admin).status_code == 404
    assert httpx.delete(stack.url + "/v1/variants/tied-warm", headers=admin).status_code == 204
    assert httpx.delete(stack.url + "/v1/deltas/warm-d", headers=admin).status_code == 204
