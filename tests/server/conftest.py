"""Real stack, started once per session: `deltagate serve` (uvicorn + two vLLM engines) and
stock vLLM reference engines serving checkpoints merged offline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from loaders import engine
from loaders.engine import EngineProcess, EngineSpec, free_port

PROMPTS = ["The capital of France", "def add(a, b):", "Numbers: 1 2 3"]
CHAT = [{"role": "user", "content": "Tell me about deltas."}]
MAX_TOKENS = 12
ADMIN = "test-admin-token"


def completion_params(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 3}


def chat_params(model: str) -> dict:
    return {
        "model": model,
        "messages": CHAT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }


def completion_outputs(url: str, model: str, headers: dict | None = None) -> list[dict]:
    """Greedy completions of PROMPTS with tokens and logprobs, one request at a time."""
    outs = []
    for prompt in PROMPTS:
        r = httpx.post(
            f"{url}/v1/completions", json=completion_params(model, prompt), headers=headers, timeout=120
        )
        r.raise_for_status()
        choice = r.json()["choices"][0]
        outs.append({"text": choice["text"], **choice["logprobs"]})
        outs[-1].pop("text_offset", None)
    return outs


def chat_output(url: str, model: str) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", json=chat_params(model), timeout=120)
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return {"content": choice["message"]["content"], "logprobs": choice["logprobs"]["content"]}


@dataclass
class Stack:
    url: str
    state_dir: Path
    proc: subprocess.Popen
    refs: dict[str, list[dict]] = field(default_factory=dict)
    chat_refs: dict[str, dict] = field(default_factory=dict)
    base_before: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN}"}


def _merge(base: Path, terms: list[str], out: Path) -> Path:
    cmd = [sys.executable, "-m", "server", "merge", "--base", str(base), "-o", str(out)]
    for t in terms:
        cmd += ["--delta", t]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def _references(tied, untied, work: Path) -> dict[str, Path]:
    """Checkpoints each variant must be identical to: post models, and offline merges."""
    return {
        "tied-inst": tied.post,
        "tied-half": _merge(tied.base, [f"{tied.delta}:0.5"], work / "tied-half"),
        "tied-mix": _merge(tied.base, [f"{tied.delta}:0.7", f"{tied.delta2}:0.4"], work / "tied-mix"),
        "untied-inst": untied.post,
    }


def _serve_references(checkpoints: dict[str, Path], logs: Path) -> tuple[dict, dict]:
    """Start stock vLLM on each checkpoint (two at a time), record its answers, stop it."""
    refs, chats = {}, {}
    items = list(checkpoints.items())
    for i in range(0, len(items), 2):
        batch = []
        for name, path in items[i : i + 2]:
            spec = EngineSpec(
                model=str(path), served_name="ref", max_model_len=512, log_path=logs / f"ref-{name}.log"
            )
            proc = EngineProcess(spec, with_extension=False)
            proc.start()
            batch.append((name, proc))
        try:
            for name, proc in batch:
                proc.wait_ready(timeout=900)
                refs[name] = completion_outputs(proc.url, "ref")
                chats[name] = chat_output(proc.url, "ref")
        finally:
            for _, proc in batch:
                proc.stop()
    return refs, chats


def start_gateway(args: list[str], state_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--state-dir", str(state_dir)]
    cmd += ["--admin-token", ADMIN, "--max-model-len", "512", *args]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    try:
        engine.wait_healthy(url, proc, timeout, "gateway", log)
    except engine.EngineError as exc:
        raise RuntimeError(f"{exc}\n{log.read_text()[-4000:]}") from exc


def stop_gateway(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # uvicorn shuts down; the lifespan stops the engines
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def stack(tied, untied, tmp_path_factory) -> Stack:
    """The gateway with bases `tied` and `untied`, plus reference answers from stock vLLM."""
    work = tmp_path_factory.mktemp("stack")
    port = free_port()
    log = work / "gateway.log"
    proc = start_gateway(
        [
            "--base", f"tied={tied.base}",
            "--base", f"untied={untied.base}",
            "--variant", f"tied-inst={tied.delta}",
            "--variant", f"tied-half={tied.delta}:0.5",
            "--variant", f"tied-mix={tied.delta}:0.7,{tied.delta2}:0.4",
        ],
        work / "state",
        port,
        log,
    )  # fmt: skip
    stack = Stack(url=f"http://127.0.0.1:{port}", state_dir=work / "state", proc=proc)
    try:
        stack.refs, stack.chat_refs = _serve_references(_references(tied, untied, work), work)
        wait_healthy(stack.url, proc, log)
        for base in ("tied", "untied"):  # before any swap: the weights as vLLM loaded them
            stack.base_before[base] = completion_outputs(stack.url, base)
        r = httpx.post(
            f"{stack.url}/v1/deltas",
            json={"name": "untied-d", "path": str(untied.delta)},
            headers=stack.admin,
        )
        assert r.status_code == 201, r.text
        r = httpx.post(
            f"{stack.url}/v1/variants",
            json={"name": "untied-inst", "base": "untied", "deltas": [{"delta": "untied-d", "alpha": 1.0}]},
            headers=stack.admin,
        )
        assert r.status_code == 201, r.text
        yield stack
    finally:
        stop_gateway(proc)
