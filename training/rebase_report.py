"""The rebase report on SmolLM2: one `POST /v1/rebases` moves the addition variant of θ to θ′.

    .venv/bin/python -m training.rebase_report [--cache .cache] [--validation 100] [--holdout 100]
        [--out docs/guides/rebase.md]

Models (cached under --cache, trained on this CPU the first time, as for docs/guides/paramdelta.md):
    θ    SmolLM2-135M-Instruct                                 start-up base `smollm2`
    Δ    θ fine-tuned on two-digit addition (seed 0) minus θ   variant `sft-s0` = θ + Δ
    θ′   θ continued-pre-trained on Python source              runtime base `smollm2-py`

Everything goes through the HTTP API of one `deltagate serve --base smollm2=θ`: θ′ registered while
serving, an alias `assistant` → sft-s0 that clients use, the built-in addition eval (200 held-out
problems, greedy, exact match), and two rebases: α ∈ {0.5, 1.0, 1.5} searched on a validation split
with a strict gate on a disjoint held-out split, then the chosen α with a ratio gate, promoted
through a 10% canary step.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from training.cpt import continue_pretraining
from training.default import prepare_default
from training.paramdelta_table import ADMIN, BEGIN, CPT, END, api, start_gateway

STRICT = {"criterion": "exact_match", "min_difference": -0.05}  # the paired lower bound ≥ −5 points
RATIO = {"criterion": "exact_match", "min_ratio": 0.9}  # ≥ 90% of θ + Δ's score


def serve(cache: Path, work: Path, log=print) -> tuple[subprocess.Popen, str]:
    """The gateway on θ, with θ′, the delta, sft-s0 and the alias registered through the API."""
    models = prepare_default(cache, log)
    updated = cache / "models" / f"{models.base.name}-cpt-s{CPT.steps}-b{CPT.batch_size}-seed{CPT.seed}"
    if not (updated / "model.safetensors").is_file():
        log(f"continued pre-training on Python source ({CPT.steps} steps)")
        continue_pretraining(models.base, updated, CPT, log)
    proc, url = start_gateway(models.base, work)
    api("POST", f"{url}/v1/bases", {"name": "smollm2-py", "path": str(updated)})
    api("POST", f"{url}/v1/deltas", {"name": "addition-s0", "path": str(models.delta)})
    variant = {"name": "sft-s0", "base": "smollm2", "deltas": [{"delta": "addition-s0"}]}
    api("POST", f"{url}/v1/variants", variant)
    api("PUT", f"{url}/v1/aliases/assistant", {"targets": [{"variant": "sft-s0"}]})
    return proc, url


def rebase(
    url: str,
    eval_id: str,
    args: argparse.Namespace,
    alphas: list[float],
    gate: dict,
    plot: Path | None = None,
) -> dict:
    """One rebase of sft-s0 as a user runs it, `deltagate rebase` (its progress on stderr, the job as
    JSON on stdout), and the report's plot where `plot` says."""
    flags = {"--min-difference": gate.get("min_difference"), "--min-ratio": gate.get("min_ratio")}
    cmd = [
        sys.executable,
        "-m",
        "cli",
        "rebase",
        "--from",
        "smollm2",
        "--to",
        "smollm2-py",
        "--variant",
        "sft-s0",
        "--eval",
        eval_id,
        *(f"--alpha={a}" for a in alphas),
        "--validation",
        str(args.validation),
        "--holdout",
        str(args.holdout),
        "--seed",
        "0",
        "--criterion",
        gate["criterion"],
        "--steps",
        "10,100",
        "--hold",
        "5",
        "--concurrency",
        "8",
        "--max-tokens",
        "8",
        "--url",
        url,
        "--admin-token",
        ADMIN,
        "--json",
        *(f"{flag}={value}" for flag, value in flags.items() if value is not None),
        *(["--plot", str(plot)] if plot else []),
    ]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # a failed gate exits 2, job printed
    if not done.stdout.strip():
        raise SystemExit(f"deltagate rebase printed no job (exit {done.returncode}): see its error above")
    return json.loads(done.stdout)


def markdown(strict: dict, ratio: dict, minutes: float, args: argparse.Namespace) -> str:
    """The results section of docs/guides/rebase.md: the search and the strict gate, then the ratio gate."""
    entry, second = strict["report"]["variants"]["sft-s0"], ratio["report"]["variants"]["sft-s0"]

    def pct(s: dict) -> str:
        return f"{100 * s['value']:.1f}% [{100 * s['ci95'][0]:.1f}%, {100 * s['ci95'][1]:.1f}%]"

    def verdict(job: dict, e: dict, gate: dict) -> str:
        moved = "moved to " + e["variant"] if e["promoted"] else "not moved"
        passed = "passed" if e["gate"]["passed"] else "failed"
        return (
            f"rebase `{job['id']}`, gate `{json.dumps(gate)}`: **{passed}** — "
            f"{'; '.join(e['gate']['reasons'])}. Alias `assistant`: {moved}."
        )

    rows = [
        f"| θ′ + {a}·Δ | validation | {entry['validation'][a]['n']} | {pct(entry['validation'][a])} |"
        for a in sorted(entry["validation"], key=float)
    ]
    names = {
        "from": "θ + Δ (`sft-s0`)",
        "candidate": f"θ′ + {entry['alpha']:g}·Δ (`{entry['variant']}`)",
        "to_base": "θ′ alone (`smollm2-py`)",
    }
    rows += [f"| {names[k]} | held out | {s['n']} | {pct(s)} |" for k, s in entry["scores"].items()]
    d = entry["difference"]
    log = ratio["report"]["log"]
    steps = [line.split(" ", 1)[1] for line in log if " step " in line or "promoting" in line]
    return "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} in {minutes:.0f} minutes with `python -m "
            f"training.rebase_report --validation {args.validation} --holdout {args.holdout}`.",
            "",
            "| model | split | n | exact match [95% CI] |",
            "|---|---|---|---|",
            *rows,
            "",
            f"α chosen on the validation split: **{entry['alpha']:g}**. Paired difference on the held-out "
            f"split, {entry['variant']} − sft-s0: {100 * d['value']:+.1f} points, 95% CI "
            f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (n = {d['n']}).",
            "",
            "- First, α searched, " + verdict(strict, entry, STRICT),
            f"- Then α fixed at {second['alpha']:g} (the search's choice, the same held-out items, scores "
            f"{pct(second['scores']['from'])} and {pct(second['scores']['candidate'])} again), "
            + verdict(ratio, second, RATIO)
            + " Its log: "
            + "; ".join(steps)
            + ".",
            "",
            "![the rebase report](../img/rebase-smollm2.png)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--validation", type=int, default=100, help="addition problems for the α search")
    parser.add_argument("--holdout", type=int, default=100, help="addition problems for the gate")
    parser.add_argument("--out", type=Path, default=Path("docs/guides/rebase.md"))
    args = parser.parse_args()
    work = args.cache / "rebase-report"
    if work.exists():
        subprocess.run(["rm", "-rf", str(work)], check=True)  # a fresh state dir: one rebase, one report
    work.mkdir(parents=True)
    started = time.monotonic()
    proc, url = serve(args.cache, work)
    try:
        task = {"name": "addition", "data_source": {"type": "builtin", "task": "addition"}}
        eval_id = api("POST", f"{url}/v1/evals", task)["id"]
        figure = args.out.parent.parent / "img" / "rebase-smollm2.png"  # docs/img
        strict = rebase(url, eval_id, args, [0.5, 1.0, 1.5], STRICT, plot=figure)
        chosen = strict["report"]["variants"]["sft-s0"]["alpha"]
        ratio = rebase(url, eval_id, args, [chosen], RATIO)
        question = [{"role": "user", "content": "What is 37 + 45? Answer with the number only."}]
        ask = {"model": "assistant", "max_tokens": 8, "temperature": 0, "messages": question}
        answer = httpx.post(f"{url}/v1/chat/completions", timeout=600, json=ask)
        print(
            f"assistant now served by {answer.headers.get('x-deltagate-variant')}: "
            f"{answer.json()['choices'][0]['message']['content']!r}"
        )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    both = {"strict": strict, "ratio": ratio}
    (args.out.parent / "rebase-smollm2.json").write_text(json.dumps(both, indent=1))
    text = args.out.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    section = markdown(strict, ratio, (time.monotonic() - started) / 60, args)
    args.out.write_text(text[:start] + "\n" + section + "\n" + text[end:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
