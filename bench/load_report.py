"""The load benchmark's report (bench/load.py): summary.json, the markdown table, the plots."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from load_harness import Run, say  # noqa: E402


def report(runs: list[Run], work: Path, args) -> None:
    """summary.json, summary.md (printed), and the two plots."""
    (work / "summary.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    lines = [
        f"load on {args.model}: {args.num_prompts} requests per run, {args.output_len} output tokens, "
        f"closed-loop concurrency {args.concurrency}",
        "",
        "| run | target | models | schedule | rate req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | swaps "
        "| failed | exact | wrong variant | diverged |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        rate = "closed" if r.rate == float("inf") else f"{r.rate:g}"
        lines.append(
            f"| {r.name} | {r.target} | {len(r.models)} | {r.schedule or '-'} | {rate} | {r.tok_s:.1f} | "
            f"{r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | {r.swaps} | {r.failed} | {r.exact} | "
            f"{r.wrong_variant} | {r.diverged} |"
        )
    overhead = {
        t: [r for r in runs if r.scenario == "overhead" and r.target == t] for t in ("direct", "gateway")
    }
    if overhead["direct"] and overhead["gateway"]:
        med, p50 = _medians(overhead)
        lines += [
            "",
            f"overhead: gateway/direct throughput {100 * med['gateway'] / med['direct']:.1f}% "
            f"({med['gateway']:.1f} vs {med['direct']:.1f} tok/s), TTFT p50 {p50['gateway']:.0f} vs "
            f"{p50['direct']:.0f} ms (medians of {len(overhead['direct'])} alternating runs each)",
        ]
    single = next((r for r in runs if r.name == "mixed-1"), None)
    if single:
        for r in runs:
            if r.scenario == "mixed" and r is not single:
                lines.append(
                    f"{r.name}: {100 * r.tok_s / single.tok_s:.0f}% of single-variant throughput, "
                    f"TTFT p99 x{r.ttft_p99_ms / single.ttft_p99_ms:.1f}"
                )
    for scenario, what in (("eval", "an eval run"), ("rebase", "a rebase")):
        key = f"with-{scenario}"
        beside = {k: [r for r in runs if r.scenario == scenario and r.schedule == k] for k in (key, "alone")}
        if beside[key] and beside["alone"]:
            tok, p50 = _medians(beside)
            lines.append(
                f"online beside {what}: TTFT p50 {p50[key]:.0f} vs {p50['alone']:.0f} ms alone, "
                f"{tok[key]:.1f} vs {tok['alone']:.1f} tok/s (medians of {len(beside['alone'])} runs)"
            )
    lines += (
        _priority_lines(runs)
        + _policy_lines(runs)
        + _bound_lines(runs)
        + _swap_lines(runs)
        + _lane_lines(runs)
        + _replica_lines(runs)
    )
    checked = [r for r in runs if r.target == "gateway"]
    lines.append(
        f"answers checked: {sum(r.exact for r in checked)} exact, "
        f"{sum(r.wrong_variant for r in checked)} wrong-variant, {sum(r.diverged for r in checked)} "
        f"diverged; failed requests: {sum(r.failed for r in runs)}"
    )
    text = "\n".join(lines)
    (work / "summary.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    plot(runs, work)
    say(f"results in {work}")


def _priority_lines(runs: list[Run]) -> list[str]:
    """Priorities on: online TTFT beside each background job against alone (medians of the repeats),
    and how long each job took to finish after the online load."""
    alone = [r for r in runs if r.scenario == "priorities" and r.schedule == "alone"]
    if not alone:
        return []
    p99 = statistics.median(r.ttft_p99_ms for r in alone)
    tok = statistics.median(r.tok_s for r in alone)
    lines = [
        f"priorities on, online alone: TTFT p99 {p99:.0f} ms, {tok:.1f} tok/s (median of {len(alone)} runs)"
    ]
    for what in ("rebase", "eval", "batch"):
        beside = [r for r in runs if r.scenario == "priorities" and r.schedule == f"with-{what}"]
        if beside:
            b99 = statistics.median(r.ttft_p99_ms for r in beside)
            done = ", ".join(f"{r.background_done_s:.0f}" for r in beside)
            lines.append(
                f"priorities on, online beside a {what}: TTFT p99 {b99:.0f} ms (x{b99 / p99:.2f} of alone), "
                f"{statistics.median(r.tok_s for r in beside):.1f} tok/s; the {what} completed {done} s "
                f"after the online load (medians of {len(beside)} runs)"
            )
    return lines


def _policy_lines(runs: list[Run]) -> list[str]:
    """Per swap quantum: two variants' throughput and TTFT against one variant's, medians of repeats."""
    lines = []
    quanta = sorted(
        {r.name.split("-")[1] for r in runs if r.scenario == "policy"}, key=lambda q: float(q[1:])
    )
    for q in quanta:
        groups = {k: [r for r in runs if r.name.startswith(f"policy-{q}-{k}-")] for k in ("1", "2")}
        tok, p50 = _medians(groups)
        p99 = {k: statistics.median(r.ttft_p99_ms for r in rs) for k, rs in groups.items()}
        swaps = statistics.median(r.swaps for r in groups["2"])
        lines.append(
            f"policy quantum {q[1:]} s: 2 variants {100 * tok['2'] / tok['1']:.0f}% of 1-variant throughput "
            f"({tok['2']:.1f} vs {tok['1']:.1f} tok/s), TTFT p50 {p50['2']:.0f} vs {p50['1']:.0f} ms, p99 "
            f"{p99['2']:.0f} vs {p99['1']:.0f} ms (x{p99['2'] / p99['1']:.1f}), {swaps:g} swaps "
            f"(medians of {len(groups['1'])} repeats)"
        )
    return lines


def _bound_lines(runs: list[Run]) -> list[str]:
    """One variant's throughput at 2/3 of the streams against all of them (alternation_bound)."""
    by_c: dict[int, list[Run]] = {}
    for r in runs:
        if r.scenario == "bound":
            by_c.setdefault(int(r.name.split("-")[1][1:]), []).append(r)
    if len(by_c) != 2:
        return []
    low, high = sorted(by_c)
    tok = {c: statistics.median(r.tok_s for r in v) for c, v in by_c.items()}
    answer = statistics.median(r.answer_p50_ms for r in by_c[low])
    first = statistics.median(r.ttft_p50_ms for r in by_c[low])
    p99 = statistics.median(r.ttft_p99_ms for r in by_c[high])
    return [
        f"alternation bound: one variant at concurrency {low}: {tok[low]:.1f} tok/s, "
        f"{100 * tok[low] / tok[high]:.0f}% of concurrency {high} ({tok[high]:.1f} tok/s): two "
        f"variants in lockstep waves can reach at most about this share (medians of {len(by_c[low])} runs)",
        f"alternation bound: a request arriving as the other variant's answers start waits for their "
        f"tokens after the first ({answer:.0f} ms at concurrency {low}) and then its own first token "
        f"({first:.0f} ms): {(answer + first) / p99:.1f}x one variant's TTFT p99 at concurrency {high} "
        f"({p99:.0f} ms)",
    ]


def _paired(runs: list[Run], prefix: str, modes: tuple[str, str]):
    """Runs named PREFIX-MODE-K-REP grouped by (mode, K variants), with each group's median output
    tok/s, TTFT p50 and p99; None unless every group has runs."""
    groups = {
        (mode, k): [r for r in runs if r.name.startswith(f"{prefix}-{mode}-{k}-")]
        for mode in modes
        for k in ("1", "2")
    }
    if not all(groups.values()):
        return None

    def median(attr: str) -> dict:
        return {key: statistics.median(getattr(r, attr) for r in rs) for key, rs in groups.items()}

    return groups, median("tok_s"), median("ttft_p50_ms"), median("ttft_p99_ms")


def _swap_lines(runs: list[Run]) -> list[str]:
    """Per swap design: two variants against one on the same engine."""
    paired = _paired(runs, "swaps", ("before", "after"))
    if paired is None:
        return []
    groups, tok, p50, p99 = paired
    lines = []
    for mode in ("before", "after"):
        two, one = (mode, "2"), (mode, "1")
        swaps = statistics.median(r.swaps for r in groups[two])
        exact = sum(r.exact for r in groups[two] + groups[one])
        total = sum(r.requests for r in groups[two] + groups[one])
        lines.append(
            f"swaps {mode}: 2 variants {tok[two]:.1f} tok/s = {100 * tok[two] / tok[one]:.0f}% of 1 variant "
            f"({tok[one]:.1f} tok/s); TTFT p50 {p50[two]:.0f} vs {p50[one]:.0f} ms, p99 {p99[two]:.0f} vs "
            f"{p99[one]:.0f} ms; {swaps:g} swaps; {exact}/{total} answers exact "
            f"(medians of {len(groups[two])} repeats)"
        )
    return lines


def _lane_lines(runs: list[Run]) -> list[str]:
    """Per lane: two low-rank variants against one, and against one on the swap lane (no LoRA use)."""
    paired = _paired(runs, "lanes", ("adapter", "swap"))
    if paired is None:
        return []
    groups, tok, p50, p99 = paired
    single = ("swap", "1")
    lines = []
    for lane in ("adapter", "swap"):
        two, one = (lane, "2"), (lane, "1")
        swaps = statistics.median(r.swaps for r in groups[two])
        lines.append(
            f"lane {lane}: 2 low-rank variants {tok[two]:.1f} tok/s = {100 * tok[two] / tok[one]:.0f}% "
            f"of 1 variant on this lane ({tok[one]:.1f}), {100 * tok[two] / tok[single]:.0f}% of 1 variant "
            f"by swap; TTFT p50 {p50[two]:.0f} ms, p99 {p99[two]:.0f} ms "
            f"(x{p99[two] / p99[single]:.1f} of 1 variant by swap), "
            f"{swaps:g} swaps (medians of {len(groups[two])} repeats)"
        )
    return lines


def _replica_lines(runs: list[Run]) -> list[str]:
    """One engine vs Ray Serve with two: each against one engine serving one variant."""
    paired = _paired(runs, "replicas", ("one", "ray"))
    if paired is None:
        return []
    groups, tok, _, p99 = paired
    ref = ("one", "1")
    lines = [
        f"{'one engine' if mode == 'one' else 'Ray, 2 replicas'}, {k} variant(s): {tok[mode, k]:.1f} tok/s = "
        f"{100 * tok[mode, k] / tok[ref]:.0f}% of one engine with one variant; "
        f"TTFT p99 {p99[mode, k]:.0f} ms (x{p99[mode, k] / p99[ref]:.1f}) "
        f"(medians of {len(groups[mode, k])} repeats)"
        for mode in ("one", "ray")
        for k in ("1", "2")
    ]
    for r in runs:
        if r.name == "replicas-kill":
            lines.append(
                f"Ray, an engine killed mid-run: {r.failed} failed of {r.requests} requests, "
                f"{r.failed_after_kill} of them started after the kill; answers exact {r.exact}, "
                f"wrong variant {r.wrong_variant}, diverged {r.diverged}"
            )
    return lines


def _medians(groups: dict[str, list[Run]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per group: the median output tok/s and the median TTFT p50 of its runs."""
    tok = {k: statistics.median(r.tok_s for r in rs) for k, rs in groups.items()}
    p50 = {k: statistics.median(r.ttft_p50_ms for r in rs) for k, rs in groups.items()}
    return tok, p50


def plot(runs: list[Run], work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for scenario, marker in (
        ("overhead", "o"),
        ("mixed", "s"),
        ("poisson", "^"),
        ("change", "D"),
        ("eval", "x"),
        ("rebase", "X"),
        ("policy", "P"),
        ("lanes", "*"),
        ("replicas", "v"),
    ):
        rs = [r for r in runs if r.scenario == scenario]
        if rs:
            ax.scatter(
                [r.tok_s for r in rs], [r.ttft_p99_ms / 1000 for r in rs], marker=marker, label=scenario
            )
            for r in rs:
                ax.annotate(
                    r.name.removeprefix(f"{scenario}-"),
                    (r.tok_s, r.ttft_p99_ms / 1000),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set(xlabel="output tokens/s", ylabel="TTFT p99 (s)", title="Throughput vs p99 TTFT per run")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(work / "throughput_vs_ttft.png", dpi=120)
    plt.close(fig)
    mixed = next((r for r in runs if r.name == "mixed-2-random"), None)
    timeline(mixed or next((r for r in runs if r.name.startswith("policy-q2-2-")), None), work, plt)


def timeline(run: Run | None, work: Path, plt) -> None:
    """Per-request TTFT, requests in flight and swaps over the run (monotonic clock, shared)."""
    if run is None:
        return
    r = json.loads((work / "runs" / f"{run.name}.json").read_text())
    t0 = min(r["start_times"])
    starts = [s - t0 for s in r["start_times"]]
    ends = [s + lat for s, lat in zip(starts, r["latencies"], strict=True)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    models = sorted(set(run.models))
    per_request = _schedule_of(work, run)
    for m in models:
        xs = [s for s, mm in zip(starts, per_request, strict=True) if mm == m]
        ys = [t for t, mm in zip(r["ttfts"], per_request, strict=True) if mm == m]
        top.scatter(xs, ys, s=14, label=m)
    top.set(ylabel="TTFT (s)", title=f"{run.name}: {len(models)} variants, closed loop, swaps shaded")
    points = sorted([(s, 1) for s in starts] + [(e, -1) for e in ends])
    xs, ys, level = [0.0], [0], 0
    for t, d in points:
        level += d
        xs.append(t)
        ys.append(level)
    bottom.step(xs, ys, where="post", color="black", linewidth=1)
    bottom.set(xlabel="seconds since the first request", ylabel="requests in flight (client)")
    for i, swap in enumerate(run.swap_events):
        for axis in (top, bottom):
            axis.axvspan(
                swap["started_monotonic"] - t0,
                swap["started_monotonic"] - t0 + swap["seconds"],
                color="tab:red",
                alpha=0.25,
                label="swap" if i == 0 and axis is top else None,
            )
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "timeline.png", dpi=120)
    plt.close(fig)


def _schedule_of(work: Path, run: Run) -> list[str]:
    return json.loads((work / "runs" / f"{run.name}.schedule.json").read_text())
