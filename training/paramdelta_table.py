"""The ParamΔ table, measured through the gateway's API: a runtime base, transferred deltas, eval runs.

    .venv/bin/python -m training.paramdelta_table [--cache .cache] [--seeds 0 1 2] [--tasks 200]
        [--gsm8k 200] [--out docs/guides/paramdelta.md]

Models (all fp32 SmolLM2-135M, all trained on this CPU, all cached under --cache):
    θ           SmolLM2-135M-Instruct                         start-up base `smollm2`
    θ_post,s    θ fine-tuned on two-digit addition, seed s    variant `sft-s{s}`  = θ + Δ_s (exact)
    θ′          θ + continued pre-training on Python source   runtime base `smollm2-py` (POST /v1/bases)
    ParamΔ      θ′ + α·Δ_s                                     variant `paramdelta-{α}-s{s}` (transferred)
    θ′_sft,s    θ′ fine-tuned with the same recipe, seed s     variant `py-sft-s{s}` = θ′ + Δ′_s (exact)

Everything after training goes through the HTTP API of one `deltagate serve --base smollm2=θ`:
θ′ is registered while serving and hot-loaded by θ's engine; the scores are eval runs (paired,
on the same items); θ′ + Δ₀ is also compared with stock vLLM serving the offline merge.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import httpx

from deltas import DeltaTerm, Recipe, extract_delta
from loaders.engine import EngineProcess, EngineSpec, free_port, wait_healthy
from loaders.merge import write_merged_checkpoint
from server import launch
from server.evals.addition import addition_split
from training.corpora import chunks, general_files, python_files
from training.cpt import CPTConfig, continue_pretraining
from training.default import DEFAULT_SFT, prepare_default
from training.evaluate import perplexity
from training.sft import finetune

CPT = CPTConfig()
ALPHAS = (0.5, 1.0, 1.5)
ADMIN = "paramdelta-table"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def build(cache: Path, seeds: list[int], log=print) -> dict:
    """Train (or reuse) every model of the table; return checkpoint dirs and delta paths."""
    sft = {s: replace(DEFAULT_SFT, seed=s) for s in seeds}
    posts = {s: prepare_default(cache, log, sft[s]) for s in seeds}
    base = posts[seeds[0]].base
    updated = cache / "models" / f"{base.name}-cpt-s{CPT.steps}-b{CPT.batch_size}-seed{CPT.seed}"
    if not (updated / "model.safetensors").is_file():
        log(f"continued pre-training on Python source ({CPT.steps} steps)")
        continue_pretraining(base, updated, CPT, log)
    updated_deltas = {}
    for s in seeds:
        out = cache / "models" / f"{updated.name}-addition-s{sft[s].steps}-seed{s}"
        if not (out / "model.safetensors").is_file():
            log(f"fine-tuning the updated base with the same recipe, seed {s}")
            finetune(updated, out, addition_split(2000, seed=s), sft[s], log)
        updated_deltas[s] = cache / "deltas" / f"{out.name}.safetensors"
        if not updated_deltas[s].is_file():
            extract_delta(updated, out, updated_deltas[s])
    return {
        "base": base,
        "updated": updated,
        "deltas": {s: posts[s].delta for s in seeds},
        "updated_deltas": updated_deltas,
    }


def api(method: str, url: str, body: dict | None = None) -> dict:
    """One admin-API call on the gateway these reports start; RuntimeError on a 4xx/5xx."""
    r = httpx.request(method, url, json=body, headers=AUTH, timeout=600)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {url}: {r.status_code} {r.text}")
    return r.json() if r.content else {}


def start_gateway(base: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """`deltagate serve --base smollm2=BASE` on a free port with state in `work`, once healthy."""
    port = free_port()
    proc = launch.start_gateway(port, work, work / "gateway.log", ADMIN, "--base", f"smollm2={base}")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, 1800, "gateway", work / "gateway.log")
    return proc, url


def serve(paths: dict, work: Path, log=print) -> tuple[subprocess.Popen, str]:
    """Start the gateway on θ, then add θ′, the deltas and every variant through the API."""
    proc, url = start_gateway(paths["base"], work)
    have = {b["name"] for b in api("GET", f"{url}/v1/bases")["data"]}
    if "smollm2-py" not in have:
        base = api("POST", f"{url}/v1/bases", {"name": "smollm2-py", "path": str(paths["updated"])})
        log(f"registered θ′ as smollm2-py: engine group {base['group']}, state {base['state']}")
    have = {d["name"] for d in api("GET", f"{url}/v1/deltas")["data"]}
    variants = {v["name"] for v in api("GET", f"{url}/v1/variants")["data"]}
    for s, delta in paths["deltas"].items():
        for name, path in ((f"addition-s{s}", delta), (f"py-addition-s{s}", paths["updated_deltas"][s])):
            if name not in have:
                api("POST", f"{url}/v1/deltas", {"name": name, "path": str(path)})
        wanted = {
            f"sft-s{s}": ("smollm2", f"addition-s{s}", 1.0),
            f"py-sft-s{s}": ("smollm2-py", f"py-addition-s{s}", 1.0),
        }
        wanted |= {f"paramdelta-{a}-s{s}": ("smollm2-py", f"addition-s{s}", a) for a in ALPHAS}
        for name, (base, delta, alpha) in wanted.items():
            if name not in variants:
                body = {"name": name, "base": base, "deltas": [{"delta": delta, "alpha": alpha}]}
                v = api("POST", f"{url}/v1/variants", body)
                log(f"variant {name}: {base} + {alpha}·{delta} ({v['deltas'][0]['provenance']})")
    return proc, url


PROMPTS = [
    "What is 37 + 45? Answer with the number only.",
    "What is the capital of France?",
    "def fibonacci(n):",
]


def _greedy(url: str, model: str) -> list[dict]:
    out = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 1}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        out.append({"tokens": lp["tokens"], "token_logprobs": lp["token_logprobs"]})
    return out


def check_exact(url: str, paths: dict, seed: int, work: Path, log=print) -> str:
    """Served θ′ + Δ against stock vLLM serving `deltagate merge --base θ′ --delta Δ`."""
    merged = work / f"merged-paramdelta-1.0-s{seed}"
    if not (merged / "model.safetensors").is_file():
        recipe = Recipe(base=str(paths["updated"]), deltas=[DeltaTerm(path=str(paths["deltas"][seed]))])
        write_merged_checkpoint(recipe, merged)
    served = _greedy(url, f"paramdelta-1.0-s{seed}")
    spec = EngineSpec(model=str(merged), served_name="ref", max_model_len=2048, log_path=work / "ref.log")
    stock = EngineProcess(spec, with_extension=False)
    stock.start()
    try:
        stock.wait_ready(timeout=900)
        reference = _greedy(stock.url, "ref")
    finally:
        stock.stop()
    same = sum(a == b for a, b in zip(served, reference, strict=True))
    diff = max(
        abs(x - y)
        for a, b in zip(served, reference, strict=True)
        for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=False)
    )
    line = (
        f"served `paramdelta-1.0-s{seed}` vs stock vLLM on the offline merge: {same}/{len(PROMPTS)} "
        f"prompts identical (16 greedy tokens and logprobs), max |Δ logprob| = {diff:.3g}"
    )
    log(line)
    return line


def run_eval(
    url: str, source: dict, variants: list[str], max_tokens: int, limit: int | None, log=print
) -> dict:
    """One eval run over `variants` (paired, same items); progress printed while it runs."""
    ev = api("POST", f"{url}/v1/evals", {"name": f"paramdelta-{source['task']}", "data_source": source})
    body = {"variants": variants, "max_tokens": max_tokens, "limit": limit, "concurrency": 8}
    run = api("POST", f"{url}/v1/evals/{ev['id']}/runs", body)
    start, last = time.monotonic(), -1
    while run["status"] not in ("completed", "failed", "canceled"):
        time.sleep(5)
        run = api("GET", f"{url}/v1/evals/{ev['id']}/runs/{run['id']}")
        done = run["progress"]["done"]
        if done != last:
            log(
                f"  {source['task']}: {done}/{run['progress']['total']} answers "
                f"({time.monotonic() - start:.0f}s)"
            )
            last = done
    if run["status"] != "completed":
        raise RuntimeError(f"eval run {run['id']} {run['status']}: {run.get('error')}")
    return run


def _pct(c: dict) -> str:
    lo, hi = c["ci95"]
    return f"{c['score']:.1%} [{lo:.1%}, {hi:.1%}]"


def _diff(c: dict) -> str:
    """A run's comparison is variant − baseline; the tables read baseline (ParamΔ) − the other model."""
    diff, lo, hi = (-x + 0.0 for x in (c["difference"], c["ci95"][1], c["ci95"][0]))  # + 0.0: no "-0.0%"
    return f"{diff:+.1%} [{lo:+.1%}, {hi:+.1%}]"


LABELS = {"smollm2": "θ", "smollm2-py": "θ′"}


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    kind, _, seed = name.rpartition("-s")
    if kind == "sft":
        return f"θ_post (seed {seed})"
    if kind == "py-sft":
        return f"θ′_sft (seed {seed})"
    return f"θ′ + {kind.split('-')[1]}·Δ (seed {seed})"


def addition_tables(runs: dict[int, dict], criterion: str = "exact_match") -> str:
    """Scores per model and seed, and the paired differences, as markdown."""
    lines = ["| model | served as | seed | exact match [95% CI] |", "|---|---|---|---|"]
    for seed, run in runs.items():
        for name, result in run["per_variant"].items():
            if name in LABELS and seed != next(iter(runs)):
                continue  # θ and θ′ do not depend on the seed; shown once
            c = result["criteria"][criterion]
            lines.append(f"| {_label(name)} | `{name}` | {seed if name not in LABELS else '–'} | {_pct(c)} |")
    lines += [
        "",
        "Paired differences on the same items (ParamΔ α = 1 minus the other model, 95% CI):",
        "",
        "| seed | ParamΔ(1.0) − θ_post | ParamΔ(1.0) − θ′_sft | ParamΔ(1.0) − θ′ "
        "| ParamΔ(1.0) − ParamΔ(0.5) | ParamΔ(1.0) − ParamΔ(1.5) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, run in runs.items():
        by = {c["variant"]: c for c in run["comparisons"] if c["criterion"] == criterion}
        cols = [
            f"sft-s{seed}",
            f"py-sft-s{seed}",
            "smollm2-py",
            f"paramdelta-0.5-s{seed}",
            f"paramdelta-1.5-s{seed}",
        ]
        lines.append(f"| {seed} | " + " | ".join(_diff(by[c]) for c in cols) + " |")
    return "\n".join(lines)


def gsm8k_table(run: dict) -> str:
    lines = ["| model | served as | strict match [95% CI] | flexible match [95% CI] |", "|---|---|---|---|"]
    for name, result in run["per_variant"].items():
        c = result["criteria"]
        lines.append(
            f"| {_label(name)} | `{name}` | {_pct(c['strict_match'])} | {_pct(c['flexible_match'])} |"
        )
    lines += [
        "",
        f"Paired differences, `{next(iter(run['per_variant']))}` minus each model (95% CI):",
        "",
        "| other model | strict | flexible |",
        "|---|---|---|",
    ]
    by: dict[str, dict] = {}
    for c in run["comparisons"]:
        by.setdefault(c["variant"], {})[c["criterion"]] = c
    for name, crit in by.items():
        lines.append(f"| `{name}` | {_diff(crit['strict_match'])} | {_diff(crit['flexible_match'])} |")
    return "\n".join(lines)


def perplexity_table(url: str, tokenizer_dir: Path, models: list[str], n: int, window: int, log=print) -> str:
    """Held-out Python source (the domain θ′ was trained on) and general text, per model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    code, general = (
        chunks(tok, python_files(held_out=True), window, n),
        chunks(tok, general_files(), window, n),
    )
    lines = [
        f"| model | served as | Python ppl ({n}×{window} tok, held out) | general ppl (licenses) |",
        "|---|---|---|---|",
    ]
    for model in models:
        pc, pg = perplexity(url, model, code), perplexity(url, model, general)
        log(f"  perplexity {model}: {pc:.3f} / {pg:.3f}")
        lines.append(f"| {_label(model)} | `{model}` | {pc:.3f} | {pg:.3f} |")
    return "\n".join(lines)


def rerender(out: Path, runs_json: Path) -> None:
    """Rewrite the addition and GSM8K tables of `out` from a finished run's runs.json (no serving)."""
    saved = json.loads(runs_json.read_text())
    runs = {int(k): v for k, v in saved["addition"].items()}
    text = out.read_text()
    start = text.index("| model | served as | seed |")
    text = text[:start] + addition_tables(runs) + text[text.index("\n\n### GSM8K", start) :]
    if saved["gsm8k"]:
        start = text.index("| model | served as | strict match")
        text = text[:start] + gsm8k_table(saved["gsm8k"]) + text[text.index("\n\n### Perplexity", start) :]
    out.write_text(text)


def write_doc(out: Path, section: str) -> None:
    """Replace the measured section of `out` (between the result markers), keeping the prose."""
    text = out.read_text() if out.is_file() else f"{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="SFT seeds")
    parser.add_argument("--tasks", type=int, default=200, help="held-out addition problems (≤ 200)")
    parser.add_argument("--gsm8k", type=int, default=200, help="GSM8K test problems (0: skip)")
    parser.add_argument("--windows", type=int, default=10, help="held-out text windows per corpus")
    parser.add_argument("--window-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--out", type=Path, default=Path("docs/guides/paramdelta.md"))
    parser.add_argument("--rerender", action="store_true", help="only rewrite the tables from runs.json")
    args = parser.parse_args()
    if args.rerender:
        rerender(args.out, args.cache / "paramdelta-gateway" / "runs.json")
        return
    started = time.monotonic()
    paths = build(args.cache, args.seeds)
    work = args.cache / "paramdelta-gateway"
    work.mkdir(parents=True, exist_ok=True)
    proc, url = serve(paths, work)
    try:
        exact = check_exact(url, paths, args.seeds[0], work)
        runs = {}
        for s in args.seeds:
            print(f"addition, seed {s}")
            variants = [
                f"paramdelta-1.0-s{s}",
                f"sft-s{s}",
                f"py-sft-s{s}",
                "smollm2-py",
                f"paramdelta-0.5-s{s}",
                f"paramdelta-1.5-s{s}",
                "smollm2",
            ]
            runs[s] = run_eval(url, {"type": "builtin", "task": "addition"}, variants, 8, args.tasks)
        s0 = args.seeds[0]
        gsm = None
        if args.gsm8k:
            print("gsm8k")
            variants = [f"paramdelta-1.0-s{s0}", f"sft-s{s0}", f"py-sft-s{s0}", "smollm2-py", "smollm2"]
            gsm = run_eval(url, {"type": "builtin", "task": "gsm8k"}, variants, 256, args.gsm8k)
        print("perplexity")
        ppl_models = [
            "smollm2",
            "smollm2-py",
            f"sft-s{s0}",
            *(f"paramdelta-{a}-s{s0}" for a in ALPHAS),
            f"py-sft-s{s0}",
        ]
        ppl = perplexity_table(url, paths["base"], ppl_models, args.windows, args.window_len)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    (work / "runs.json").write_text(json.dumps({"addition": runs, "gsm8k": gsm}, indent=1))
    section = "\n\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} in {(time.monotonic() - started) / 60:.0f} minutes with "
            f"`python -m training.paramdelta_table --seeds {' '.join(map(str, args.seeds))} "
            f"--tasks {args.tasks} --gsm8k {args.gsm8k}`.",
            f"Exactness: {exact}.",
            f"### Addition (n = {args.tasks} held-out problems, greedy, exact match)",
            addition_tables(runs),
            *([f"### GSM8K (n = {args.gsm8k}, 5-shot, greedy, 256 tokens)", gsm8k_table(gsm)] if gsm else []),
            "### Perplexity (seed 0): does θ′'s domain gain survive the delta?",
            ppl,
        ]
    )
    write_doc(args.out, section)
    print(section)


if __name__ == "__main__":
    main()
