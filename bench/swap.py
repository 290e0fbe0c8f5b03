"""Swap anatomy, side by side in one run: the engine's pause per swap kind, staging, bytes moved, and
the memory floors measured inside the same engine.

    .venv/bin/python bench/swap.py                       # SmolLM2-135M fp32 + its addition delta
    .venv/bin/python bench/swap.py --model pico          # a generated pico model, seconds
    .venv/bin/python bench/swap.py --base DIR --delta F  # your model and delta

Three engines with the worker extension, on the same base, used one at a time:
- before: DELTAGATE_SWAP_MODE=full — every swap re-reads every base tensor from the checkpoint,
  decodes and merges on the host, and reloads every tensor, all inside the engine's pause (the
  design before swaps were incremental; kept for this comparison).
- reload: resident base and delta cache, only the tensors that change, staged (merged in the
  background while the engine serves); the commit is vLLM's in-place reload of those tensors
  (DELTAGATE_PREPARE_MIB=0: the commit before prepared modules).
- direct: the same engine as staged, the swap not staged: merged and prepared inside the pause.
- routes: staged and prepared as below, the swap sent as vLLM's three calls (/pause, the commit
  over /collective_rpc, /resume) as before loaders/engine_swap.py: the pause that route removes.
- staged: staged, and the changed modules prepared in kernel form while serving
  (loaders/prepared.py): the pause copies and re-binds them; one call to the engine.
Swap kinds: base -> variant (the delta covers every tensor), variant -> base, base -> partial and
partial -> base. The partial delta is what a user's partial fine-tune gives: a post model that is
base + the delta on the tensors matching --partial (the attention: 20% of SmolLM2's parameters), on a
seeded --partial-density of their entries (< 1: GMT-like masked entries, stored in the sparse
layout), extracted by `deltagate extract`'s function; its size is printed beside the full delta's.
Kinds and modes alternate; every measured swap is preceded by an untimed swap to its starting
point. `pause` is timed by the gateway's client around its one swap call (loaders/engine_swap.py).
Floors: a copy_ and an add of the bytes the swap rewrites, in the engine worker (deltagate_floors).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltas import (  # noqa: E402
    Checkpoint,
    DeltaTerm,
    Recipe,
    extract_delta,
    merge_tensor,
    open_artifact,
)
from loaders.engine import EngineClient, EngineProcess, EngineSpec  # noqa: E402
from loaders.pico import keep_entries, save_checkpoint  # noqa: E402

MODES = ("before", "reload", "direct", "routes", "staged")
ENGINES = {  # mode -> the engine it runs on, and that engine's environment
    "before": ("before", (("DELTAGATE_SWAP_MODE", "full"),)),
    "reload": ("reload", (("DELTAGATE_PREPARE_MIB", "0"),)),
    "direct": ("prepared", ()),
    "routes": ("prepared", ()),
    "staged": ("prepared", ()),
}
STAGED = ("reload", "routes", "staged")
FIRST = {"prepared": "after warming (prepared engine)", "reload": "cold (reload engine)"}
KINDS = ("variant", "base", "partial", "partial->base")
TARGETS = {"variant": 0.45, "base": 0.40}  # issue 19, SmolLM2 fp32 on this machine


def extracted_partial(base: Path, delta: Path, only: str, density: float, out: Path) -> Path:
    """The artifact `deltagate extract` writes for a post model that is base + `delta` on the tensors
    matching `only`, on a seeded `density` of their entries (cached)."""
    if out.is_file():
        return out
    ckpt, art = Checkpoint(base), open_artifact(delta)
    state = {name: ckpt.get(name) for name in ckpt.tensor_names()}
    moved = {
        name: merge_tensor(t, [(art.delta(name), 1.0)], t.dtype)
        for name, t in state.items()
        if re.search(only, name) and name in art.tensor_names
    }
    state |= keep_entries(moved, state, density, seed=0) if density < 1 else moved
    post = save_checkpoint(out.parent / f"{out.stem}.post", state, like=base)
    try:
        extract_delta(base, post, out)
    finally:
        shutil.rmtree(post)
    return out


def complete(url: str) -> str:
    body = {"model": "m", "prompt": "The capital of France", "max_tokens": 4, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def measure(args, base: Path, delta: Path, partial: Path, work: Path) -> tuple[list[dict], dict]:
    procs = {}
    plain = Recipe(base=str(base))
    variant = Recipe(base=str(base), deltas=[DeltaTerm(path=str(delta))])
    part = Recipe(base=str(base), deltas=[DeltaTerm(path=str(partial))])
    swaps = {
        "variant": (plain, variant),
        "base": (variant, plain),
        "partial": (plain, part),
        "partial->base": (part, plain),
    }
    # Started one at a time, each engine's first swap timed while it is the newest one: an engine
    # that has just started is still busy for a while (a worker at 100% CPU seen right after its
    # readiness), which the first swap of another engine started beside it would pay.
    first, clients = {}, {}
    order = ("prepared", "reload", "before")
    for engine, env in sorted(dict(ENGINES.values()).items(), key=lambda e: order.index(e[0])):
        spec = EngineSpec(
            model=str(base),
            served_name="m",
            max_model_len=args.max_model_len,
            log_path=work / f"engine-{engine}.log",
            env=env,
        )
        procs[engine] = EngineProcess(spec)
        procs[engine].start()
        await asyncio.to_thread(procs[engine].wait_ready, 1800)
        clients[engine] = EngineClient(procs[engine].url, "m")
        if engine in FIRST:
            first[FIRST[engine]] = await first_swap(clients[engine], variant, engine == "prepared", delta)
    rows = []
    try:
        after = clients["prepared"]
        floors = {
            kind: (await after.collective_rpc("deltagate_floors", to.model_dump_json()))[0]
            for kind, (_, to) in swaps.items()
            if to is not plain
        }
        floors["base"] = floors["variant"]
        floors["partial->base"] = floors["partial"]
        for rep in range(args.repeats):
            modes = MODES if rep % 2 == 0 else MODES[::-1]
            for kind in KINDS:
                source, target = swaps[kind]
                for mode in modes:
                    proc, client = procs[ENGINES[mode][0]], clients[ENGINES[mode][0]]
                    client.swap_route = mode != "routes"
                    await client.apply(source)  # untimed: the starting point
                    if mode in STAGED:
                        await client.stage(target)
                        await asyncio.to_thread(complete, proc.url)  # the engine serves meanwhile
                        await client.wait_staged(target)  # the commit then waits for nothing
                        await asyncio.sleep(args.stage_wait)
                    start = time.perf_counter()
                    result = await client.apply(target)
                    pause = time.perf_counter() - start
                    text = await asyncio.to_thread(complete, proc.url)
                    rows.append(
                        {
                            "rep": rep,
                            "kind": kind,
                            "mode": mode,
                            "pause": pause,
                            "staged": result.staged,
                            "staging": result.staging_seconds,
                            "tensors": result.tensors,
                            "of": result.of_tensors,
                            "bytes": result.bytes,
                            "prepared": result.prepared_modules,
                            "reloaded": result.fallback_modules,
                            "text": text,
                            **result.phases,
                        }
                    )
                    print(
                        f"  rep {rep} {kind:>13} {mode:>6}: pause {pause:.3f} s, {result.tensors} tensors, "
                        f"{result.prepared_modules} modules prepared, {result.fallback_modules} reloaded",
                        flush=True,
                    )
        memory = result.memory
    finally:
        for client in clients.values():
            await client.close()
        for proc in procs.values():
            proc.stop()
    return rows, {"floors": floors, "memory": memory, "first": first}


async def first_swap(client: EngineClient, variant: Recipe, warmed: bool, delta: Path) -> float:
    """The first swap to the variant after the engine started, timed like the others: cold (the base
    and the delta read and decoded inside the pause) or after warming (POST
    /v1/variants/{name}/warm, what registering a variant does) has finished."""
    tensors = len(open_artifact(delta).tensor_names)
    while warmed:  # the warm-up reads in the engine's background: ask until the delta is all decoded
        memory = (await client.warm(variant))["memory"]
        if memory.get("delta_cache_misses", 0) >= tensors and memory.get("base_bytes", 0) > 0:
            break
        await asyncio.sleep(0.5)
    start = time.perf_counter()
    result = await client.apply(variant)
    seconds = time.perf_counter() - start
    phases = ", ".join(f"{k.removesuffix('_seconds')} {v:.3f}" for k, v in result.phases.items())
    print(f"first swap, {'after warming' if warmed else 'cold'}: {seconds:.3f} s ({phases})", flush=True)
    return seconds


def report(rows: list[dict], extra: dict) -> None:
    floors = extra["floors"]

    def med(kind: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["kind"] == kind and r["mode"] == mode)

    print("\nmedians of the repeats (seconds); floors measured in the prepared engine's worker")
    head = (
        "kind",
        "mode",
        "pause",
        "merge",
        "commit",
        "staging",
        "tensors",
        "modules prepared/reloaded",
        "MB",
        "copy floor",
        "add floor",
        "merge/add",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for kind in KINDS:
        floor = floors[kind]
        for mode in MODES:
            merge = med(kind, mode, "staging" if mode in STAGED else "merge_seconds")
            ratio = f"{merge / floor['add_seconds']:.1f}x" if kind in ("variant", "partial") else "-"
            cells = [
                kind,
                mode,
                f"{med(kind, mode, 'pause'):.3f}",
                f"{merge:.3f}",
                f"{med(kind, mode, 'reload_seconds'):.3f}",
                f"{med(kind, mode, 'staging'):.3f}" if mode in STAGED else "-",
                f"{med(kind, mode, 'tensors'):.0f}/{rows[0]['of']}",
                f"{med(kind, mode, 'prepared'):.0f}/{med(kind, mode, 'reloaded'):.0f}",
                f"{med(kind, mode, 'bytes') / 1e6:.1f}",
                f"{floor['copy_seconds']:.3f}",
                f"{floor['add_seconds']:.3f}",
                ratio,
            ]
            print("| " + " | ".join(cells) + " |")
    print("\nratios")
    for kind in ("variant", "base", "partial", "partial->base"):
        floor = floors[kind]["add_seconds"]
        for mode in ("reload", "routes", "staged"):
            pause = med(kind, mode, "pause")
            verdict = "met" if pause <= floor else "NOT met"
            print(f"pause to {kind} ({mode}) / add floor: {pause / floor:.1f}x; target <= 1x: {verdict}")
    for mode in ("direct", "routes", "staged"):
        for kind, target in TARGETS.items():
            now, was = med(kind, mode, "pause"), med(kind, "before", "pause")
            print(
                f"pause to {kind} ({mode}): {now:.3f} s vs {was:.3f} s before ({was / now:.1f}x less); "
                f"target <= {target:.2f} s: {'met' if now <= target else 'NOT met'}"
            )
        share = med("partial", mode, "pause") / med("variant", mode, "pause")
        tensors = med("partial", mode, "tensors") / rows[0]["of"]
        print(
            f"partial ({tensors:.0%} of tensors) / full pause ({mode}): {share:.0%}; target <= 40%: "
            f"{'met' if share <= 0.40 else 'NOT met'}"
        )
    texts = {(r["kind"], r["mode"]): r["text"] for r in rows}
    same = all(texts[(kind, mode)] == texts[(kind, "before")] for kind in KINDS for mode in MODES)
    print(f"answers after each swap equal across the {len(MODES)} modes: {'yes' if same else 'NO'}")
    merge = med("variant", "direct", "merge_seconds") / floors["variant"]["add_seconds"]
    verdict = "met" if merge <= 2 else "NOT met"
    print(f"merge (variant, direct) / add floor: {merge:.1f}x; target <= 2x: {verdict}")
    for what, seconds in extra["first"].items():
        verdict = "met" if seconds <= 1.0 else "NOT met"
        print(f"first swap to the variant after start, {what}: {seconds:.3f} s; target <= 1 s: {verdict}")
    memory = extra["memory"]
    base_mb = memory.get("base_bytes", 0) / 1e6
    print(
        f"memory kept for swaps: base {base_mb:.0f} MB ({memory.get('residency')}), "
        f"delta cache {memory.get('delta_cache_bytes', 0) / 1e6:.0f} MB of "
        f"{memory.get('delta_cache_budget_bytes', 0) / 1e6:.0f} MB budget; worker threads "
        f"{floors['variant'].get('threads')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "pico"], default="smollm2")
    parser.add_argument("--base", type=Path)
    parser.add_argument("--delta", type=Path)
    parser.add_argument(
        "--partial", default=r"\.self_attn\.", help="regex of the tensors a partial fine-tune moves"
    )
    parser.add_argument("--partial-density", type=float, default=1.0, help="share of their entries it moves")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--stage-wait", type=float, default=0.2, help="seconds between the stage being ready and the commit"
    )
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    if args.base is None:
        if args.model == "smollm2":
            from training.default import prepare_default

            models = prepare_default(args.cache_dir)
        else:
            from loaders.demo import prepare_demo

            models = prepare_demo(args.cache_dir / "demo")
        args.base, args.delta = models.base, models.delta
    work = args.cache_dir / "bench" / "swap"
    work.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(f"{args.partial}|{args.partial_density}".encode()).hexdigest()[:8]
    partial = extracted_partial(
        args.base,
        args.delta,
        args.partial,
        args.partial_density,
        work / f"{args.delta.stem}-part-{tag}.safetensors",
    )
    print(f"model: {args.base}  delta: {args.delta}  partial: {partial}  logs: {work}", flush=True)
    full_mb, part_mb = args.delta.stat().st_size / 1e6, partial.stat().st_size / 1e6
    share = part_mb / full_mb
    verdict = "met" if share <= 0.25 else "NOT met"
    print(
        f"artifacts: full {full_mb:.1f} MB, partial ({args.partial!r}, density {args.partial_density}) "
        f"{part_mb:.1f} MB = {share:.0%} of the full one; target <= 25%: {verdict}",
        flush=True,
    )
    rows, extra = asyncio.run(
        measure(args, args.base.resolve(), args.delta.resolve(), partial.resolve(), work)
    )
    report(rows, extra)


if __name__ == "__main__":
    main()
