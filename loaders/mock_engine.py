"""A stand-in for a vLLM OpenAI server that does no model work: for relay benchmarks and fast tests.

It speaks what the gateway uses of a real engine — `/v1/completions` and `/v1/chat/completions`
(streaming or not, vLLM's compact JSON, usage when asked), `/health`, `/metrics` (a few `vllm:`
series), and the dev-mode swap routes (`/pause`, `/resume`, `/reset_prefix_cache`, `/collective_rpc`
with `deltagate_apply` / `deltagate_recipe` / `deltagate_stage` / `deltagate_warm` /
`deltagate_release`; not the one-call swap route of loaders/engine_swap.py, so the gateway's
fallback to vLLM's three routes runs against it). Every generated token
is a word derived from the resident weights' recipe (` w1a2b3c`), so a test can tell which weights answered.
Tokens stream at `--tokens-per-second` per request (0: as fast as possible). Two prompts fail
on purpose, for tests of the relay's error paths: `mock:500` (an engine error) and `mock:break`
(the connection drops after two streamed chunks).

    python -m loaders.mock_engine --port 8100 --served-name pico --tokens-per-second 100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
import uuid
from collections import deque

from aiohttp import web

MAX_TOKENS_LIMIT = 65536  # lets a test fill a client's socket buffers (MBs) with one stream


def weights_tag(recipe_json: str | None) -> str:
    """The word the mock generates for a resident recipe: `wbase` for a plain base (or as started)."""
    recipe = json.loads(recipe_json) if recipe_json else {}
    if not recipe.get("deltas"):
        return "wbase"
    return "w" + hashlib.sha256(recipe_json.encode()).hexdigest()[:6]


class MockEngine:
    """State of one mock engine: served name, resident recipe, pacing, recent request headers."""

    def __init__(self, served_name: str, tokens_per_second: float, swap_seconds: float = 0.0):
        self.served_name = served_name
        self.delay = 1.0 / tokens_per_second if tokens_per_second > 0 else 0.0
        self.swap_seconds = swap_seconds
        self.recipe: str | None = None
        self.staged: str | None = None  # the recipe deltagate_stage was last asked for
        self.warmed: list[str] = []  # the recipes deltagate_warm was asked for
        self.paused = False
        self.requests_seen: deque[dict] = deque(maxlen=64)
        self.generation_tokens = 0
        self.running = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.get("/metrics", self.metrics),
                web.post("/v1/completions", self.completions),
                web.post("/v1/chat/completions", self.chat),
                web.post("/pause", self.pause),
                web.post("/resume", self.resume),
                web.post("/reset_prefix_cache", self.ok),
                web.post("/collective_rpc", self.collective_rpc),
                web.get("/mock/requests", self.seen),
                web.get("/mock/warmed", self.warmed_recipes),
            ]
        )
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def ok(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served_name, "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        name = self.served_name
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="{name}"}} {self.running}\n'
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{name}"}} 0.0\n'
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0",model_name="{name}"}} {self.generation_tokens}\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def pause(self, request: web.Request) -> web.Response:
        self.paused = True
        return web.json_response({})

    async def resume(self, request: web.Request) -> web.Response:
        self.paused = False
        return web.json_response({})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        body = await request.json()
        if body["method"] == "deltagate_recipe":
            return web.json_response({"results": [self.recipe]})
        if body["method"] == "deltagate_stage":  # staging takes no time here; a swap still takes its time
            self.staged = body["args"][0] if body["args"][0] != self.recipe else None
            staging = self.staged is not None
            return web.json_response({"results": [{"staging": staging, "ready": staging}]})
        if body["method"] == "deltagate_warm":  # nothing to read here
            self.warmed.append(body["args"][0])
            return web.json_response({"results": [{"warming": False, "memory": {"residency": "none"}}]})
        if body["method"] == "deltagate_release":  # nothing held here
            return web.json_response({"results": [{"release_seconds": 0.0}]})
        if body["method"] == "deltagate_apply":
            start = time.perf_counter()
            await asyncio.sleep(self.swap_seconds)
            staged, self.staged = self.staged == body["args"][0], None
            self.recipe = body["args"][0]
            seconds = time.perf_counter() - start
            result = {"tensors": 0, "seconds": seconds, "repaired": [], "staged": staged}
            return web.json_response({"results": [result]})
        return web.json_response({"error": {"message": f"unknown method {body['method']}"}}, status=400)

    async def warmed_recipes(self, request: web.Request) -> web.Response:
        return web.json_response(self.warmed)

    async def seen(self, request: web.Request) -> web.Response:
        return web.json_response(list(self.requests_seen))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.requests_seen.append({"headers": dict(request.headers), "body": body})
        if body.get("model") != self.served_name:
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        n = body.get("max_tokens") or body.get("max_completion_tokens") or 16
        if not isinstance(n, int) or not 0 < n <= MAX_TOKENS_LIMIT:
            return _error(
                400, f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {n}", "BadRequestError"
            )
        stop = body.get("stop")
        if isinstance(stop, list) and len(stop) > 4:  # vLLM (like OpenAI) takes at most 4 stop strings
            return _error(400, f"stop: List should have at most 4 items, not {len(stop)}", "BadRequestError")
        if self.paused:
            return _error(503, "engine is paused", "ServiceUnavailableError")
        prompt = body.get("messages") if chat else body.get("prompt")
        if prompt == "mock:500":
            return _error(500, "mock engine failure", "InternalServerError")
        usage = {
            "prompt_tokens": _count_prompt(prompt),
            "completion_tokens": n,
            "total_tokens": _count_prompt(prompt) + n,
        }
        word = " " + weights_tag(self.recipe)
        self.running += 1
        try:
            if body.get("stream"):
                return await self._stream(request, body, chat, n, word, usage)
            await asyncio.sleep(self.delay * n)
            self.generation_tokens += n
            return web.json_response(_full_response(self.served_name, chat, word * n, usage), dumps=_compact)
        finally:
            self.running -= 1

    async def _stream(self, request, body, chat, n, word, usage) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = f'data: {{"id":"{rid}","object":"{kind}","created":{created},"model":"{self.served_name}",'
        piece = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
        chunk = (
            head
            + '"choices":['
            + json.dumps({**piece, "logprobs": None, "finish_reason": None}, separators=(",", ":"))
            + "]}\n\n"
        ).encode()
        last = (
            head
            + '"choices":['
            + json.dumps({**piece, "logprobs": None, "finish_reason": "length"}, separators=(",", ":"))
            + "]}\n\n"
        ).encode()
        for i in range(n):
            if i == 2 and body.get("prompt") == "mock:break":
                request.transport.close()  # an engine crash mid-stream, as the client sees it
                return resp
            if self.delay:
                await asyncio.sleep(self.delay)
            await resp.write(last if i == n - 1 else chunk)
            self.generation_tokens += 1
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(
                (head + '"choices":[],"usage":' + json.dumps(usage, separators=(",", ":")) + "}\n\n").encode()
            )
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def _compact(obj) -> str:
    """JSON as vLLM writes it (pydantic's model_dump_json: no spaces)."""
    return json.dumps(obj, separators=(",", ":"))


def _count_prompt(prompt) -> int:
    if isinstance(prompt, list):
        return sum(_count_prompt(p.get("content", "")) if isinstance(p, dict) else 1 for p in prompt)
    return len(str(prompt or "").split())


def _full_response(model: str, chat: bool, text: str, usage: dict) -> dict:
    choice = {"index": 0, "logprobs": None, "finish_reason": "length"}
    choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    kind = "chat.completion" if chat else "text_completion"
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status
    )


def mock_engine_command(
    port: int, served_name: str, tokens_per_second: float = 100.0, swap_seconds: float = 0.0
) -> list[str]:
    """The command line of a mock engine on loopback `port` (how the tests and benchmarks start one)."""
    return [
        sys.executable,
        "-m",
        "loaders.mock_engine",
        "--port",
        str(port),
        "--served-name",
        served_name,
        "--tokens-per-second",
        str(tokens_per_second),
        "--swap-seconds",
        str(swap_seconds),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", required=True)
    parser.add_argument("--tokens-per-second", type=float, default=100.0, help="per request; 0: no delay")
    parser.add_argument("--swap-seconds", type=float, default=0.0, help="time deltagate_apply takes")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    engine = MockEngine(args.served_name, args.tokens_per_second, args.swap_seconds)
    web.run_app(engine.app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
