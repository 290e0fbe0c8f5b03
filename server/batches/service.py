"""Batches: a JSONL file of requests (OpenAI's batch format) run through the gateway's own relay.

Lines are grouped by the variant they name and run variant by variant, so a batch over many
variants costs one swap per variant, not one per line; `concurrency` bounds its requests in
flight, so online traffic keeps being admitted between them. Batches, their files and every answer
(as it arrives) live in the state database (server/batches/store.py): every gateway sharing it sees
every batch, and a batch runs on the gateway holding its lease; when that gateway stops or dies, the
batch resumes there at the next start or on another gateway once the lease runs out
(server/leases.py), skipping the lines already answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

from loaders.engine import EngineError
from server import leases
from server.batches.store import ACTIVE, BatchStore, FileStore, public
from server.errors import BadRequestError, GatewayError
from server.gateway import Gateway
from server.metrics import Metrics
from server.proxy import CHAT, COMPLETIONS, MESSAGES, RESPONSES, forward
from server.rewrite import usage_counts
from server.schemas import InferenceBody
from server.tenancy import KEY, PROJECT, ROOT, Principal

log = logging.getLogger("deltagate.batches")
ROUTES = {route.path: route for route in (CHAT, COMPLETIONS, RESPONSES, MESSAGES)}
WINDOW_SECONDS = {"24h": 24 * 3600}
MAX_LINES = 50_000  # as OpenAI's


class BatchService:
    """Runs the batches this gateway holds the lease of; every batch's state is in the store."""

    def __init__(
        self,
        store: BatchStore,
        files: FileStore,
        gateway: Gateway,
        metrics: Metrics,
        owner: str,
        lease: float,
        concurrency: int = 8,
    ):
        self.store, self.files, self.gateway, self.metrics = store, files, gateway, metrics
        self.owner, self.lease = owner, lease  # this gateway, and how long its leases last (as evals')
        self.concurrency = concurrency
        self._tasks: dict[str, asyncio.Task] = {}
        self._follower: asyncio.Task | None = None

    async def start(self) -> None:
        """Resume the batches a previous process left running; keep leases, take over orphans."""
        for batch in self.store.all(ACTIVE):
            if self.store.claim(batch["id"], self.owner, self.lease, force=not self.gateway.registry.shared):
                log.info("resuming batch %s", batch["id"])
                self._launch(batch["id"])
        self._follower = asyncio.create_task(
            leases.follow(self.store, self.owner, self.lease, self._tasks, self._launch, "batch", self._lost)
        )

    async def stop(self) -> None:
        await leases.stop(self._follower, self._tasks)

    def _lost(self, batch_id: str) -> None:
        """Another gateway holds the batch now (this one's lease ran out): stop running it here."""
        task = self._tasks.get(batch_id)
        if task is not None:
            task.cancel()

    # the batch objects ---------------------------------------------------
    def get(self, batch_id: str, project: str | None = None) -> dict:
        """The batch object (404 unless it is `project`'s; None: any)."""
        return public(self.store.get(batch_id, project))

    def list(self, project: str | None = None) -> list[dict]:
        return [public(b) for b in self.store.all(project=project)]

    def _update(self, batch_id: str, **fields) -> dict:
        return self.store.update(batch_id, **fields)

    # creating ------------------------------------------------------------
    def create(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict | None,
        caller: Principal = ROOT,
    ) -> dict:
        """Check the input file line by line and queue the batch, run as `caller` (its lines answer as
        its own requests would: a model out of its scopes is unknown); a file with bad lines makes a
        batch `failed` with each line's error (as OpenAI reports them), nothing run."""
        if endpoint not in ROUTES:
            raise BadRequestError(f"endpoint {endpoint!r}: batches run on {', '.join(ROUTES)}")
        if completion_window not in WINDOW_SECONDS:
            raise BadRequestError(f"completion_window {completion_window!r}: only '24h' is supported")
        project = caller.project or ""
        record = self.files.get(input_file_id, project)
        if record["purpose"] != "batch":
            raise BadRequestError(f"file {input_file_id!r} has purpose {record['purpose']!r}, not 'batch'")
        now = int(time.time())
        batch = {
            "id": f"batch_{secrets.token_hex(12)}",
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + WINDOW_SECONDS[completion_window],
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
            "usage": _usage({}),
            PROJECT: project,
            KEY: caller.key_id,
        }
        lines, errors = _parse(self.files.content(input_file_id), endpoint)
        if errors:
            listed = {"object": "list", "data": errors[:100]}
            failed = batch | {"status": "failed", "failed_at": now, "errors": listed}
            self.store.add(failed, self.owner, self.lease)
            return public(failed)
        batch["request_counts"]["total"] = len(lines)
        self.store.add(batch | {"status": "in_progress", "in_progress_at": now}, self.owner, self.lease)
        self._launch(batch["id"])
        return self.get(batch["id"])

    def cancel(self, batch_id: str, project: str | None = None) -> dict:
        """Stop starting lines; those in flight finish; then `cancelled`, with the files so far."""
        batch = self.get(batch_id, project)
        if batch["status"] in ("validating", "in_progress"):
            batch = public(self._update(batch_id, status="cancelling", cancelling_at=int(time.time())))
            # Its gateway sees it at its next line; a batch nobody runs now is finished here.
            if batch_id not in self._tasks and self.store.claim(batch_id, self.owner, self.lease):
                self._launch(batch_id)
        return batch

    # running -------------------------------------------------------------
    def _launch(self, batch_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    async def _execute(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        caller = self.gateway.keys.of(batch.get(KEY))  # its lines answer as its key's requests
        try:
            lines, _ = _parse(self.files.content(batch["input_file_id"]), batch["endpoint"])
            outputs, failures = self.store.answers(batch_id)
            counts = {"total": len(lines), "completed": len(outputs), "failed": len(failures)}
            answered = {line["custom_id"] for line in outputs + failures}
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            for line in outputs:
                _add_usage(usage, line["response"]["body"])
            by_variant: dict[str, list[dict]] = {}
            for line in lines:  # the variants in the order the file first names them
                if line["custom_id"] not in answered:
                    by_variant.setdefault(line["body"]["model"], []).append(line)
            route = ROUTES[batch["endpoint"]]
            gate = asyncio.Semaphore(self.concurrency)

            async def one(line: dict) -> None:
                async with gate:
                    if self.get(batch_id)["status"] == "cancelling":
                        return
                    result = await self._ask(route, line, caller)
                ok = result["error"] is None
                self.store.add_answer(batch_id, line["custom_id"], ok, result)
                counts["completed" if ok else "failed"] += 1
                if ok:
                    _add_usage(usage, result["response"]["body"])
                self._update(batch_id, request_counts=counts, usage=_usage(usage))

            for todo in by_variant.values():  # a variant at a time: one swap each
                await asyncio.gather(*(one(line) for line in todo))
                if self.get(batch_id)["status"] == "cancelling":
                    break
            self._finish(batch_id)
        except asyncio.CancelledError:
            raise  # the gateway is stopping: the batch resumes at the next start
        except Exception as exc:
            log.exception("batch %s failed", batch_id)
            error = {
                "code": "batch_failed",
                "line": None,
                "message": f"{type(exc).__name__}: {exc}",
                "param": None,
            }
            self._update(
                batch_id,
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [error]},
            )

    async def _ask(self, route, line: dict, caller: Principal) -> dict:
        """One line through the relay: OpenAI's output line (an error line for a non-2xx answer)."""
        request_id = f"batch_req_{secrets.token_hex(12)}"
        try:
            resp = await forward(
                self.gateway,
                self.metrics,
                InferenceBody.model_validate(line["body"]),
                {},
                route,
                caller=caller,
                background=True,  # yields to interactive requests (server/policy.py)
            )
            status, body = resp.status_code, json.loads(resp.body)
        except GatewayError as exc:
            status, body = exc.status, {"error": {"message": str(exc), "type": exc.kind, "code": exc.status}}
        except EngineError as exc:
            status, body = 502, {"error": {"message": str(exc), "type": "engine_error", "code": 502}}
        error = None
        if status >= 400:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else None
            error = {"code": str(status), "message": message or f"HTTP {status}"}
        response = {"status_code": status, "request_id": request_id, "body": body}
        return {"id": request_id, "custom_id": line["custom_id"], "response": response, "error": error}

    def _finish(self, batch_id: str) -> None:
        """The output and error files from what was answered; `completed` (or `cancelled`)."""
        batch = self.store.get(batch_id)
        cancelled, project = batch["status"] == "cancelling", batch.get(PROJECT, "")
        self._update(batch_id, status="finalizing", finalizing_at=int(time.time()))
        # Written by a gateway that died before marking the batch done: used, not written again.
        written = {f["filename"]: f["id"] for f in self.files.list("batch_output")}
        ids = {}
        for kind, lines in zip(("output", "errors"), self.store.answers(batch_id), strict=True):
            name = f"{batch_id}_{kind}.jsonl"
            if lines and name in written:
                ids[kind] = written[name]
            elif lines:
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                ids[kind] = self.files.add(data, name, "batch_output", project)["id"]
        now = int(time.time())
        end = (
            {"status": "cancelled", "cancelled_at": now}
            if cancelled
            else {"status": "completed", "completed_at": now}
        )
        self._update(batch_id, output_file_id=ids.get("output"), error_file_id=ids.get("errors"), **end)
        self.store.drop_answers(batch_id)


def _parse(data: bytes, endpoint: str) -> tuple[list[dict], list[dict]]:
    """The lines of a batch input file, and an error per bad line (code, line, message, param)."""
    lines, errors, seen = [], [], set()

    def bad(number: int, message: str, param: str | None = None) -> None:
        errors.append({"code": "invalid_request", "line": number, "message": message, "param": param})

    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as exc:
            bad(number, f"not JSON: {exc}")
            continue
        if not isinstance(line, dict):
            bad(number, "not a JSON object")
            continue
        custom_id, body = line.get("custom_id"), line.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            bad(number, "custom_id must be a non-empty string", "custom_id")
        elif custom_id in seen:
            bad(number, f"custom_id {custom_id!r} appears twice", "custom_id")
        elif line.get("method") != "POST":
            bad(number, "method must be POST", "method")
        elif line.get("url") != endpoint:
            bad(number, f"url {line.get('url')!r} is not this batch's endpoint {endpoint!r}", "url")
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
            bad(number, "body must be a JSON object naming a 'model'", "body")
        elif body.get("stream"):
            bad(number, "a batch line cannot stream", "body.stream")
        else:
            seen.add(custom_id)
            lines.append(line)
    if not lines and not errors:
        errors.append(
            {"code": "empty_file", "line": None, "message": "the input file has no lines", "param": None}
        )
    if len(lines) > MAX_LINES:
        errors.append(
            {"code": "too_many_lines", "line": None, "message": f"over {MAX_LINES} lines", "param": None}
        )
    return lines, errors


def _add_usage(total: dict, body) -> None:
    """Add an answer's token counts to `total` (read as the relay reads them: server/rewrite.py)."""
    for key, value in (usage_counts(json.dumps(body, separators=(",", ":")).encode()) or {}).items():
        total[key] += value


def _usage(counts: dict) -> dict:
    """OpenAI's batch usage from prompt and completion token counts."""
    prompt, completion = counts.get("prompt_tokens", 0), counts.get("completion_tokens", 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
