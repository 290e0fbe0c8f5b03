"""docs/getting-started.md, followed as written: its commands run in order in one shell, in a fresh
directory that holds what a clone's user has (the Makefile, pyproject.toml and the installed
.venv), against a real gateway and a real vLLM engine on pico. Then every script in examples/ runs
against that same gateway (one engine start for both).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from loaders.engine import free_port
from loaders.pico import make_pico_post

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"
READY = "__all steps done__"


def page_commands(page: Path = PAGE) -> list[str]:
    """The page's ```bash blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.S | re.M)


@dataclass
class Walkthrough:
    work: Path
    url: str
    output: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Run the page up to its last block (which stops the gateway), keep the gateway for the examples."""
    work = tmp_path_factory.mktemp("newcomer")
    for name in ("Makefile", "pyproject.toml", ".venv"):
        (work / name).symlink_to(ROOT / name)
    port = str(free_port())
    *steps, stop = [block.replace("8000", port) for block in page_commands()]
    script = "set -euo pipefail\n" + "\n".join(steps) + f"\necho '{READY}'\nread _\n" + stop
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "DELTAGATE_"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    env["XDG_STATE_HOME"] = str(work / "state-home")  # the gateway's default state dir, not the real home's
    shell = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x) for x in shell.stdout] + [lines.put(None)], daemon=True
    ).start()
    seen: list[str] = []
    try:
        while (line := lines.get(timeout=900)) is not None and line.strip() != READY:
            seen.append(line)
        output = "".join(seen)
        log = (work / "gateway.log").read_text() if (work / "gateway.log").exists() else ""
        assert line is not None, f"the page's commands failed:\n{output}\n--- gateway.log:\n{log[-4000:]}"
        yield Walkthrough(work, f"http://127.0.0.1:{port}", output, env)
        shell.stdin.write("\n")
        shell.stdin.flush()
        assert shell.wait(timeout=120) == 0, "the page's last block (stop) failed"
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGTERM)
            shell.wait(timeout=60)


def test_the_page_serves_the_variant_the_newcomer_registered(walkthrough):
    out = walkthrough.output
    assert re.search(r"^deltagate \d+\.\d+\.\d+", out, re.M), out  # deltagate --version
    models = json.loads(next(line for line in out.splitlines() if line.startswith('{"object":"list"')))
    assert {m["id"] for m in models["data"]} == {"pico", "pico-inst"}  # before registering
    variant = json.loads(next(line for line in out.splitlines() if '"name":"pico-half"' in line))
    assert variant["deltas"] == [{"delta": "my-delta", "alpha": 0.5, "density": 1.0, "provenance": "exact"}]
    chat = json.loads(next(line for line in out.splitlines() if '"chat.completion"' in line))
    assert chat["model"] == "pico-half" and chat["usage"]["completion_tokens"] > 0
    # the openai client's answer (the page's last step) is the same greedy text as curl's
    assert out.rstrip().endswith(chat["choices"][0]["message"]["content"].strip())


def run_example(walkthrough: Walkthrough, name: str, *args: str) -> str:
    """Run examples/`name` as a user would (`python examples/….py`), from the walkthrough's directory."""
    env = walkthrough.env | {"DELTAGATE_URL": walkthrough.url}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=walkthrough.work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _field(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(label)).removeprefix(label).strip()


def test_example_chat_streams_the_whole_answer(walkthrough):
    out = run_example(walkthrough, "chat.py", "--model", "pico-half")
    whole = _field(out, "whole:")
    assert whole and _field(out, "streamed:") == whole


def test_example_register_delta_serves_base_plus_the_delta(walkthrough):
    """The demo's own delta at α=1, registered again under a new name: the demo's variant's weights."""
    delta = walkthrough.work / ".cache" / "demo" / "pico-delta.safetensors"
    out = run_example(
        walkthrough, "register_delta.py", "--artifact", str(delta), "--base", "pico", "--name", "example"
    )
    assert _field(out, "variant:") == "example = pico + 1.0·example"
    from openai import OpenAI

    client = OpenAI(base_url=f"{walkthrough.url}/v1", api_key="none")
    same = client.completions.create(
        model="pico-inst", prompt="The capital of France", max_tokens=8, temperature=0
    )
    assert _field(out, "answer:") == repr(same.choices[0].text)


def test_example_compare_variants_runs_an_eval_on_both(walkthrough):
    out = run_example(walkthrough, "compare_variants.py", "--models", "pico", "pico-inst")
    for model in ("pico", "pico-inst"):
        assert re.search(rf"^{model}: completed, \d/3 items passed$", out, re.M), out


def test_example_updated_base_serves_the_old_delta_on_it(walkthrough):
    updated = make_pico_post(
        walkthrough.work / ".cache" / "demo" / "pico-base", walkthrough.work / "updated", seed=50, scale=0.1
    )
    out = run_example(walkthrough, "updated_base.py", "--updated", str(updated), "--delta", "my-delta")
    assert _field(out, "base:") == "updated in engine group pico state ready"
    assert _field(out, "variant:") == "updated-my-delta provenance transferred"
    assert _field(out, "updated-my-delta").startswith("'")
