"""Rebase jobs: from base θ to an updated base θ′, for every (or the named) variants of θ.

Per variant V = θ + Σ αᵢ·Δᵢ, in phases recorded in the report as they finish:
1. defining — the candidates θ′ + a·Σ αᵢ·Δᵢ for each a of the α grid (`V:θ′:a<a>`; with one α,
   directly `V:θ′`).
2. validating — with several α: one eval run over the candidates on the validation split; the best
   a (by the gate's criterion) becomes `V:θ′` and the other candidates are deleted.
3. evaluating — one eval run over [V, V:θ′, θ′] on the held-out split: scores with intervals and
   the paired difference V:θ′ − V, checked against the user's gate.
4. promoting — every alias routing to a V that passed is moved to V:θ′ (through canary steps with a
   hold time); a V that failed is reported and no alias is touched for it.

Eval runs are ordinary runs of the evals API (server/evals/): the same graders, intervals,
concurrency bound and persistence. A rebase that fails or is canceled while promoting puts every
alias back to its targets before the rebase; one interrupted by a gateway stop resumes at the next
start (a phase whose run was created waits for that run, which resumes by itself; a promotion starts
again from the aliases as they were).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from server import leases
from server.aliases import AliasTarget
from server.catalog import require_name
from server.errors import BadRequestError, ConflictError, NotFoundError
from server.evals.schemas import EvalCreate, RunCreate, RunPublic
from server.evals.service import EvalService
from server.gateway import Gateway
from server.leases import ACTIVE
from server.rebase.schemas import RebaseCreate, RebasePublic, RebaseReport, Score, VariantReport, Verdict
from server.rebase.store import RebaseStore
from server.registry import VariantRecord, VariantTerm
from server.tenancy import ROOT, Principal, not_managed

log = logging.getLogger("deltagate.rebase")
POLL_SECONDS = 0.5


class Canceled(Exception):
    """The rebase was canceled (through the API, here or on another gateway)."""


class RebaseService:
    def __init__(self, store: RebaseStore, gateway: Gateway, evals: EvalService):
        self.store, self.gateway, self.evals = store, gateway, evals
        self.registry = gateway.registry
        self.owner, self.lease = evals.owner, evals.lease
        self._tasks: dict[str, asyncio.Task] = {}
        self._follower: asyncio.Task | None = None

    async def start(self) -> None:
        """Resume the rebases a previous process left active; keep leases and take over orphans."""
        for row in self.store.all(ACTIVE):
            if self.store.claim(row["id"], self.owner, self.lease, force=not self.registry.shared):
                log.info("resuming rebase %s", row["id"])
                self._launch(row["id"])
        self._follower = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        """Keep this gateway's leases; resume rebases whose gateway is gone (server/leases.py)."""
        await leases.follow(self.store, self.owner, self.lease, self._tasks, self._launch, "rebase")

    async def stop(self) -> None:
        await leases.stop(self._follower, self._tasks)

    # the API -----------------------------------------------------------
    def create(self, body: RebaseCreate, caller: Principal = ROOT) -> RebasePublic:
        """Check everything that can be checked before any work, then queue the rebase. A project's
        admin key rebases its own variants, onto a base its scopes allow, with its own eval; its eval
        runs have its scopes and the aliases it moves are its own."""
        for base in (body.from_base, body.to_base):
            if not caller.may_use(base, base):
                raise NotFoundError(f"unknown base {base!r}")  # as unknown: no other project's names
            self.registry.base(base)  # 404s
        variants = self._variants(body, caller)
        task = EvalService.task_of(
            EvalCreate.model_validate(self.evals.get_eval(body.eval_id, caller)["body"])
        )
        if not task.items:
            raise BadRequestError("a rebase needs an eval that holds its items (built-in, JSONL, perplexity)")
        criteria = {g.name: False for g in task.graders} | {m.name: m.lower_is_better for m in task.metrics}
        criterion = body.gate.criterion or next(iter(criteria))
        if criterion not in criteria:
            raise BadRequestError(f"gate criterion {criterion!r} is not the eval's: {sorted(criteria)}")
        if body.validation + body.holdout > len(task.items):
            raise BadRequestError(
                f"validation ({body.validation}) + holdout ({body.holdout}) items exceed the eval's "
                f"{len(task.items)}"
            )
        order = list(range(len(task.items)))
        random.Random(body.seed).shuffle(order)
        held = order[body.validation : body.validation + body.holdout]
        report = RebaseReport(
            criterion=criterion,
            lower_is_better=criteria[criterion],
            validation_items=sorted(order[: body.validation]),
            holdout_items=sorted(held),
        )
        for v in variants:
            names = _candidate_names(v, body)
            final = f"{v}:{body.to_base}"
            if len(names) > 1 and final in self.registry.state.variants:
                raise ConflictError(f"variant {final!r} exists; an α search defines it: delete it first")
            for alpha, name in names.items():
                require_name(name)
                existing = self.registry.state.variants.get(name)
                if existing is not None and existing != self._candidate(v, body, name, float(alpha)):
                    raise ConflictError(f"variant {name!r} exists with other weights; delete it or rename")
                if existing is None:
                    self.registry.state.require_free(name)
            aliases = [a for a in self.registry.state.routed_by(v) if caller.may_manage(a)]  # it may move
            report.variants[v] = VariantReport(candidates=names, aliases=aliases)
        rebase_id = self.store.add(
            body.model_dump(), report.model_dump(), self.owner, self.lease, caller.project, caller.key_id
        )
        self._launch(rebase_id)
        return self.public(self.get(rebase_id))

    def get(self, rebase_id: str, caller: Principal = ROOT) -> dict:
        """A rebase `caller` may see (root: every one; a project admin key: its project's), else 404."""
        row = self.store.get(rebase_id)
        if row is None or not caller.owns(row["project"]):
            raise NotFoundError(f"rebase {rebase_id!r} not found")
        return row

    def cancel(self, rebase_id: str, caller: Principal = ROOT) -> RebasePublic:
        """Stop a rebase: its eval run is canceled, aliases it moved go back; nothing more is promoted."""
        row = self.get(rebase_id, caller)
        if row["status"] in ACTIVE:
            self.store.set_status(rebase_id, "canceled", "canceled through the API")
        return self.public(self.get(rebase_id))

    def public(self, row: dict) -> RebasePublic:
        report = RebaseReport.model_validate(row["report"])
        done = total = 0
        for run_id in _phase_runs(report):
            run = self.evals.store.run(run_id)
            if run is not None:
                progress = self.evals.public_run(run).progress
                done, total = done + progress["done"], total + progress["total"]
        return RebasePublic(
            id=row["id"],
            created_at=int(row["created_at"]),
            status=row["status"],
            error=row["error"],
            request=RebaseCreate.model_validate(row["body"]),
            progress={"done": done, "total": total},
            report=report,
        )

    # the job -----------------------------------------------------------
    def _launch(self, rebase_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(rebase_id))
        self._tasks[rebase_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(rebase_id, None))

    async def _execute(self, rebase_id: str) -> None:
        row = self.get(rebase_id)
        body = RebaseCreate.model_validate(row["body"])
        caller = self.gateway.keys.of(row["key"]) if row["key"] else ROOT
        job = _Job(self, rebase_id, body, RebaseReport.model_validate(row["report"]), caller)
        try:
            if not self.store.set_status(rebase_id, "in_progress"):
                return
            await job.run()
            self.store.set_status(rebase_id, "completed")
        except asyncio.CancelledError:
            raise  # the gateway is stopping: resumed at the next start
        except Canceled:
            job.restore_aliases("canceled")
        except Exception as exc:
            log.exception("rebase %s failed", rebase_id)
            error = f"{type(exc).__name__}: {exc}"
            try:
                job.restore_aliases("failed")
            except Exception as again:  # the database away: say so; the aliases are as the report says
                error += f"; and putting the aliases back failed: {again}"
            self.store.set_status(rebase_id, "failed", error)

    def _variants(self, body: RebaseCreate, caller: Principal) -> list[str]:
        """The variants to rebase: those named (each `caller`'s to manage, else 403), or every variant
        of from_base it manages."""
        state = self.registry.state
        if body.variants is None:
            names = [
                v.name
                for v in state.variants.values()
                if v.base == body.from_base and v.deltas and caller.may_manage(v.name)
            ]
            if not names:
                raise BadRequestError(f"base {body.from_base!r} has no variants to rebase")
            return sorted(names)
        for name in body.variants:
            if not caller.may_manage(name):
                raise not_managed(caller, name)
            record = self.registry.variant(name)
            if record.base != body.from_base or not record.deltas:
                raise BadRequestError(f"{name!r} is not a variant of base {body.from_base!r}")
        return list(body.variants)

    def _candidate(self, variant: str, body: RebaseCreate, name: str, alpha: float) -> VariantRecord:
        """`variant`'s deltas, each scaled by `alpha`, on the new base."""
        record = self.registry.variant(variant)
        terms = [VariantTerm(delta=t.delta, alpha=t.alpha * alpha, density=t.density) for t in record.deltas]
        return record.model_copy(update={"name": name, "base": body.to_base, "deltas": terms})


class _Job:
    """One rebase executing: its phases, each saved to the report when done."""

    def __init__(
        self,
        service: RebaseService,
        rebase_id: str,
        body: RebaseCreate,
        report: RebaseReport,
        caller: Principal,
    ):
        self.service, self.id, self.body, self.report = service, rebase_id, body, report
        self.caller = caller  # whose rebase: its eval runs' scopes, the aliases it may move
        self.registry = service.registry

    async def run(self) -> None:
        body, report = self.body, self.report
        if report.phase in ("queued", "defining"):
            self._phase("defining")
            for v, entry in report.variants.items():
                for alpha, name in entry.candidates.items():
                    await self._define(self.service._candidate(v, body, name, float(alpha)))
        if report.phase in ("defining", "validating"):
            self._phase("validating")
            for v, entry in report.variants.items():
                await self._choose_alpha(v, entry)
        if report.phase in ("validating", "evaluating"):
            self._phase("evaluating")
            for v, entry in report.variants.items():
                await self._evaluate(v, entry)
        if report.phase in ("evaluating", "promoting"):
            self._phase("promoting")
            await self._promote()
        self._phase("done")

    def _phase(self, phase: str) -> None:
        if self.report.phase != phase:
            self.report.phase = phase
            self._note(f"phase {phase}")

    def _note(self, line: str) -> None:
        self.report.log.append(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}")
        self.service.store.save_report(self.id, self.report.model_dump())

    def _check_canceled(self) -> None:
        if self.service.store.get(self.id)["status"] not in ACTIVE:
            raise Canceled()

    async def _define(self, record: VariantRecord) -> None:
        existing = self.registry.state.variants.get(record.name)
        if existing is None:
            await self.service.gateway.catalog.define_variant(record)
        elif existing != record:
            raise ConflictError(f"variant {record.name!r} was redefined with other weights meanwhile")

    async def _choose_alpha(self, v: str, entry: VariantReport) -> None:
        """With several α: evaluate the candidates on the validation split and keep the best."""
        final = f"{v}:{self.body.to_base}"
        if len(entry.candidates) == 1:
            entry.alpha, entry.variant = float(next(iter(entry.candidates))), final
            return
        names = list(entry.candidates.values())
        run = await self._run(v, "validation", names, self.report.validation_items, "validation_run")
        for alpha, name in entry.candidates.items():
            entry.validation[alpha] = _score(run, name, self.report.criterion)
        sign = -1 if self.report.lower_is_better else 1
        best = max(entry.validation, key=lambda a: (sign * entry.validation[a].value, -abs(float(a) - 1)))
        entry.alpha, entry.variant = float(best), final
        await self._define(self.service._candidate(v, self.body, final, float(best)))
        for name in names:
            if name != final and name in self.registry.state.variants:
                await self.service.gateway.catalog.delete_variant(name)
        self._note(f"{v}: α = {best} on the validation split ({self.report.criterion})")

    async def _evaluate(self, v: str, entry: VariantReport) -> None:
        """[V, V:θ′, θ′] on the held-out split; the gate on the paired difference."""
        models = [v, entry.variant, self.body.to_base]
        run = await self._run(v, "holdout", models, self.report.holdout_items, "holdout_run")
        c = self.report.criterion
        keys = ("from", "candidate", "to_base")
        entry.scores = {key: _score(run, name, c) for key, name in zip(keys, models, strict=True)}
        pair = next((d for d in run.comparisons if d.criterion == c and d.variant == entry.variant), None)
        if pair is None:
            entry.gate = Verdict(passed=False, reasons=["no item was answered by both variants"])
        else:
            entry.difference = Score(value=pair.difference, ci95=pair.ci95, n=pair.n)
            entry.gate = _verdict(self.body, self.report.lower_is_better, entry)
        verdict = "passed" if entry.gate.passed else "failed"
        self._note(f"{v}: gate {verdict}: {'; '.join(entry.gate.reasons)}")

    async def _run(self, v: str, split: str, models: list[str], items: list[int], field: str) -> RunPublic:
        """The eval run of this phase for `v` (created once; after a restart, the same run)."""
        entry = self.report.variants[v]
        run_id = getattr(entry, field)
        evals = self.service.evals
        if run_id is None:
            body = RunCreate(
                name=f"{self.id} {split}: {v}",
                variants=models,
                items=items,
                max_tokens=self.body.max_tokens,
                concurrency=self.body.concurrency,
                metadata={"rebase": self.id, "split": split},
            )
            run_id = (await evals.create_run(self.body.eval_id, body, self.caller))["id"]
            setattr(entry, field, run_id)
            self._note(f"{v}: {split} run {run_id} over {', '.join(models)} ({len(items)} items)")
        while True:
            run = evals.store.run(run_id)
            if run is None:
                raise RuntimeError(f"eval run {run_id} was deleted")
            if run["status"] not in ACTIVE:
                break
            try:
                self._check_canceled()
            except Canceled:
                evals.cancel(run["eval_id"], run_id)
                raise
            await asyncio.sleep(POLL_SECONDS)
        if run["status"] != "completed":
            raise RuntimeError(f"eval run {run_id} ended {run['status']}: {run['error']}")
        return evals.public_run(run)

    async def _promote(self) -> None:
        """Move every alias routing to a passing variant onto its transferred one, step by step."""
        report, steps = self.report, self.body.promote.steps
        moving = {v: e.variant for v, e in report.variants.items() if e.gate and e.gate.passed}
        aliases = {n: a for n, a in self.registry.state.aliases.items() if self.caller.may_manage(n)}
        routed = any(t.variant in moving for a in aliases.values() for t in a.targets)
        if not routed and not report.aliases_before:
            self._note(
                f"nothing to promote: no alias routes to {sorted(moving)}"
                if moving
                else "nothing to promote: no variant passed its gate"
            )
            return
        if report.aliases_before:  # resumed mid-promotion: start again from the aliases as they were
            self.restore_aliases("resumed")
            report.promotion_step = 0
        else:
            report.aliases_before = {
                a.name: [t.model_dump() for t in a.targets]
                for a in aliases.values()
                if any(t.variant in moving for t in a.targets)
            }
            self._note(f"promoting {sorted(moving)} through aliases {sorted(report.aliases_before)}")
        for k, percent in enumerate(steps):
            self._check_canceled()
            for alias, before in report.aliases_before.items():
                original = [AliasTarget(**t) for t in before]
                self.registry.set_alias(alias, _moved(original, moving, percent), previous=original)
            report.promotion_step = k + 1
            self._note(f"step {k + 1}/{len(steps)}: {percent:g}% on the transferred variants")
            if percent < 100:
                await self._hold(self.body.promote.hold_seconds)
        for v in moving:
            report.variants[v].promoted = bool(report.variants[v].aliases)

    async def _hold(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check_canceled()
            await asyncio.sleep(min(POLL_SECONDS, max(0.0, end - time.monotonic())))

    def restore_aliases(self, why: str) -> None:
        """Put every alias this rebase moved back to its targets before the rebase."""
        for alias, before in self.report.aliases_before.items():
            if alias in self.registry.state.aliases:
                self.registry.set_alias(alias, [AliasTarget(**t) for t in before])
        if self.report.aliases_before and self.report.promotion_step:
            self._note(f"{why}: aliases {sorted(self.report.aliases_before)} back to their targets before")


def _candidate_names(variant: str, body: RebaseCreate) -> dict[str, str]:
    """α → the candidate variant's name (with one α, the final name)."""
    final = f"{variant}:{body.to_base}"
    if len(body.alphas) == 1:
        return {str(body.alphas[0]): final}
    return {str(a): f"{final}:a{a:g}" for a in body.alphas}


def _phase_runs(report: RebaseReport) -> list[str]:
    field = {"validating": "validation_run", "evaluating": "holdout_run"}.get(report.phase)
    return [getattr(e, field) for e in report.variants.values() if field and getattr(e, field)]


def _score(run: RunPublic, variant: str, criterion: str) -> Score:
    result = run.per_variant[variant]
    if criterion in result.criteria:
        c = result.criteria[criterion]
        return Score(value=c.score, ci95=c.ci95, n=c.n)
    m = result.metrics[criterion]
    return Score(value=m.value, ci95=m.ci95, n=m.n)


def _verdict(body: RebaseCreate, lower_is_better: bool, entry: VariantReport) -> Verdict:
    """The user's gate on the held-out scores: improvement (better is positive) and ratio."""
    gate, reasons, passed = body.gate, [], True
    diff, before, after = entry.difference, entry.scores["from"].value, entry.scores["candidate"].value
    if gate.min_difference is not None:
        low = -diff.ci95[1] if lower_is_better else diff.ci95[0]
        ok = low >= gate.min_difference
        passed &= ok
        reasons.append(
            f"paired improvement's 95% lower bound {low:+.4f} {'≥' if ok else '<'} "
            f"{gate.min_difference:+.4f} (n = {diff.n})"
        )
    if gate.min_ratio is not None:
        ok = after <= before / gate.min_ratio if lower_is_better else after >= gate.min_ratio * before
        passed &= ok
        relation = "≤ θ's ÷" if lower_is_better else "≥ θ's ×"
        relation = relation if ok else "not " + relation
        reasons.append(f"{after:.4f} {relation} {gate.min_ratio:g} ({before:.4f})")
    return Verdict(passed=passed, reasons=reasons)


def _moved(targets: list[AliasTarget], moving: dict[str, str], percent: float) -> list[AliasTarget]:
    """`targets` with `percent`% of each moving variant's weight on its replacement."""
    weights: dict[str, float] = {}
    for t in targets:
        if t.variant in moving:
            share = t.weight * percent / 100
            if percent < 100:
                weights[t.variant] = weights.get(t.variant, 0.0) + t.weight - share
            weights[moving[t.variant]] = weights.get(moving[t.variant], 0.0) + share
        else:
            weights[t.variant] = weights.get(t.variant, 0.0) + t.weight
    return [AliasTarget(variant=v, weight=w) for v, w in weights.items()]
