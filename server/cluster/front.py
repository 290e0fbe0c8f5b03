"""The Ray Serve ingress: the OpenAI front (auth, variant resolution, metrics) over engine replicas.

A request's `model` is resolved here (unknown names are a 404 before any replica is bothered)
and sent to the EngineReplica deployment with the variant as Ray's multiplexed model id, so it
goes to a replica that holds the variant, or else to the least loaded one, which swaps to it.
An adapter-lane variant is sent under its base's id: it runs on the base's weights.

An answer that comes back RETRY never reached an engine (that replica's engine is down):
it is sent again, for up to --engine-wait seconds (Ray routes away from the failed replica
within its health-check period), then 503 with Retry-After. Streams cut by an engine's death
end with an error event, like in the single-process gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deltas import __version__
from server.deps import check_admin, check_api_key
from server.errors import error_response, install_error_handlers
from server.gateway import Gateway
from server.metrics import Metrics, lora_requests_info
from server.proxy import error_event
from server.schemas import parse_inference_body
from server.settings import GatewaySettings

app = FastAPI(title="deltagate (Ray Serve)", version=__version__)
install_error_handlers(app)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
RETRY_PAUSE = 0.5
APP_NAME = "deltagate"  # the Serve application (server/cluster/run.py)


# Helpers the deployment uses are defined above it: Ray pickles the ingress class when it is
# decorated, and module globals defined after it are missing in the replica.
def _model_of(raw: bytes) -> str:
    return parse_inference_body(raw).model


def _replica_counts() -> dict[str, int]:
    """Engine replicas by state, as Ray Serve's controller sees them (RUNNING, STARTING, ...)."""
    status = serve.status().applications[APP_NAME].deployments["EngineReplica"]
    return {str(state): n for state, n in status.replica_states.items()}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(app)
class Front:
    """Resolves models against the registry and relays to EngineReplica; holds no engine."""

    async def __init__(self, engines: DeploymentHandle, settings_json: str):
        self.settings = GatewaySettings.model_validate_json(settings_json)
        self.metrics = Metrics(__version__)
        self.gateway = Gateway(self.settings, self.metrics)
        await self.gateway.start(engines=False)
        self.engines = engines

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(self) -> Response:
        """The front's deltagate_* metrics (requests, latency, TTFT, tokens per variant)."""
        return Response(self.metrics.render(), media_type=PROMETHEUS_TEXT)

    @app.get("/v1/cluster", tags=["admin"])
    async def cluster(self, request: Request) -> dict:
        """Replica counts by state (Ray Serve's view) and what each running replica holds."""
        check_admin(self.gateway, request.headers.get("authorization"))
        counts = _replica_counts()
        return {"replica_states": counts, "replicas": await self._replica_states(counts.get("RUNNING", 0))}

    @app.get("/metrics/engines")
    async def engine_metrics(self) -> Response:
        """`vllm:lora_requests_info` per replica (label `replica`): the variant each engine holds as
        its running adapter and the variants waiting for it, for residency-aware routers."""
        states = await self._replica_states(_replica_counts().get("RUNNING", 0))
        engines = [(s["resident"], s["queued"], {"replica": str(s["replica"])}) for s in states]
        return Response(lora_requests_info(engines, time.time()), media_type=PROMETHEUS_TEXT)

    async def _replica_states(self, running: int) -> list[dict]:
        """Each running replica's state. Ray Serve has no call that reaches every replica, so they are
        sampled (unpinned calls are spread over them) until each has answered, or 32 calls were made."""
        seen: dict[int, dict] = {}
        for _ in range(32):
            if len(seen) >= running:
                break
            state = await self.engines.state.remote()
            seen[state["replica"]] = state
        return [seen[r] for r in sorted(seen)]

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        check_api_key(self.gateway, request.headers.get("authorization"))
        names = self.gateway.model_names()
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "deltagate"} for n in names],
        }

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._relay(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._relay(request, "/v1/chat/completions", chat=True)

    async def _relay(self, request: Request, endpoint: str, *, chat: bool) -> Response:
        check_api_key(self.gateway, request.headers.get("authorization"))
        raw = await request.body()
        model = _model_of(raw)
        target = self.gateway.resolve(model)  # 404/409 here, before any replica
        model_id = target.variant.base if target.adapter else model
        headers = {k: v for k, v in request.headers.items() if k in ("traceparent", "tracestate")}
        start = time.perf_counter()
        deadline = time.monotonic() + self.settings.engine_wait
        while True:
            call = self.engines.options(stream=True, multiplexed_model_id=model_id)
            answer = call.handle.remote(endpoint, raw, headers, chat)
            try:
                head = await answer.__anext__()
            except RayActorError:  # the replica died before answering: nothing was sent
                head = {"retry": True}
            if not head.get("retry"):
                break
            answer.cancel()
            if time.monotonic() > deadline:
                self.metrics.observe_request(model, endpoint, 503, time.perf_counter() - start)
                response = error_response(
                    503, "engine_unavailable", f"no engine can serve {model!r} right now"
                )
                response.headers["Retry-After"] = "5"
                return response
            await asyncio.sleep(RETRY_PAUSE)
        served_by = {"X-Deltagate-Replica": str(head.get("replica", ""))}  # which engine answered
        if "message" in head:
            self.metrics.observe_request(model, endpoint, head["status"], time.perf_counter() - start)
            response = error_response(head["status"], head["kind"], head["message"])
            response.headers.update(served_by)
            return response
        if head["media_type"] != "text/event-stream":
            body = await answer.__anext__()
            self.metrics.observe_request(model, endpoint, head["status"], time.perf_counter() - start)
            return Response(
                body, status_code=head["status"], media_type=head["media_type"], headers=served_by
            )
        stream = self._stream(answer, model, endpoint, start)
        return StreamingResponse(stream, media_type=head["media_type"], headers=served_by)

    async def _stream(self, answer, model: str, endpoint: str, start: float) -> AsyncIterator[bytes]:
        status, first = 499, True  # 499: the client went away before the end
        try:
            async for chunk in answer:
                if first:
                    first = False
                    self.metrics.ttft_seconds.labels(model).observe(time.perf_counter() - start)
                yield chunk
            status = 200
        except RayActorError:
            status = 502
            yield error_event(f"the engine serving {model!r} died mid-stream")
        finally:
            if status == 499:
                answer.cancel()  # Ray cancels the replica's generator: it releases its slot
            self.metrics.observe_request(model, endpoint, status, time.perf_counter() - start)
