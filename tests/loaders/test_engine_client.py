"""The gateway's engine clients against the engine's HTTP server (bench/keepalive.py measures the race)."""

import asyncio

import pytest
import vllm.envs

from loaders.engine import ENGINE_KEEPALIVE_S, EngineClient, EngineError


def test_idle_engine_connections_close_on_the_gateway_side_first():
    """Both pools (control routes, the relay) drop an idle connection before vLLM's server does."""
    assert ENGINE_KEEPALIVE_S < vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE

    async def pools() -> tuple[float, float]:
        client = EngineClient("http://127.0.0.1:9", "m")
        try:
            # httpx and aiohttp keep these settings private; read them to pin both pools
            return client.http._transport._pool._keepalive_expiry, client.relay._connector._keepalive_timeout
        finally:
            await client.close()

    assert asyncio.run(pools()) == (ENGINE_KEEPALIVE_S, ENGINE_KEEPALIVE_S)


def test_a_closed_client_refuses_the_relay_with_an_engine_error():
    """A client closed with its retired slot: a request that still reaches it gets EngineError (the
    gateway's 502 naming the engine), not aiohttp's RuntimeError (a 500)."""

    async def after_close() -> None:
        client = EngineClient("http://127.0.0.1:9", "tied")
        client.relay  # noqa: B018 (opens the session)
        await client.close()
        client.relay  # noqa: B018

    with pytest.raises(EngineError, match="'tied' left the pool"):
        asyncio.run(after_close())
