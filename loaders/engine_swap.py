"""A swap in one call to the engine: pause, rewrite the weights, resume, then free the old ones.

Runs inside a deltagate engine's API server (vLLM's `--middleware`, beside loaders/engine_chat.py).
Through vLLM's own routes a swap is three HTTP calls (/pause, /collective_rpc, /resume), and vLLM's
/pause sleeps 20 ms after the scheduler has paused so that in-flight outputs reach their streams
first (its comment: "not required for correctness"). Measured on SmolLM2 fp32 (`bench/swap.py`,
mode `routes` against `staged`), a full prepared swap paused the engine 0.045 s through the three
calls and 0.016 s through this one, the worker's commit being 0.009 s in both. Here the same steps
run in the API server's process with no sleep and no round trips between them: the scheduler is
paused the way /pause pauses it ("wait": drained, new requests queued; the prefix cache cleared
unless the gateway keeps it, its requests being salted by their weights), the workers'
deltagate_apply runs, the scheduler resumes. Only then, after the answer has been sent, the workers
free what the swap replaced (deltagate_release: the old kernel handles and the shadows, hundreds of
MB whose freeing would otherwise lengthen the pause); requests queued behind that call wait for it
between two engine steps, and the engine's log says how long it took.
"""

from __future__ import annotations

import json
import logging
import time

from loaders.engine_chat import read_body, send_json

log = logging.getLogger("vllm.deltagate.swap")  # in the engine's log, as vLLM's own lines
PATH = "/deltagate/apply"  # POST {"recipe": Recipe JSON, "keep_prefix_cache": bool}


class SwapMiddleware:
    """ASGI middleware: answer POST /deltagate/apply; everything else goes to vLLM."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = json.loads(await read_body(receive))
            recipe, keep = body["recipe"], bool(body.get("keep_prefix_cache", False))
        except (ValueError, KeyError, TypeError) as exc:
            return await send_json(send, 400, {"error": f"a swap takes {{recipe, keep_prefix_cache}}: {exc}"})
        engine = scope["app"].state.engine_client
        try:
            results, timings = await apply(engine, recipe, keep)
        except Exception as exc:  # the gateway restores the previous weights (server/swap.py)
            return await send_json(send, 500, {"error": f"{type(exc).__name__}: {exc}"})
        await send_json(send, 200, {"results": results, "engine_seconds": timings})
        try:  # the client has its answer and the engine runs; this call waits between two steps
            released = await engine.collective_rpc("deltagate_release")
            log.info("freed what the swap replaced in %.3fs", released[0]["release_seconds"])
        except Exception:  # the next stage or commit frees it instead
            log.exception("could not free what the swap replaced")


async def apply(engine, recipe: str, keep_prefix_cache: bool) -> tuple[list, dict]:
    """Pause (drained; the prefix cache cleared unless kept), apply `recipe` on every worker, resume —
    always resuming; (the workers' results, seconds per step)."""
    core = engine.engine_core  # AsyncLLM's client of the engine core process
    start = time.perf_counter()
    await core.pause_scheduler_async(mode="wait", clear_cache=not keep_prefix_cache)
    paused = time.perf_counter()
    try:  # paused with clear_cache the prefix cache is empty, and nothing runs before the resume
        results = await engine.collective_rpc("deltagate_apply", args=(recipe,))
        applied = time.perf_counter()
    finally:
        await core.resume_scheduler_async()
    end = time.perf_counter()
    return results, {"pause": paused - start, "apply": applied - paused, "resume": end - applied}
