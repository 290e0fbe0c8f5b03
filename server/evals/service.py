"""Eval runs: ask each variant about each item through the gateway's own relay, grade, store.

A run goes variant by variant (all items of one before the next), so it costs at most one swap
per variant however its items interleave; `concurrency` bounds its requests in flight, so online
traffic on the same engine keeps being admitted between them. Runs persist: a run still queued or
in progress when its gateway stops is resumed, skipping graded items: at the next start, or by
another gateway sharing the state database once the run's lease runs out (server/evals/store.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import random
import socket
import uuid

from deltas.store import materialize, named_digest
from server import leases
from server.errors import BadRequestError, ConflictError, ForbiddenError, NotFoundError
from server.evals.asking import CALLER, Asker, ReferenceProbe
from server.evals.results import output_items, run_result
from server.evals.sandbox import Limits
from server.evals.schemas import (
    EvalCreate,
    OutputItem,
    OutputItems,
    RunCreate,
    RunPublic,
    check_templates,
)
from server.evals.store import EvalStore
from server.evals.tasks import (
    BuiltinSource,
    FidelitySource,
    JsonlSource,
    MultipleChoiceSource,
    PerplexitySource,
    TaskSpec,
    builtin_task,
    fidelity_task,
    jsonl_task,
    messages_task,
    multiple_choice_task,
    perplexity_task,
)
from server.gateway import Gateway
from server.leases import ACTIVE
from server.metrics import Metrics
from server.tenancy import ROOT, Principal

log = logging.getLogger("deltagate.evals")


class EvalService:
    """Owns the eval store and the runs executing in this process."""

    def __init__(
        self,
        store: EvalStore,
        gateway: Gateway,
        metrics: Metrics,
        *,
        allow_code_execution: bool = False,
        limits: Limits = Limits(),
    ):
        self.store, self.gateway, self.metrics = store, gateway, metrics
        self.allow_code_execution = allow_code_execution
        self.asker = Asker(gateway, metrics, limits)
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancel: set[str] = set()
        self._hashes: dict[tuple[str, int, int], str] = {}
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this gateway
        self._follower: asyncio.Task | None = None
        self.lease = gateway.settings.run_lease_seconds  # a run not renewed this long is taken over

    async def start(self) -> None:
        """Resume the runs a previous process left queued or in progress; with a shared state
        database, keep leasing this gateway's runs and take over those of gateways gone."""
        shared = self.gateway.registry.shared
        for run in self.store.runs(statuses=ACTIVE):
            if self.store.claim(run["id"], self.owner, self.lease, force=not shared):
                log.info("resuming eval run %s", run["id"])
                self._launch(run["id"])
        self._follower = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        """Keep this gateway's leases, stop runs canceled through another gateway, resume runs
        whose gateway is gone (server/leases.py)."""
        await leases.follow(
            self.store, self.owner, self.lease, self._tasks, self._launch, "eval run", lost=self._cancel.add
        )

    async def stop(self) -> None:
        await leases.stop(self._follower, self._tasks)

    # evals
    def create_eval(self, body: EvalCreate, caller: Principal = ROOT) -> dict:
        """A new eval, `caller`'s project's (root's: no project's)."""
        self._check_execution(self.task_of(body))  # a built-in task's data must load
        return self.store.eval(self.store.add_eval(body.model_dump(), caller.project))

    def get_eval(self, eval_id: str, caller: Principal = ROOT) -> dict:
        """An eval `caller` may see (root: every one; a project admin key: its project's), else 404."""
        row = self.store.eval(eval_id)
        if row is None or not caller.owns(row["project"]):
            raise NotFoundError(f"eval {eval_id!r} not found")
        return row

    def delete_eval(self, eval_id: str, caller: Principal = ROOT) -> None:
        self.get_eval(eval_id, caller)
        if self.store.runs(eval_id, ACTIVE):
            raise ConflictError(f"eval {eval_id!r} has runs in progress; cancel them first")
        self.store.delete_eval(eval_id)

    @staticmethod
    def task_of(body: EvalCreate, run: RunCreate | None = None) -> TaskSpec:
        """The items, prompt, graders and metrics an eval definition stands for (with OpenAI's
        custom data source config: together with the items and messages of `run`)."""
        source = body.data_source
        if body.data_source_config is not None:
            return _run_items_task(body, run)
        if run is not None and run.data_source is not None:
            raise BadRequestError("this eval holds its items (data_source); run it with 'variants'")
        match source:
            case JsonlSource():
                return jsonl_task(source, body.prompt or "", body.endpoint, list(body.testing_criteria))
            case PerplexitySource():
                return perplexity_task(source)
            case FidelitySource():
                return fidelity_task(source)
            case BuiltinSource():
                task = builtin_task(source)
            case MultipleChoiceSource():
                task = multiple_choice_task(source, body.prompt)
        return dataclasses.replace(task, graders=task.graders + list(body.testing_criteria))

    def _check_execution(self, task: TaskSpec) -> None:
        if task.executes_code and not self.allow_code_execution:
            raise ForbiddenError(
                f"{task.name} runs model-written code, and code execution is off on this server; "
                "start it with --allow-code-execution (programs then run sandboxed, see the README)"
            )

    # runs
    async def create_run(self, eval_id: str, body: RunCreate, caller: Principal = ROOT) -> dict:
        """Check the variants (each in `caller`'s scopes, else 404 as unknown), record what will be
        measured, queue the run (it runs with `caller`'s scopes)."""
        spec = EvalCreate.model_validate(self.get_eval(eval_id, caller)["body"])
        task = self.task_of(spec, body)
        self._check_execution(task)
        for name in [*body.variants, *([task.reference] if task.reference else [])]:
            self.gateway.resolve(name, caller=caller)
        recipes = {v: await self._recipe_record(v) for v in body.variants}  # 404 for unknown names
        indices = list(range(len(task.items)))
        if body.items is not None:
            wrong = [i for i in body.items if not 0 <= i < len(indices)]
            if wrong:
                raise BadRequestError(f"items {wrong[:5]} are not indices of the eval's {len(indices)} items")
            indices = sorted(set(body.items))
        elif body.limit and body.limit < len(indices):
            indices = sorted(random.Random(body.seed).sample(indices, body.limit))
        measured = {
            "task": task.name,
            "task_version": task.version,
            "endpoint": task.endpoint,
            "prompt_template": list(task.messages) if task.messages else task.prompt,
            "stop": task.stop,
            "graders": [g.model_dump() for g in task.graders],
            "metrics": [dataclasses.asdict(m) for m in task.metrics],
            "sampling": {
                "max_tokens": body.max_tokens,
                "temperature": body.temperature,
                "seed": body.seed,
                "top_p": body.top_p,
                **task.extra_body,
            },
            "seed": body.seed,
            "item_count": len(indices),
            "item_indices": indices,
            "recipes": recipes,
        }
        if task.reference:
            measured["reference"] = {
                "variant": task.reference,
                "recipe": await self._recipe_record(task.reference),
            }
            measured["sampling"]["reference_tokens"] = task.probe_tokens
        total = len(indices) * len(body.variants)
        dumped = body.model_dump()
        run_id = self.store.add_run(eval_id, dumped, total, measured, self.owner, self.lease, caller.key_id)
        self._launch(run_id)
        return self.store.run(run_id)

    def public_run(self, run: dict) -> RunPublic:
        return run_result(self.store, run)

    def run_task(self, run: dict) -> TaskSpec:
        """The task a stored run asks about (its eval's, with the run's own items where it has them)."""
        spec = EvalCreate.model_validate(self.get_eval(run["eval_id"])["body"])
        return self.task_of(spec, RunCreate.model_validate(run["body"]))

    def output_items(self, run: dict, status: str | None, after: int, limit: int) -> OutputItems:
        return output_items(self.store, run, self.run_task(run), status, after, limit)

    def output_item(self, run: dict, item_id: str) -> OutputItem:
        """One graded item by its id (404 if the run has none such)."""
        seq = int(item_id) if item_id.isdigit() else -1
        page = output_items(self.store, run, self.run_task(run), None, seq - 1, 1).data
        if not page or page[0].id != item_id:
            raise NotFoundError(f"output item {item_id!r} of run {run['id']!r} not found")
        return page[0]

    def get_run(self, eval_id: str, run_id: str, caller: Principal = ROOT) -> dict:
        """A run of an eval `caller` may see, else 404."""
        self.get_eval(eval_id, caller)
        run = self.store.run(run_id)
        if run is None or run["eval_id"] != eval_id:
            raise NotFoundError(f"run {run_id!r} of eval {eval_id!r} not found")
        return run

    def delete_run(self, eval_id: str, run_id: str, caller: Principal = ROOT) -> None:
        """Forget a run and its items (409 while it runs: cancel it first)."""
        if self.get_run(eval_id, run_id, caller)["status"] in ACTIVE:
            raise ConflictError(f"run {run_id!r} is {self.store.run(run_id)['status']}; cancel it first")
        self.store.delete_run(run_id)

    def cancel(self, eval_id: str, run_id: str, caller: Principal = ROOT) -> dict:
        run = self.get_run(eval_id, run_id, caller)
        if run["status"] in ACTIVE:
            self.store.set_status(run_id, "canceled")  # another gateway running it stops at its renewal
            if run_id in self._tasks:
                self._cancel.add(run_id)
        return self.store.run(run_id)

    def _launch(self, run_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(run_id))
        self._tasks[run_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(run_id, None))

    async def _execute(self, run_id: str) -> None:
        run = self.store.run(run_id)
        body = RunCreate.model_validate(run["body"])
        CALLER.set(self.gateway.keys.of(run["key"]) if run["key"] else ROOT)  # this task's requests
        try:
            task = self.task_of(EvalCreate.model_validate(self.get_eval(run["eval_id"])["body"]), body)
            self._check_execution(task)  # a resumed run on a server started without the flag fails
            if not self.store.set_status(run_id, "in_progress"):
                return  # canceled before it started
            gate = asyncio.Semaphore(body.concurrency)
            indices = run["measured"]["item_indices"]
            todo = {
                v: [i for i in indices if i not in self.store.done_indices(run_id, v)] for v in body.variants
            }
            reference: dict[int, ReferenceProbe] = {}
            if task.kind == "fidelity":  # the reference's continuations first (one swap), then the variants
                needed = sorted(set().union(*todo.values()))
                probes = await self._each(
                    gate, run_id, lambda i: self.asker.reference(task, task.items[i]), needed
                )
                reference = dict(zip(needed, probes, strict=True))
            for variant in body.variants:

                async def one(i: int, variant: str = variant) -> None:
                    row = await self.asker.answer(task, variant, body, task.items[i], reference.get(i))
                    self.store.put_item(run_id, variant, i, row)

                await self._each(gate, run_id, one, todo[variant])
            self.store.set_status(run_id, "canceled" if run_id in self._cancel else "completed")
        except asyncio.CancelledError:
            raise  # the gateway is stopping: the run stays in progress and resumes at the next start
        except Exception as exc:
            log.exception("eval run %s failed", run_id)
            self.store.set_status(run_id, "failed", f"{type(exc).__name__}: {exc}")
        finally:
            self._cancel.discard(run_id)

    async def _each(self, gate: asyncio.Semaphore, run_id: str, fn, args: list) -> list:
        """`fn(arg)` for every arg, at most the run's concurrency at once; skipped once canceled."""

        async def bounded(arg):
            async with gate:
                return None if run_id in self._cancel else await fn(arg)

        return await asyncio.gather(*(bounded(a) for a in args))

    async def _recipe_record(self, variant: str) -> dict:
        """What a variant's weights are: base, method, and each delta with its file's sha256."""
        self.gateway.registry.variant(variant)  # 400 for an alias: a run measures fixed weights
        resolved = self.gateway.resolve(variant)
        record, recipe = resolved.variant, resolved.recipe
        deltas = []
        for term, rterm in zip(record.deltas, recipe.deltas, strict=True):
            # a stored artifact is named by its hash (and checked against it when fetched)
            sha = named_digest(rterm.path) or await asyncio.to_thread(self._sha256, rterm.path)
            deltas.append({"delta": term.delta, "sha256": sha, "alpha": term.alpha, "density": term.density})
        return {"base": record.base, "base_path": recipe.base, "method": recipe.method, "deltas": deltas}

    def _sha256(self, ref: str) -> str:
        path = materialize(ref)  # a file, or this node's verified copy of a stored artifact
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
            self._hashes[key] = digest.hexdigest()
        return self._hashes[key]


def _run_items_task(spec: EvalCreate, run: RunCreate | None) -> TaskSpec:
    """An eval with OpenAI's custom data source config: the run brings the items (checked against
    the eval's item_schema) and the messages; without a run, no items (for describing the eval)."""
    import jsonschema

    graders = list(spec.testing_criteria)
    if run is None:
        return messages_task([], [], graders, {})
    if run.data_source is None:
        raise BadRequestError(
            "this eval's items come with each run: give data_source {type: completions, model, "
            "input_messages, source: {type: file_content, content}}"
        )
    source = run.data_source
    items = [row.item for row in source.source.content]
    validator = jsonschema.Draft202012Validator(spec.data_source_config.item_schema)
    for number, item in enumerate(items):
        if error := next(iter(validator.iter_errors(item)), None):
            where = f"source.content[{number}].item"
            raise BadRequestError(f"{where} does not match the eval's item_schema: {error.message}")
    messages = [m.as_chat() for m in source.input_messages.template]
    try:
        check_templates(items, "\n".join(m["content"] for m in messages), graders)
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    response_format = source.sampling_params.response_format
    extra = {"response_format": response_format} if response_format else {}
    return messages_task(items, messages, graders, extra)
