"""What a run's graded items add up to: per-variant scores with intervals, paired differences, pages."""

from __future__ import annotations

from server.evals.schemas import (
    Comparison,
    CriterionResult,
    MetricResult,
    OutputItem,
    OutputItems,
    RunCreate,
    RunPublic,
    VariantResult,
)
from server.evals.stats import RatioMetric, bootstrap, paired_difference, wilson
from server.evals.store import EvalStore


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
    return RunPublic(
        id=run["id"],
        eval_id=run["eval_id"],
        status=run["status"],
        error=run["error"],
        created_at=int(run["created_at"]),
        progress={"done": len(items), "total": run["total"]},
        result_counts=counts,
        per_variant=per_variant,
        comparisons=comparisons,
        measured=measured,
    )


def _metric(metric: RatioMetric, scores: list[dict]) -> MetricResult:
    value, ci = bootstrap(metric, scores)
    return MetricResult(value=value, n=len(scores), ci95=ci)


def output_items(store: EvalStore, run_id: str, status: str | None, after: int, limit: int) -> OutputItems:
    """A page of graded items (ids increase; pass the last id as `after` for the next page)."""
    rows = store.items(run_id, status, after, limit + 1)
    page = [
        OutputItem(
            id=r["seq"],
            variant=r["variant"],
            index=r["idx"],
            status=r["status"],
            input=r["input"],
            output=r["output"],
            grades=r["grades"],
            scores=r["scores"],
            error=r["error"],
        )
        for r in rows[:limit]
    ]
    return OutputItems(data=page, has_more=len(rows) > limit)
