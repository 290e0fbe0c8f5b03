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
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from loaders.engine import free_port
from loaders.families import (
    FAMILIES,
    MATRIX,
    PATHS,
    MatrixRow,
    make_family_base,
    make_family_post,
    partial_pattern,
)
from tests.server.conftest import ADMIN, MAX_TOKENS, PROMPTS, start_gateway, stop_gateway, wait_healthy

pytestmark = pytest.mark.engine
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_MODEL_LEN = 512  # start_gateway's


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
        "part": make_family_post(base, work / "post-part", seed=2, only=partial_pattern(family)),
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
    return Row(row, base, updated, deltas["post"], deltas["part"], deltas["post2"], references)


@dataclass
class Stock:
    """Stock vLLM answering a row's reference checkpoints, one `vllm.LLM` after another in one process
    (tests/server/stock_answers.py), while the row's gateway runs."""

    proc: subprocess.Popen
    out: Path
    log: Path

    @classmethod
    def start(cls, r: Row, work: Path) -> Stock:
        jobs = [
            {"model": str(p), "quantization": r.row.quantization, "tensor_parallel": r.row.tensor_parallel}
            for p in r.references.values()
        ]
        out, log, spec = work / "stock.json", work / "stock.log", work / "stock-jobs.json"
        spec.write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "tests.server.stock_answers", str(out), str(MAX_MODEL_LEN), str(spec)]
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, out, log)

    def answers(self) -> dict:
        """Stock vLLM's answers per reference checkpoint (waits for the process)."""
        code = self.proc.wait(timeout=1800)
        assert code == 0, f"stock answers exited with {code}:\n{self.log.read_text()[-4000:]}"
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def answers(url: str, model: str) -> list[dict]:
    """The gateway's greedy answers to PROMPTS as `model`, one at a time: token ids and logprobs."""
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
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        out.append({"token_ids": choice["token_ids"], "token_logprobs": choice["logprobs"]["token_logprobs"]})
    return out


def last_swap(url: str, base: str) -> dict:
    bases = httpx.get(f"{url}/v1/bases", headers=AUTH).json()["data"]
    return next(b for b in bases if b["name"] == base)["recent_swaps"][-1]


@pytest.mark.parametrize("row", MATRIX, ids=[row.id for row in MATRIX])
def test_every_path_of_a_family_is_bit_identical_to_stock_vllm(row: MatrixRow, tmp_path):
    r, name = build_row(row, tmp_path / "checkpoints"), row.family
    stock = Stock.start(r, tmp_path)  # one row at a time: the machine's memory holds the suite beside it
    port, log = free_port(), tmp_path / "gateway.log"
    args = [
        *("--base", f"{name}={r.base}"),
        *("--variant", f"{name}-full={r.delta}"),
        *("--variant", f"{name}-part={r.part}"),
        *("--variant", f"{name}-half={r.delta}:0.5"),
        *("--variant", f"{name}-mix={r.delta}:0.5,{r.delta2}:0.5"),
        *(f"--engine-arg={arg}" for arg in row.engine_args),
    ]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if row.tensor_parallel == 2 else None  # a rank per core
    proc = start_gateway(args, tmp_path / "state", port, log, env=env)
    url = f"http://127.0.0.1:{port}"
    served: list[tuple[str, str, list[dict]]] = []  # (path, model, answers) in the order asked
    try:
        wait_healthy(url, proc, log)
        for path, model in [
            ("base", name),
            ("full", f"{name}-full"),
            ("base", name),
            ("part", f"{name}-part"),
        ]:
            served.append((path, model, answers(url, model)))
        swap = last_swap(url, name)  # base -> part: only the modules the partial delta covers
        assert swap["variant"] == f"{name}-part" and 0 < swap["tensors"] < swap["of_tensors"], swap
        for path, model in [("half", f"{name}-half"), ("mix", f"{name}-mix")]:
            served.append((path, model, answers(url, model)))
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
            served.append((path, model, answers(url, model)))
    except BaseException:
        stock.stop()
        raise
    finally:
        stop_gateway(proc)
    try:
        want = stock.answers()
    finally:
        stock.stop()
    wrong = [
        f"{model} ({path}): {got} != stock {want[str(r.references[path])]}"
        for path, model, got in served
        if got != want[str(r.references[path])]
    ]
    assert not wrong, "\n".join(wrong)
    assert {path for path, _, _ in served} == set(PATHS)
    differs = {json.dumps(got) for path, _, got in served if path in ("base", "full", "part", "half", "mix")}
    assert len(differs) == 5, "a variant answered as another: the matrix would not see a missed swap"
