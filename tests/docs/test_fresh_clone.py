"""`make serve` in a fresh clone leaves the clone as it was: no state dir in the working directory,
nothing tracked changed, nothing new but the ignored caches it builds (.venv, .cache). `make test`
checks the same of itself (the Makefile compares `git status` before and after pytest).

The clone is of HEAD (committed work): what CI and a new user get. It borrows the installed .venv
(a symlink, as tests/docs/test_getting_started.py does) and serves the pico demo on a mock engine:
what is checked is where files go, not what an engine answers (the other tests do that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from loaders.engine import free_port

ROOT = Path(__file__).resolve().parents[2]


def _status(clone: Path, *flags: str) -> list[str]:
    out = subprocess.run(
        ["git", "status", "--porcelain", *flags], cwd=clone, check=True, capture_output=True, text=True
    ).stdout
    return out.splitlines()


def test_make_serve_in_a_fresh_clone_leaves_git_status_clean(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAGATE_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state-home")  # the user's state dir, here not the real one
    log = (tmp_path / "serve.log").open("w")
    # -o install: the borrowed .venv is installed already (its stamp is older than the clone's files)
    make = subprocess.Popen(
        ["make", "-o", "install", "serve", f"DEMO_ARGS=--model pico --mock-engine 1000 --port {port}"],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, models = time.monotonic() + 300, set()
        while time.monotonic() < deadline and make.poll() is None:
            try:
                data = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["data"]
                models = {m["id"] for m in data if m.get("ready", True)}
                answer = httpx.post(
                    f"http://127.0.0.1:{port}/v1/completions",
                    timeout=60,
                    json={"model": "pico-inst", "prompt": "Hi", "max_tokens": 4},
                )
                if answer.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert {"pico", "pico-inst"} <= models, (tmp_path / "serve.log").read_text()[-3000:]
        assert answer.status_code == 200, answer.text
    finally:
        os.killpg(make.pid, signal.SIGINT)
        make.wait(timeout=60)
    assert _status(clone) == []
    ignored = {
        line.removeprefix("!! ") for line in _status(clone, "--ignored") if not line.endswith("__pycache__/")
    }
    assert ignored <= {".venv", ".cache/"}, ignored  # no .deltagate/ (or any state) in the clone
    state = tmp_path / "state-home" / "deltagate"
    assert (state / "admin_token").is_file(), sorted(p.name for p in tmp_path.iterdir())
