"""What a run's graded items add up to: per-variant scores with intervals, paired differences, pages."""

from __future__ import annotations

from server.evals.graders import render
from server.evals.schemas import (
    Comparison,
    CriterionCounts,
    CriterionResult,
    EvalError,
    GraderResult,
    MetricResult,
    OutputItem,
    OutputItems,
    RunCreate,
    RunPublic,
    VariantResult,
)
from server.evals.stats import RatioMetric, bootstrap, paired_difference, wilson
from server.evals.store import EvalStore
from server.evals.tasks import TaskSpec


def run_result(store: EvalStore, run: dict) -> RunPublic:
    """Status, progress, counts, per-variant scores with intervals, paired differences."""
    body = RunCreate.model_validate(run["body"])
    graders = [g["name"] for g in run["measured"]["graders"]]
    metrics = [RatioMetric(**m) for m in run["measured"].get("metrics", [])]
    items = store.items(run["id"])
    by_variant: dict[str, dict[int, dict]] = {v: {} for v in body.variants}
    for it in items:
        by_variant.setdefault(it["variant"], {})[it["idx"]] = it
    per_variant = {}
    for v, rows in by_variant.items():
        ok = [r for r in rows.values() if r["status"] != "error"]
        criteria = {}
        for g in graders:
            passed = sum(bool(r["grades"].get(g)) for r in ok)
            criteria[g] = CriterionResult(
                passed=passed,
                n=len(ok),
                score=passed / len(ok) if ok else 0.0,
                ci95=wilson(passed, len(ok)),
            )
        scores = [r["scores"] for r in ok]
        per_variant[v] = VariantResult(
            criteria=criteria,
            metrics={m.name: _metric(m, scores) for m in metrics},
            passed=sum(r["status"] == "pass" for r in ok),
            failed=sum(r["status"] == "fail" for r in ok),
            errored=len(rows) - len(ok),
        )
    comparisons = []
    base = body.variants[0]
    for v in body.variants[1:]:
        common = [
            i
            for i in by_variant[base]
            if i in by_variant[v]
            and by_variant[base][i]["status"] != "error"
            and by_variant[v][i]["status"] != "error"
        ]
        for g in graders if common else []:
            a = [bool(by_variant[base][i]["grades"].get(g)) for i in common]
            b = [bool(by_variant[v][i]["grades"].get(g)) for i in common]
            mean, lo, hi = paired_difference(a, b)
            comparisons.append(
                Comparison(
                    criterion=g, baseline=base, variant=v, n=len(common), difference=mean, ci95=(lo, hi)
                )
            )
        for m in metrics if common else []:
            a = [by_variant[base][i]["scores"] for i in common]
            b = [by_variant[v][i]["scores"] for i in common]
            difference, ci = bootstrap(m, a, b)
            comparisons.append(
                Comparison(
                    criterion=m.name, baseline=base, variant=v, n=len(common), difference=difference, ci95=ci
                )
            )
    counts = {
        "total": run["total"],
        "passed": sum(r.passed for r in per_variant.values()),
        "failed": sum(r.failed for r in per_variant.values()),
        "errored": sum(r.errored for r in per_variant.values()),
    }
    measured = {k: v for k, v in run["measured"].items() if k != "item_indices"}
    per_criterion = [
        CriterionCounts(
            testing_criteria=g,
            passed=sum(r.criteria[g].passed for r in per_variant.values()),
            failed=sum(r.criteria[g].n - r.criteria[g].passed for r in per_variant.values()),
        )
        for g in graders
    ]
    if body.data_source is not None:  # OpenAI's shape: echoed without its items (they can be large)
        source = body.data_source.model_dump(exclude_none=True)
        source["source"] = {"type": "file_content", "items": len(body.data_source.source.content)}
    else:
        source = {"type": "variants", "variants": body.variants}
    return RunPublic(
        id=run["id"],
        eval_id=run["eval_id"],
        name=body.name or f"{measured['task']} on {', '.join(body.variants)}",
        model=",".join(body.variants),
        status=run["status"],
        error=EvalError(code="run_failed", message=run["error"]) if run["error"] else None,
        created_at=int(run["created_at"]),
        data_source=source,
        metadata=body.metadata,
        per_testing_criteria_results=per_criterion,
        progress={"done": len(items), "total": run["total"]},
        result_counts=counts,
        per_variant=per_variant,
        comparisons=comparisons,
        measured=measured,
    )


def _metric(metric: RatioMetric, scores: list[dict]) -> MetricResult:
    value, ci = bootstrap(metric, scores)
    return MetricResult(value=value, n=len(scores), ci95=ci)


def output_items(
    store: EvalStore, run: dict, task: TaskSpec, status: str | None, after: int, limit: int
) -> OutputItems:
    """A page of graded items (ids increase; pass the last id as `after` for the next page)."""
    body = RunCreate.model_validate(run["body"])
    graders = {g["name"]: g["type"] for g in run["measured"]["graders"]}
    rows = store.items(run["id"], status, after, limit + 1)
    page = []
    for r in rows[:limit]:
        item = task.items[r["idx"]] if r["idx"] < len(task.items) else {}
        if task.messages:
            asked = [{"role": m["role"], "content": render(m["content"], item)} for m in task.messages]
        else:
            asked = [{"role": "user", "content": r["input"]}]
        sample = {
            "input": asked,
            "output": [{"role": "assistant", "content": r["output"]}] if r["output"] is not None else [],
            "model": r["variant"],
            "finish_reason": None,  # not recorded
            "usage": None,  # not recorded
            "error": {"code": "item_error", "message": r["error"]} if r["error"] else None,
            "max_completion_tokens": body.max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p if body.top_p is not None else 1.0,
            "seed": body.seed,
        }
        results = [
            GraderResult(
                name=name,
                type=graders.get(name, ""),
                passed=bool(passed),
                score=r["scores"].get(name, float(bool(passed))),
            )
            for name, passed in r["grades"].items()
        ]
        page.append(
            OutputItem(
                id=str(r["seq"]),
                eval_id=run["eval_id"],
                run_id=run["id"],
                created_at=int(run["created_at"]),
                status=r["status"],
                datasource_item_id=r["idx"],
                datasource_item=item,
                results=results,
                sample=sample,
                variant=r["variant"],
                index=r["idx"],
                input=r["input"],
                output=r["output"],
                grades=r["grades"],
                scores=r["scores"],
                error=r["error"],
            )
        )
    ids = [item.id for item in page]
    return OutputItems(
        data=page,
        has_more=len(rows) > limit,
        first_id=ids[0] if ids else None,
        last_id=ids[-1] if ids else None,
    )
