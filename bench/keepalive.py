"""The idle-connection race between the gateway's engine clients and the engine's HTTP server.

vLLM's API server (uvicorn) closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s). A
client that keeps idle connections as long or longer can send a request just as the server hangs
up; the request fails with "Server disconnected" and the gateway reports the engine unreachable.
loaders/engine.py therefore closes idle engine connections after ENGINE_KEEPALIVE_S.

This runs a real uvicorn server with a 1 s keep-alive (uvicorn takes whole seconds) and scales each
client setting by the same factor (1 s / 5 s): the previous settings (httpx's default 5 s, the
relay's aiohttp 60 s) against ENGINE_KEEPALIVE_S. Every request follows an idle gap drawn near the
server's keep-alive, where the race lives; the four settings run side by side, each with several
clients (one connection each), repeated.

    .venv/bin/python bench/keepalive.py [--requests 60] [--clients 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import random

import aiohttp
import httpx
import uvicorn
import vllm.envs
from fastapi import FastAPI

from loaders.engine import ENGINE_KEEPALIVE_S, free_port

VLLM_KEEPALIVE_S = vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE  # 5 s unless set
HTTPX_KEEPALIVE_S = httpx.Limits().keepalive_expiry  # the engine control client's before
SERVER_KEEPALIVE_S = 1
SCALE = SERVER_KEEPALIVE_S / VLLM_KEEPALIVE_S
SETTINGS = {  # name -> (client library, client keep-alive at vLLM's scale)
    f"httpx, before ({HTTPX_KEEPALIVE_S:g} s)": ("httpx", HTTPX_KEEPALIVE_S),
    "httpx, now": ("httpx", ENGINE_KEEPALIVE_S),
    "aiohttp, before (60 s)": ("aiohttp", 60.0),
    "aiohttp, now": ("aiohttp", ENGINE_KEEPALIVE_S),
}

app = FastAPI()


@app.post("/x")
async def answer() -> dict:
    return {}


async def client_run(lib: str, keepalive: float, url: str, requests: int) -> int:
    """Send `requests` POSTs, each after an idle gap near the server's keep-alive; count failures."""
    failures = 0
    if lib == "httpx":
        client = httpx.AsyncClient(base_url=url, limits=httpx.Limits(keepalive_expiry=keepalive))
        post, errors, close = (lambda: client.post("/x")), httpx.HTTPError, client.aclose
    else:
        session = aiohttp.ClientSession(
            url, connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=keepalive)
        )

        async def post() -> None:
            async with session.post("/x", json={}) as resp:
                await resp.read()

        errors, close = aiohttp.ClientError, session.close
    for _ in range(requests):
        try:
            await post()
        except errors:
            failures += 1
        await asyncio.sleep(SERVER_KEEPALIVE_S * random.uniform(0.9, 1.1))
    await close()
    return failures


async def main(requests: int, clients: int, repeats: int) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, port=port, timeout_keep_alive=SERVER_KEEPALIVE_S, log_level="error")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    failed = dict.fromkeys(SETTINGS, 0)
    for repeat in range(repeats):
        runs = [
            client_run(lib, ka * SCALE, url, requests)
            for lib, ka in SETTINGS.values()
            for _ in range(clients)
        ]
        done = await asyncio.gather(*runs)
        counts = [sum(done[i * clients : (i + 1) * clients]) for i in range(len(SETTINGS))]
        for name, n in zip(SETTINGS, counts, strict=True):
            failed[name] += n
        print(
            f"repeat {repeat + 1}: "
            + ", ".join(f"{name}: {n}" for name, n in zip(SETTINGS, counts, strict=True))
        )
    server.should_exit = True
    await serving
    total = requests * clients * repeats
    print(
        f"\nserver keep-alive {SERVER_KEEPALIVE_S} s (vLLM's {VLLM_KEEPALIVE_S} s scaled by {SCALE:g}); "
        f"{total} requests per setting after idle gaps of 0.9-1.1x the server's keep-alive"
    )
    print(f"{'setting':<24} {'client keep-alive':>18} {'failed':>8}")
    for name, (_, ka) in SETTINGS.items():
        print(f"{name:<24} {ka * SCALE:>16.2f} s {failed[name]:>5}/{total}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8, help="clients per setting")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.clients, args.repeats))
