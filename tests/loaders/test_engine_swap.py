"""The one-call swap route an engine's API server runs (loaders/engine_swap.py), against a stand-in
for vLLM's engine client: the order of its steps, and that the engine always resumes."""

import asyncio
import json

import httpx

from loaders.engine_swap import PATH, SwapMiddleware


class Core:
    def __init__(self, calls: list):
        self.calls = calls

    async def pause_scheduler_async(self, mode: str, clear_cache: bool) -> None:
        self.calls.append(("pause", mode, clear_cache))

    async def resume_scheduler_async(self) -> None:
        self.calls.append(("resume",))


class Engine:
    """What the route uses of vLLM's AsyncLLM: engine_core and collective_rpc."""

    def __init__(self, fail: bool = False):
        self.calls: list = []
        self.engine_core = Core(self.calls)
        self.fail = fail

    async def collective_rpc(self, method: str, args: tuple = ()):
        self.calls.append((method, *args))
        if method == "deltagate_apply" and self.fail:
            raise RuntimeError("the reload failed")
        return (
            [{"release_seconds": 0.001}]
            if method == "deltagate_release"
            else [{"tensors": 3, "seconds": 0.01}]
        )


def _app(engine: Engine):
    async def vllm(scope, receive, send):  # every other path: vLLM's app
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = SwapMiddleware(vllm)

    async def app(scope, receive, send):
        scope["app"] = type("App", (), {"state": type("State", (), {"engine_client": engine})()})()
        await middleware(scope, receive, send)

    return app


def _post(engine: Engine, body) -> httpx.Response:
    async def call():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_app(engine)), base_url="http://e"
        ) as c:
            return await c.post(PATH, content=body if isinstance(body, bytes) else json.dumps(body))

    return asyncio.run(call())


def test_a_swap_pauses_applies_resumes_and_frees_the_old_weights_after_answering():
    engine = Engine()
    resp = _post(engine, {"recipe": '{"base": "b"}', "keep_prefix_cache": True})
    assert resp.status_code == 200
    assert resp.json()["results"] == [{"tensors": 3, "seconds": 0.01}]
    assert set(resp.json()["engine_seconds"]) == {"pause", "apply", "resume"}
    assert engine.calls == [
        ("pause", "wait", False),  # drained; the prefix cache kept (requests are salted by weights)
        ("deltagate_apply", '{"base": "b"}'),
        ("resume",),
        ("deltagate_release",),
    ]
    engine = Engine()
    _post(engine, {"recipe": "{}"})
    assert engine.calls[0] == ("pause", "wait", True)  # not kept: cleared once drained


def test_a_failed_apply_still_resumes_and_frees_nothing():
    engine = Engine(fail=True)
    resp = _post(engine, {"recipe": "{}"})
    assert resp.status_code == 500 and "the reload failed" in resp.json()["error"]
    assert [c[0] for c in engine.calls] == ["pause", "deltagate_apply", "resume"]


def test_a_malformed_swap_is_refused_before_pausing_and_other_paths_pass_through():
    engine = Engine()
    resp = _post(engine, b"not json")
    assert resp.status_code == 400 and "recipe" in resp.json()["error"] and engine.calls == []

    async def other():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=_app(engine)), base_url="http://e"
        ) as c:
            return await c.post("/v1/completions", content=b"{}")

    assert asyncio.run(other()).status_code == 204 and engine.calls == []
