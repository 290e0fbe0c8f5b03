"""The model matrix: every family of loaders/families.py (and a dtype each where asked), served through
a real gateway and a real engine on every path of families.PATHS, each answer bit-identical (greedy
tokens and logprobs) to stock vLLM cold-started on the offline merge with the same flags.

One gateway engine per row runs the whole sequence; stock vLLM's answers for the row's reference
checkpoints come from one process (tests/server/stock_answers.py) running beside it. A process per
row, not one for the matrix: the matrix then holds two engines at a time beside the shared fleet
(one process for all rows, running ahead, ran out of memory once beside it: its engine could not
get its KV cache). The checkpoints are built offline from each family's `transformers` config, the
deltas by `deltagate extract` and the references by `deltagate merge`, run in this process through
the CLI's own entry point (its imports paid once).

A family that can run the adapter lane (families.adapter_lane) takes its paths (families.ADAPTER_PATHS)
through a second gateway, with LoRA slots, after the first: the first gateway's engine must not
run LoRA, since stock vLLM with multi-LoRA on is not bit-identical to stock vLLM without it. An MoE
row's gateway has LoRA slots and must refuse them: its engine runs without LoRA (and answers every
path), its variants say why, and stock vLLM shows the cause on the same run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from deltas import open_artifact
from loaders.engine import free_port
from loaders.families import (
    ADAPTER_PATHS,
    FAMILIES,
    MATRIX,
    PATHS,
    SHARED_PATHS,
    MatrixRow,
    adapter_lane,
    make_family_base,
    make_family_post,
    partial_pattern,
    projection_pattern,
)
from tests.server.conftest import ADMIN, MAX_TOKENS, PROMPTS, start_gateway, stop_gateway, wait_healthy
from tests.server.stock_answers import WEIGHTS, Stock

pytestmark = pytest.mark.engine
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_MODEL_LEN = 512  # start_gateway's
LORA_SLOTS = ("--lora-slots", "2")  # with the default --max-lora-rank 16: stock_answers.LORA's flags


def deltagate(*args: object) -> str:
    """Run a `deltagate` command in this process (the console script's own app); its output."""
    import cli  # noqa: F401  (registers the commands)
    from cli.app import app

    done = CliRunner().invoke(app, [str(a) for a in args])
    assert done.exit_code == 0, f"deltagate {' '.join(map(str, args))}\n{done.output}\n{done.exception!r}"
    return done.output


@dataclass
class Row:
    """A row's checkpoints, deltas, and the reference checkpoint of every path."""

    row: MatrixRow
    base: Path
    updated: Path
    delta: Path  # the full fine-tune
    part: Path  # attention only (experts only on MoE)
    delta2: Path  # a second fine-tune, for the mix
    references: dict[str, Path]


def build_row(row: MatrixRow, work: Path) -> Row:
    """Base, post models and an updated base of the row's family; deltas extracted; merges written."""
    family = FAMILIES[row.family]
    base = make_family_base(family, work / "base", row.dtype)
    posts = {
        "post": make_family_post(base, work / "post", seed=1),
        "part": make_family_post(base, work / "post-part", seed=2, only=partial_pattern(family), density=0.1),
        "post2": make_family_post(base, work / "post2", seed=3),
    }
    updated = make_family_post(base, work / "updated", seed=4, scale=0.1)  # a base update: every tensor
    deltas = {}
    for name, post in posts.items():
        deltas[name] = work / f"{name}.delta"
        deltagate("extract", "--base", base, "--post", post, "-o", deltas[name])

    def merge(name: str, on: Path, *terms: str) -> Path:
        args = [a for t in terms for a in ("--delta", t)]
        deltagate("merge", "--base", on, "-o", work / f"merged-{name}", *args)
        return work / f"merged-{name}"

    references = {
        "base": base,
        "full": merge("full", base, str(deltas["post"])),
        "part": merge("part", base, str(deltas["part"])),
        "half": merge("half", base, f"{deltas['post']}:0.5"),
        "mix": merge("mix", base, f"{deltas['post']}:0.5", f"{deltas['post2']}:0.5"),
        "runtime-base": updated,
        "transfer": merge("transfer", updated, str(deltas["post"])),
    }
    assert set(references) == set(PATHS)
    layouts = {e.params.get("layout") for e in open_artifact(deltas["part"]).manifest.tensors}
    assert layouts == {"sparse"}, layouts  # a tenth of the entries moved: stored as its nonzeros
    return Row(row, base, updated, deltas["post"], deltas["part"], deltas["post2"], references)


def reference_jobs(r: Row) -> list[dict]:
    """Stock vLLM's jobs for the row's paths: each reference checkpoint with the row's flags."""
    method, overrides = r.row.vllm_quantization
    flags = {"quantization": method, "hf_overrides": overrides, "tensor_parallel": r.row.tensor_parallel}
    flags["scheduling_policy"] = "priority" if r.row.shared else "fcfs"
    return [{"model": str(p), **flags} for p in r.references.values()]


@dataclass
class Adapter:
    """A rank-8 delta of a family's projections (`deltagate extract`, then `compress`), and the
    adapter stock vLLM is given for it (`deltagate export-lora`)."""

    lowrank: Path
    exported: Path

    @classmethod
    def build(cls, r: Row, work: Path) -> Adapter:
        work.mkdir(parents=True)
        (work / "codecs.yaml").write_text("default: lowrank:rank=8\n")
        post = make_family_post(r.base, work / "post", seed=5, only=projection_pattern())
        deltagate("extract", "--base", r.base, "--post", post, "-o", work / "dense.delta")
        lowrank = work / "lowrank.delta"
        deltagate("compress", work / "dense.delta", "-o", lowrank, "--codec-recipe", work / "codecs.yaml")
        exported = deltagate("export-lora", lowrank, "-o", work / "adapter")
        assert "left out" not in exported, exported  # the adapter carries every tensor of the delta
        return cls(lowrank, work / "adapter")

    def jobs(self, r: Row) -> list[dict]:
        """Stock vLLM with multi-LoRA on: the base, plain and given the adapter."""
        return [lora_job(r) | {"key": "lora:base", "adapters": {"+adapter": str(self.exported)}}]


def lora_job(r: Row) -> dict:
    """A stock job on the row's base with multi-LoRA on (one rank, no quantization)."""
    return {"model": str(r.base), "quantization": None, "tensor_parallel": 1, "lora": True}


# The stock answers each adapter path is compared with (keys of Adapter.jobs).
ADAPTER_REFERENCES = {"lora-base": "lora:base", "adapter": "lora:base+adapter"}
# What a gateway answered on a path: (the stock answers' key, path, model, answers).
Served = tuple[str, str, str, list[dict]]
# An MoE row's last stock job: an engine with multi-LoRA on, asked once (loaders/engine.lora_refusal).
LORA_PROBE = "lora-probe"


def answers(url: str, model: str, headers: dict | None = None, usage: list | None = None) -> list[dict]:
    """The gateway's greedy answers to PROMPTS as `model`, one at a time: token ids and logprobs
    (each answer's `usage` appended to `usage`, if given)."""
    out = []
    for prompt in PROMPTS:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "logprobs": 3,
            "return_token_ids": True,
        }
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        if usage is not None:
            usage.append(r.json()["usage"])
        choice = r.json()["choices"][0]
        out.append({"token_ids": choice["token_ids"], "token_logprobs": choice["logprobs"]["token_logprobs"]})
    return out


def shared_paths(url: str, name: str, r: Row, work: Path) -> list[Served]:
    """SHARED_PATHS on the shared row's gateway, last (once a key exists, every call needs one)."""
    log = (work / "state" / "logs" / f"engine-{name}.log").read_text()
    assert "'scheduling_policy': 'priority'" in log  # the engine runs the policy (its non-default args)
    served = [(str(r.references["full"]), "background", f"{name}-full", batch_answers(url, f"{name}-full"))]
    for project, alpha in (("team-a", 1.0), ("team-b", 0.5)):
        body = {"name": f"{project}/chat", "base": name, "deltas": [{"delta": f"{name}-d", "alpha": alpha}]}
        assert httpx.post(f"{url}/v1/variants", headers=AUTH, json=body).status_code == 201
    a, b = (_key(url, project) for project in ("team-a", "team-b"))
    usage: list[dict] = []
    served.append(
        (str(r.references["full"]), "scoped-key", "team-a/chat", answers(url, "team-a/chat", a, usage))
    )
    body = {"model": "team-a/chat", "prompt": PROMPTS[0], "max_tokens": 2}
    refused = httpx.post(f"{url}/v1/completions", json=body, headers=b)
    assert refused.status_code == 404 and "unknown model 'team-a/chat'" in refused.text, refused.text
    own = httpx.post(f"{url}/v1/completions", json=body | {"model": "team-b/chat"}, headers=b)
    assert own.status_code == 200, own.text
    counted = httpx.get(f"{url}/v1/usage", params={"project": "team-a"}, headers=AUTH).json()["data"]
    want = {"requests": len(PROMPTS)}
    want |= {k: sum(u[k] for u in usage) for k in ("prompt_tokens", "completion_tokens")}
    assert [(c["key"], c["model"], {k: c[k] for k in want}) for c in counted] == [
        ("team-a/app", "team-a/chat", want)
    ]
    return served


def _key(url: str, project: str) -> dict:
    """The headers of a new key of `project` (its models by default: PROJECT/*)."""
    made = httpx.post(f"{url}/v1/projects/{project}/keys", headers=AUTH, json={"name": "app"})
    assert made.status_code == 201, made.text
    return {"Authorization": f"Bearer {made.json()['secret']}"}


def batch_answers(url: str, model: str) -> list[dict]:
    """answers(), asked as one Batch API batch: background work, sent to the engine with priority 1."""
    lines = [
        {"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": body}
        for i, prompt in enumerate(PROMPTS)
        for body in [
            {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            | {"logprobs": 3, "return_token_ids": True}
        ]
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = httpx.post(f"{url}/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    body = {"input_file_id": upload.json()["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    batch = httpx.post(f"{url}/v1/batches", json=body).json()
    deadline = time.monotonic() + 300
    while (batch := httpx.get(f"{url}/v1/batches/{batch['id']}").json())["status"] != "completed":
        assert batch["status"] in ("validating", "in_progress", "finalizing"), batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}, batch
    out = [
        json.loads(x)
        for x in httpx.get(f"{url}/v1/files/{batch['output_file_id']}/content").text.splitlines()
    ]
    choices = [x["response"]["body"]["choices"][0] for x in sorted(out, key=lambda x: int(x["custom_id"]))]
    return [{"token_ids": c["token_ids"], "token_logprobs": c["logprobs"]["token_logprobs"]} for c in choices]


def last_swap(url: str, base: str) -> dict:
    bases = httpx.get(f"{url}/v1/bases", headers=AUTH).json()["data"]
    return next(b for b in bases if b["name"] == base)["recent_swaps"][-1]


def serve_paths(row: MatrixRow, r: Row, work: Path) -> list[Served]:
    """Every path of PATHS through a gateway on the row's base: (reference, path, model, answers) in
    the order asked. An MoE row's gateway has LoRA slots, which it must not give the MoE engine."""
    name, moe = row.family, FAMILIES[row.family].moe
    port, log = free_port(), work / "gateway.log"
    args = [
        *("--base", f"{name}={r.base}"),
        *("--variant", f"{name}-full={r.delta}"),
        *("--variant", f"{name}-part={r.part}"),
        *("--variant", f"{name}-half={r.delta}:0.5"),
        *("--variant", f"{name}-mix={r.delta}:0.5,{r.delta2}:0.5"),
        *(f"--engine-arg={arg}" for arg in row.engine_args),
        *(LORA_SLOTS if moe else ()),
        *(["--priority-scheduling"] if row.shared else []),
    ]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if row.tensor_parallel == 2 else None  # a rank per core
    proc = start_gateway(args, work / "state", port, log, env=env)
    url = f"http://127.0.0.1:{port}"
    served: list[Served] = []

    def ask(path: str, model: str) -> None:
        served.append((str(r.references[path]), path, model, answers(url, model)))

    try:
        wait_healthy(url, proc, log)
        for path, model in [
            ("base", name),
            ("full", f"{name}-full"),
            ("base", name),
            ("part", f"{name}-part"),
        ]:
            ask(path, model)
        swap = last_swap(url, name)  # base -> part: only the modules the partial delta covers
        assert swap["variant"] == f"{name}-part" and 0 < swap["tensors"] < swap["of_tensors"], swap
        ask("half", f"{name}-half")
        ask("mix", f"{name}-mix")
        runtime = httpx.post(
            f"{url}/v1/bases", headers=AUTH, json={"name": f"{name}-v2", "path": str(r.updated)}
        )
        assert runtime.status_code == 201 and runtime.json()["group"] == name, runtime.text  # the same engine
        d = httpx.post(f"{url}/v1/deltas", headers=AUTH, json={"name": f"{name}-d", "path": str(r.delta)})
        assert d.status_code == 201, d.text
        variant = {"name": f"{name}-v2-full", "base": f"{name}-v2", "deltas": [{"delta": f"{name}-d"}]}
        v = httpx.post(f"{url}/v1/variants", headers=AUTH, json=variant)
        assert v.status_code == 201, v.text
        for path, model in [
            ("runtime-base", f"{name}-v2"),
            ("transfer", f"{name}-v2-full"),
            ("full", f"{name}-full"),
        ]:
            ask(path, model)
        assert_prepared(url, row)
        if row.shared:
            served += shared_paths(url, name, r, work)
        if moe:
            assert_lora_refused(url, name)
    finally:
        stop_gateway(proc)
    return served


def assert_prepared(url: str, row: MatrixRow) -> None:
    """Every swap of the row committed prepared modules (loaders/prepared.py) where it could: all of a
    dense unquantized family's; an MoE family's experts and a quantized engine's linear layers through
    vLLM's reload instead, in the same pause."""
    bases = httpx.get(f"{url}/v1/bases", headers=AUTH).json()["data"]
    swaps = next(b for b in bases if b["name"] == row.family)["recent_swaps"]
    assert swaps and all(s["ok"] and not s["fallback_reason"] for s in swaps), swaps
    assert sum(s["prepared_modules"] for s in swaps) > 0, swaps
    reloaded = sum(s["fallback_modules"] for s in swaps)
    if FAMILIES[row.family].moe or row.quantization:
        assert reloaded > 0, swaps
    else:
        assert reloaded == 0, swaps


def assert_lora_refused(url: str, name: str) -> None:
    """On an MoE base the adapter lane is refused with the reason, at registration; variants say why
    they are swapped (and the engine, without LoRA, answered every path above)."""
    variant = {
        "name": f"{name}-as-adapter",
        "base": name,
        "deltas": [{"delta": f"{name}-d"}],
        "lane": "adapter",
    }
    r = httpx.post(f"{url}/v1/variants", headers=AUTH, json=variant)
    assert r.status_code == 400 and "mixture-of-experts" in r.json()["error"]["message"], r.text
    listed = {v["name"]: v for v in httpx.get(f"{url}/v1/variants", headers=AUTH).json()["data"]}
    assert listed[f"{name}-full"]["serving_lane"] == "swap", listed[f"{name}-full"]
    assert "mixture-of-experts" in listed[f"{name}-full"]["lane_note"], listed[f"{name}-full"]


def serve_adapter_paths(row: MatrixRow, r: Row, a: Adapter, work: Path) -> list[Served]:
    """Every path of ADAPTER_PATHS through a gateway with LoRA slots on the row's base (its dtype; no
    quantization, one rank), in the order asked."""
    name = row.family
    port, log = free_port(), work / "gateway-lora.log"
    args = [*("--base", f"{name}={r.base}"), *("--variant", f"{name}-lr={a.lowrank}"), *LORA_SLOTS]
    proc = start_gateway(args, work / "state-lora", port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        lanes = {
            v["name"]: v["serving_lane"] for v in httpx.get(f"{url}/v1/variants", headers=AUTH).json()["data"]
        }
        assert lanes == {f"{name}-lr": "adapter"}, lanes
        served = [
            (ADAPTER_REFERENCES[path], path, model, answers(url, model))
            for path, model in [("lora-base", name), ("adapter", f"{name}-lr"), ("lora-base", name)]
        ]
        assert swaps(url, name) == 0  # the adapter is served beside the base: nothing reloaded
    finally:
        stop_gateway(proc)
    return served


def swaps(url: str, base: str) -> int:
    bases = httpx.get(f"{url}/v1/bases", headers=AUTH).json()["data"]
    return len(next(b for b in bases if b["name"] == base)["recent_swaps"])


@pytest.mark.parametrize("row", MATRIX, ids=[row.id for row in MATRIX])
def test_every_path_of_a_family_is_bit_identical_to_stock_vllm(row: MatrixRow, tmp_path):
    family = FAMILIES[row.family]
    r = build_row(row, tmp_path / "checkpoints")
    adapter = Adapter.build(r, tmp_path / "adapter") if adapter_lane(family) else None
    # The LoRA engine first: started after compiled ones in one process, it answered otherwise (0.016
    # off in bf16) than alone, as the gateway's engine does.
    jobs = (adapter.jobs(r) if adapter else []) + reference_jobs(r)
    if family.moe:  # last: a failed engine core leaves the process unfit for another
        jobs.append(lora_job(r) | {"key": LORA_PROBE, "probe": True})
    # one row at a time: the machine's memory holds the suite beside it
    stock = Stock.start(jobs, tmp_path, MAX_MODEL_LEN)
    try:
        served = serve_paths(row, r, tmp_path)
        if adapter:
            served += serve_adapter_paths(row, r, adapter, tmp_path)
        want = stock.answers()
    finally:
        stock.stop()
    wrong = [
        f"{model} ({path}): {got} != stock {want[ref]}"
        for ref, path, model, got in served
        if got != want[ref]
    ]
    assert not wrong, "\n".join(wrong)
    paths = {path for _, path, _, _ in served}
    assert paths == set(PATHS) | (set(ADAPTER_PATHS) if adapter else set()) | (
        set(SHARED_PATHS) if row.shared else set()
    )
    differs = {
        json.dumps(got) for _, path, _, got in served if path in ("base", "full", "part", "half", "mix")
    }
    assert len(differs) == 5, "a variant answered as another: the matrix would not see a missed swap"
    if adapter:
        lora = {json.dumps(got) for _, path, _, got in served if path in ADAPTER_PATHS}
        assert len(lora) == 2, "the adapter answered as the base"
    if row.quantization:  # the engine really quantized: its linear weights are the quantization's type
        weights = want[str(r.base) + WEIGHTS]
        assert weights and "Parameter" not in weights, weights
    if family.moe:  # the reason loaders/engine.lora_refusal gives, seen in stock vLLM on this run
        assert want[LORA_PROBE] != "answered", "vLLM's CPU build now runs LoRA on MoE: lift lora_refusal"
        assert "triton" in want[LORA_PROBE].lower(), want[LORA_PROBE]
