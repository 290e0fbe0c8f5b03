"""Whether this vLLM build serves `--scheduling-policy priority` (what `serve --priority-scheduling`
gives managed engines) with a request `priority`, and answers as the default policy does.

    .venv/bin/python bench/priority_engine.py

Starts a stock vLLM engine on a pico checkpoint with each policy, one after the other, and asks the
same greedy completion (priority 0 and 1 on the priority engine). Prints the statuses and whether
the logprobs are bit-identical. About a minute of CPU per engine.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loaders.engine import EngineProcess, EngineSpec  # noqa: E402
from loaders.pico import make_pico_base  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="deltagate-priority-"))
    base = make_pico_base(work / "pico")
    answers: dict[str, list] = {}
    for policy in ("fcfs", "priority"):
        spec = EngineSpec(
            model=str(base),
            served_name="p",
            max_model_len=512,
            extra_args=("--scheduling-policy", policy),
            log_path=work / f"{policy}.log",
        )
        proc = EngineProcess(spec, with_extension=False)
        proc.start()
        try:
            proc.wait_ready(600)
            answers[policy] = []
            for priority in (0, 1):
                body = {"model": "p", "prompt": "The capital of France", "max_tokens": 12, "temperature": 0}
                body |= {"logprobs": 3} | ({"priority": priority} if policy == "priority" else {})
                r = httpx.post(proc.url + "/v1/completions", json=body, timeout=120)
                got = r.json()["choices"][0]["logprobs"]["token_logprobs"] if r.status_code == 200 else r.text
                answers[policy].append((r.status_code, got))
        finally:
            proc.stop()
    print("statuses: fcfs", [s for s, _ in answers["fcfs"]], "priority", [s for s, _ in answers["priority"]])
    same = answers["priority"][0][1] == answers["priority"][1][1] == answers["fcfs"][0][1]
    print("priority engine's answers (priority 0 and 1) bit-identical to fcfs:", same)


if __name__ == "__main__":
    main()
