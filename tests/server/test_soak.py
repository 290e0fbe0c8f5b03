"""A 30-second soak on the shared real stack (bench/soak.py for the 10-minute SmolLM2 one).

16 streams over the stack's variants and bases, traffic moving every 6 s, a delta uploaded and
deleted and a runtime base added and deleted mid-run; every answer checked against stock vLLM's.
"""

import asyncio

import httpx
import psutil
import pytest

from bench.soak import add_and_delete_base, soak, upload_and_delete
from tests.server.conftest import PROMPTS, completion_params

pytestmark = pytest.mark.engine


def _engines(gateway_pid: int) -> int:
    """The vLLM engines the gateway runs (its children: another test process may run engines too)."""
    children = psutil.Process(gateway_pid).children()
    return sum("vllm.entrypoints" in " ".join(p.cmdline()) for p in children if p.is_running())


def test_thirty_second_soak(stack, tied, tied_updated):
    refs = {m: stack.refs[m] for m in ("tied-inst", "tied-half", "tied-mix", "untied-inst")}
    refs["tied"], refs["untied"] = stack.base_before["tied"], stack.base_before["untied"]
    admin = stack.admin
    actions = [
        *upload_and_delete(admin, "soak-d", tied.delta, "tied", stack.refs["tied-inst"]),
        *add_and_delete_base(admin, "soak-base", tied_updated, stack.refs["tied-v2"]),
    ]
    engines = _engines(stack.proc.pid)
    run = soak(
        stack.url,
        admin,
        refs,
        PROMPTS,
        completion_params,
        duration=30,
        streams=16,
        change_every=6,
        gateway_pid=stack.proc.pid,
        actions=actions,
        log=lambda _: None,
    )
    result = asyncio.run(run)
    print(result.line())
    assert result.failed == 0, result.errors
    assert result.differ - result.near_ties == 0, result.line()
    assert len(result.events) == 4 and result.per_model.get("soak-d-v") and result.per_model.get("soak-base")
    assert result.swaps > 0 and result.requests > 50
    assert result.rss_growth < 0.25, result.line()  # bench/soak.py's 10-minute run is the real leak check
    # connections to each engine are pooled: a pool grows to the streams sent to that engine at once,
    # and traffic reaches the second engine only in some phases
    assert result.fds_end <= result.fds_after_warmup + 2 * 16, result.line()
    assert _engines(stack.proc.pid) == engines  # the runtime base was hot-loaded: no engine started or left
    models = {m["id"] for m in httpx.get(stack.url + "/v1/models").json()["data"]}
    assert not {"soak-d-v", "soak-base"} & models
