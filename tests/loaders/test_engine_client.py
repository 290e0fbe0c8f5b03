"""The gateway's engine clients against the engine's HTTP server (bench/keepalive.py measures the race)."""

import asyncio
import json

import pytest
import vllm.envs

from loaders.engine import ENGINE_KEEPALIVE_S, EngineClient, EngineError, cpu_build, lora_refusal


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


async def _drop_first_request(counts: dict[str, int]):
    """An HTTP server on loopback that hangs up on the first request to each path without answering
    (as a server closing an idle keep-alive connection does), then answers 200."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        path = line.split()[1].split("?")[0] if line else ""
        counts[path] = counts.get(path, 0) + 1
        if counts[path] > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_control_call_the_engine_hung_up_on_is_sent_again_once():
    """/pause dropped once without an answer is sent again and succeeds (was: the swap failed, and
    every request waiting for it got a 502; seen once in a soak run)."""

    async def calls() -> dict[str, int]:
        counts: dict[str, int] = {}
        server = await _drop_first_request(counts)
        client = EngineClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "m")
        try:
            await client._post("/pause", params={"mode": "wait"})
            return counts
        finally:
            await client.close()
            server.close()

    assert asyncio.run(calls()) == {"/pause": 2}


def test_engines_of_a_mixture_of_experts_base_run_without_lora_on_the_cpu_build(tmp_path):
    """vLLM's CPU build fails every request of an MoE engine started with --enable-lora (the model
    matrix's MoE rows show the cause on each run): the gateway starts it without, and its variants
    cannot be adapters. A dense base keeps the adapter lane; an unreadable one is not refused here."""
    from server.adapters import AdapterLane
    from server.pool import managed_spec
    from server.registry import BaseRecord, DeltaRecord, VariantRecord
    from server.settings import GatewaySettings

    dense, moe = tmp_path / "dense", tmp_path / "moe"
    for path, config in ((dense, {"num_hidden_layers": 2}), (moe, {"num_local_experts": 4})):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
    assert lora_refusal(str(dense)) is None and lora_refusal(str(tmp_path / "nowhere")) is None
    if not cpu_build():  # the GPU build runs LoRA on MoE
        assert lora_refusal(str(moe)) is None
        return
    assert "mixture-of-experts" in lora_refusal(str(moe))
    settings = GatewaySettings(lora_slots=2)
    for path, lora in ((dense, True), (moe, False)):
        spec = managed_spec(settings, BaseRecord(name=path.name, path=str(path)), tmp_path / path.name, {})
        assert ("--enable-lora" in spec.extra_args) is lora
    lane = AdapterLane(tmp_path / "lanes", slots=2, max_rank=16)
    variant = VariantRecord(name="v", base="moe", deltas=[{"delta": "d"}])
    delta = DeltaRecord(
        name="d", path="d", size_bytes=1, mtime_ns=0, base_architecture="", base_content_hash="", tensors=1
    )
    why = lane.unfit(variant, BaseRecord(name="moe", path=str(moe)), [delta])
    assert "mixture-of-experts" in why


def test_families_whose_adapter_lane_is_checked_on_another_share_its_vllm_lora_layers():
    """loaders/families.ADAPTERS_ELSEWHERE: the matrix checks Mistral's adapter lane on Llama's and
    Qwen3's on Qwen2's. That holds while vLLM builds them from the same LoRA-wrapped layers."""
    import inspect

    from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
    from vllm.model_executor.models import llama, mistral, qwen2, qwen3

    from loaders.families import ADAPTERS_ELSEWHERE

    assert ADAPTERS_ELSEWHERE["mistral"] == "llama" and ADAPTERS_ELSEWHERE["qwen3"] == "qwen2"
    assert issubclass(mistral.MistralForCausalLM, llama.LlamaForCausalLM)
    assert mistral.MistralForCausalLM.packed_modules_mapping == llama.LlamaForCausalLM.packed_modules_mapping
    assert qwen3.Qwen3ForCausalLM.packed_modules_mapping == qwen2.Qwen2ForCausalLM.packed_modules_mapping
    assert qwen3.Qwen3MLP is qwen2.Qwen2MLP  # gate_up_proj, down_proj
    attention = inspect.getsource(qwen3.Qwen3Attention.__init__)  # its q/k norms are outside LoRA
    assert (
        "self.qkv_proj = QKVParallelLinear(" in attention and "self.o_proj = RowParallelLinear(" in attention
    )
    assert (qwen3.QKVParallelLinear, qwen3.RowParallelLinear) == (QKVParallelLinear, RowParallelLinear)
