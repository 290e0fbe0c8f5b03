"""Real stack, started once per session: `deltagate serve` (uvicorn + two vLLM engines) and
stock vLLM reference engines serving checkpoints merged offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from loaders import engine
from loaders.engine import EngineProcess, EngineSpec, cores_for, free_port
from loaders.mock_engine import mock_engine_command
from server import launch

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


# Answers served while other requests share the engine's batch are compared to the one-at-a-time
# references by their greedy tokens and text, and logprobs within LOGPROB_ATOL: the CPU build's bf16
# kernels are not batch-invariant on every machine. On this project's machine of 2026-12-03 (Xeon with
# AVX512-BF16), prompt 1 came back with the reference's tokens but logprobs moved: by one float32 ulp
# under six clients (tied-half, in 110 of 139 answers; on the session's first commit as well), and
# by up to 0.03 in a batch of two (tied-part2), while one request at a time every answer is
# bit-identical (the exactness tests; the tests using this also re-ask one at a time).
LOGPROB_ATOL = 0.05


def same_batched(got: dict, want: dict) -> bool:
    """`got` (served in a batch) has `want`'s greedy tokens and its logprobs within LOGPROB_ATOL."""
    if got["text"] != want["text"] or got["tokens"] != want["tokens"]:
        return False
    pairs = zip(got["token_logprobs"], want["token_logprobs"], strict=True)
    return all(abs(a - b) <= LOGPROB_ATOL for a, b in pairs)


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


# Tools and structured output need the same engine flags on both sides: the stack starts base
# tied's engine with them (launch_stack), and the references of tied and tied-inst with these.
# No free whitespace in JSON output: a random pico model would otherwise emit only whitespace.
JSON_COMPACT = '{"backend": "xgrammar", "disable_any_whitespace": true}'
TOOL_FLAGS = (
    "--enable-auto-tool-choice",
    "--tool-call-parser",
    "hermes",
    "--structured-outputs-config",
    JSON_COMPACT,
)
STORE_ENV = (("VLLM_ENABLE_RESPONSES_API_STORE", "1"),)  # as `serve --responses-store` gives engines
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CAPITAL = {
    "type": "object",
    "properties": {"capital": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["capital"],
    "additionalProperties": False,
}
API_TEXT = "Tell me about deltas."


def _no_whitespace(tokenizer: Path) -> dict[str, int]:
    """A logit bias against every whitespace-only token: within a tool call's grammar (whose free
    whitespace vLLM's structural tags keep) a random model then writes the call out."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return {str(i): -100 for t, i in tok.get_vocab().items() if not tok.convert_tokens_to_string([t]).strip()}


def client_api_answers(url: str, model: str, tokenizer: Path) -> dict:
    """What the real `openai` and `anthropic` SDKs get from `model`, greedy: the Responses and Messages
    APIs plain and streamed, Anthropic's token count, a forced tool call and tools offered with
    "auto" (chat, Responses, Messages), a json_schema answer. `stream_models`: the model named in
    the stream events that carry one."""
    import anthropic
    import openai

    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    an = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
    greedy = {"temperature": 0}
    msgs = [{"role": "user", "content": API_TEXT}]
    out: dict = {}
    r = oa.responses.create(
        model=model,
        input=API_TEXT,
        max_output_tokens=MAX_TOKENS,
        temperature=0,
        top_logprobs=2,
        include=["message.output_text.logprobs"],
    )
    logprobs = [(lp.token, lp.logprob) for lp in r.output[-1].content[0].logprobs]
    out["responses"] = {
        "text": r.output_text,
        "logprobs": logprobs,
        "usage": (r.usage.input_tokens, r.usage.output_tokens),
    }
    c = oa.responses.create(
        model=model, input="And then?", previous_response_id=r.id, max_output_tokens=MAX_TOKENS, temperature=0
    )
    usage = (c.usage.input_tokens, c.usage.output_tokens)
    retrieved = oa.responses.retrieve(r.id).output_text
    out["responses_continued"] = {"text": c.output_text, "usage": usage, "retrieved": retrieved}
    events = list(
        oa.responses.create(
            model=model, input=API_TEXT, max_output_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    out["responses_stream"] = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    models = {e.response.model for e in events if hasattr(e, "response")}
    m = an.messages.create(model=model, max_tokens=MAX_TOKENS, messages=msgs, extra_body=greedy)
    out["messages"] = {
        "text": m.content[0].text,
        "stop": m.stop_reason,
        "usage": (m.usage.input_tokens, m.usage.output_tokens),
    }
    with an.messages.stream(model=model, max_tokens=MAX_TOKENS, messages=msgs, extra_body=greedy) as s:
        text, final = "".join(s.text_stream), s.get_final_message()
    models.add(final.model)
    out["messages_stream"] = {"text": text, "usage": (final.usage.input_tokens, final.usage.output_tokens)}
    out["count_tokens"] = an.messages.count_tokens(model=model, messages=msgs).input_tokens
    bias = _no_whitespace(tokenizer)
    tool = {"type": "function", "function": WEATHER}
    c = oa.chat.completions.create(
        model=model,
        messages=msgs,
        tools=[tool],
        max_tokens=150,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=bias,
    )
    calls = [(t.function.name, t.function.arguments) for t in c.choices[0].message.tool_calls]
    finish, tokens = c.choices[0].finish_reason, c.usage.completion_tokens
    out["tool_call"] = {"calls": calls, "finish": finish, "tokens": tokens}
    c = oa.chat.completions.create(
        model=model, messages=msgs, tools=[tool], tool_choice="auto", max_tokens=MAX_TOKENS, temperature=0
    )
    out["tool_auto"] = {
        "content": c.choices[0].message.content,
        "calls": c.choices[0].message.tool_calls,
        "prompt_tokens": c.usage.prompt_tokens,
    }
    r = oa.responses.create(
        model=model,
        input=API_TEXT,
        tools=[{"type": "function", **WEATHER}],
        tool_choice="required",
        max_output_tokens=150,
        temperature=0,
    )
    out["responses_tools"] = {
        "output": [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in r.output],
        "usage": r.usage.input_tokens,
    }
    schema = {k: WEATHER[k] for k in ("name", "description")} | {"input_schema": WEATHER["parameters"]}
    m = an.messages.create(
        model=model, max_tokens=MAX_TOKENS, messages=msgs, tools=[schema], extra_body=greedy
    )
    out["messages_tools"] = {
        "content": [b.model_dump(exclude={"id"}) for b in m.content],
        "usage": m.usage.input_tokens,
    }
    json_schema = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL}}
    c = oa.chat.completions.create(
        model=model, messages=msgs, max_tokens=40, temperature=0, response_format=json_schema
    )
    out["json_schema"] = c.choices[0].message.content
    out["stream_models"] = sorted(models)
    return out


@dataclass
class Stack:
    url: str
    state_dir: Path
    proc: subprocess.Popen
    work: Path
    log: Path
    refs: dict[str, list[dict]] = field(default_factory=dict)
    chat_refs: dict[str, dict] = field(default_factory=dict)
    api_refs: dict[str, dict] = field(default_factory=dict)  # client_api_answers of tied and tied-inst
    base_before: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {ADMIN}"}


def deltagate(*args: str) -> subprocess.CompletedProcess:
    """Run the `deltagate` CLI; fail the test with its output if it fails."""
    cmd = [sys.executable, "-m", "cli", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{cmd}\n{done.stdout}\n{done.stderr}"
    return done


def _merge(base: Path, terms: list[str], out: Path, *extra: str) -> Path:
    args = ["merge", "--base", base, "-o", out, *extra]
    for t in terms:
        args += ["--delta", t]
    deltagate(*args)
    return out


TIES_YAML = """name: tied-ties
merge_method: ties
base_model: tied
deltas:
  - delta: {a}
    parameters: {{weight: 0.7, density: 0.5}}
  - delta: {b}
    parameters: {{weight: 0.6, density: 0.3}}
"""
DARE_TERMS = [
    {"delta": "tied-d", "alpha": 0.8, "density": 0.5},
    {"delta": "tied-d2", "alpha": 0.5, "density": 0.7},
]
DARE_SEED = 5


def _compressed(tied, work: Path) -> Path:
    """An int4+zstd copy of tied's delta, made with the CLI as a user would."""
    int4 = work / "tied-int4.safetensors"
    deltagate("compress", tied.delta, "-o", int4, "--codec", "int4:group=32", "--zstd")
    return int4


def stack_references(tied, untied, updated: Path, parts, work: Path, shared: set) -> dict[str, Path]:
    """Checkpoints each variant must be identical to: post models, and offline merges (`shared`:
    those recorded elsewhere).

    tied-ties covers three things with one engine: a YAML recipe, TIES, and a compressed
    (int4+zstd) artifact decoded in the worker. tied-v2 is the updated base θ′ (registered at
    runtime by tests/server/test_bases.py), tied-v2-inst the ParamΔ transfer θ′ + Δ.
    """
    int4 = work / "tied-int4.safetensors"  # made by launch_stack
    ties = [f"{int4}:0.7:0.5", f"{tied.delta2}:0.6:0.3"]
    dare = [f"{tied.delta}:0.8:0.5", f"{tied.delta2}:0.5:0.7"]
    merges = {  # name: deltagate merge arguments (base, terms, extra flags); run three at a time
        "tied-half": (tied.base, [f"{tied.delta}:0.5"]),
        "tied-mix": (tied.base, [f"{tied.delta}:0.7", f"{tied.delta2}:0.4"]),
        "tied-ties": (tied.base, ties, "--method", "ties"),
        "tied-dare": (tied.base, dare, "--method", "dare_ties", "--seed", str(DARE_SEED)),
        "tied-v2-inst": (updated, [str(tied.delta)]),
        "tied-part1": (tied.base, [str(parts.part1)]),
        "tied-part2": (tied.base, [str(parts.part2)]),
    }
    with ThreadPoolExecutor(3) as pool:
        merged = {
            name: pool.submit(_merge, base, terms, work / name, *extra)
            for name, (base, terms, *extra) in merges.items()
        }
        refs = {"tied-inst": tied.post, "untied-inst": untied.post, "tied-v2": updated}
        refs = {name: path for name, path in refs.items() if name not in shared}
        return {**refs, **{name: future.result() for name, future in merged.items()}}


def ref_cores(index: int, engines: int = 1) -> str:
    """Cores for reference engine `index`, as many as the gateway engine it is compared with takes: a
    share of the machine when the gateway runs `engines` > 1, else what vLLM's auto-binding takes (all
    cores but one). Reference engines started together then spread over the cores instead of all
    binding to core 0; the same thread count keeps their answers bit-comparable."""
    cpus = sorted(os.sched_getaffinity(0))
    if engines > 1:
        return cores_for(index % engines, engines, cpus)
    take = max(1, len(cpus) - 1)
    return ",".join(str(cpus[(index + k) % len(cpus)]) for k in range(take))


def stock_engine(
    path: Path, log: Path, *extra: str, cores: str | None = None, env: tuple[tuple[str, str], ...] = ()
) -> EngineProcess:
    """Stock vLLM (no deltagate worker extension) serving `path` as model "ref"; not started yet."""
    env = (("VLLM_CPU_OMP_THREADS_BIND", cores),) + env if cores else env
    spec = EngineSpec(
        model=str(path), served_name="ref", max_model_len=512, extra_args=extra, log_path=log, env=env
    )
    return EngineProcess(spec, with_extension=False)


@dataclass(frozen=True)
class RefJob:
    """A stock vLLM engine to start on `model`, and what to record from it once it is up."""

    name: str
    model: Path
    record: Callable[[str], object]  # the engine's URL -> what tests compare with
    extra: tuple[str, ...] = ()
    cores: str | None = None
    env: tuple[tuple[str, str], ...] = ()


def record_references(jobs: list[RefJob], logs: Path, at_once: int = 3) -> dict[str, object]:
    """Start each job's engine, record what it answers, stop it: `at_once` engines at a time, the next
    starting as soon as one is done (measured: 3 at a time keeps both cores busy; more only takes
    memory)."""

    def run(job: RefJob) -> object:
        proc = stock_engine(job.model, logs / f"ref-{job.name}.log", *job.extra, cores=job.cores, env=job.env)
        proc.start()
        try:
            proc.wait_ready(timeout=900)
            return job.record(proc.url)
        finally:
            proc.stop()

    with ThreadPoolExecutor(at_once) as pool:
        futures = {job.name: pool.submit(run, job) for job in jobs}
        return {name: future.result() for name, future in futures.items()}


def answers(url: str) -> dict:
    """What a stack variant's reference records: greedy completions and a chat answer."""
    return {"completions": completion_outputs(url, "ref"), "chat": chat_output(url, "ref")}


def start_gateway(
    args: list[str], state_dir: Path, port: int, log: Path, env: dict | None = None
) -> subprocess.Popen:
    """A gateway of the tests: the admin token ADMIN, a 512-token context (pico)."""
    return launch.start_gateway(port, state_dir, log, ADMIN, "--max-model-len", "512", *args, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    try:
        engine.wait_healthy(url, proc, timeout, "gateway", log)
    except engine.EngineError as exc:
        raise RuntimeError(f"{exc}\n{log.read_text()[-4000:]}") from exc


stop_gateway = launch.stop_gateway


def launch_stack(tied, untied, parts, work: Path) -> Stack:
    """Start the stack's gateway, bases `tied` and `untied` and start-up variants (returns at once:
    its engines start while the reference engines do, tests/conftest.py::fleet)."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    int4 = _compressed(tied, work)
    ties_yaml = work / "tied-ties.yaml"
    ties_yaml.write_text(TIES_YAML.format(a=int4, b=tied.delta2))
    log = work / "gateway.log"
    proc = start_gateway(
        [
            "--base",
            f"tied={tied.base}",
            "--base",
            f"untied={untied.base}",
            "--variant",
            f"tied-inst={tied.delta}",
            "--variant",
            f"tied-half={tied.delta}:0.5",
            "--variant",
            f"tied-mix={tied.delta}:0.7,{tied.delta2}:0.4",
            "--variant",
            f"tied-part1={parts.part1}",
            "--variant",
            f"tied-part2={parts.part2}",
            "--recipe",
            str(ties_yaml),
            "--allow-code-execution",  # HumanEval through real engines (sandboxed)
            # a variant registered while serving is read at its first swap, not at registration: the
            # failed-swap tests break its file in between (warming: test_partial_swaps.py, test_aliases.py)
            "--no-warm-on-register",
            "--tool-parser",
            "tied=hermes",
            "--responses-store",
        ],
        work / "state",
        port,
        log,
        env={"DELTAGATE_ENGINE_ARGS": json.dumps(["--structured-outputs-config", JSON_COMPACT])},
    )
    return Stack(url=f"http://127.0.0.1:{port}", state_dir=work / "state", proc=proc, work=work, log=log)


@pytest.fixture(scope="session")
def stack(fleet, tied, untied) -> Stack:
    """The gateway with bases `tied` and `untied`, and stock vLLM's answers for its variants (recorded
    by the fleet); a delta and variants registered through the API."""
    stack = fleet.stack
    wait_healthy(stack.url, stack.proc, stack.log)
    for base in ("tied", "untied"):  # before any swap: the weights as vLLM loaded them
        stack.base_before[base] = completion_outputs(stack.url, base)
    r = httpx.post(
        f"{stack.url}/v1/deltas", json={"name": "untied-d", "path": str(untied.delta)}, headers=stack.admin
    )
    assert r.status_code == 201, r.text
    r = httpx.post(
        f"{stack.url}/v1/variants",
        json={"name": "untied-inst", "base": "untied", "deltas": [{"delta": "untied-d", "alpha": 1.0}]},
        headers=stack.admin,
    )
    assert r.status_code == 201, r.text
    for name, path in (("tied-d", tied.delta), ("tied-d2", tied.delta2)):
        r = httpx.post(f"{stack.url}/v1/deltas", json={"name": name, "path": str(path)}, headers=stack.admin)
        assert r.status_code == 201, r.text
    body = {
        "name": "tied-dare",
        "base": "tied",
        "deltas": DARE_TERMS,
        "method": "dare_ties",
        "seed": DARE_SEED,
    }
    r = httpx.post(f"{stack.url}/v1/variants", json=body, headers=stack.admin)
    assert r.status_code == 201, r.text
    return stack


def engine_leader(stack, base: str) -> psutil.Process:
    """The process that leads `base`'s engine's process group (its API server)."""
    bases = httpx.get(stack.url + "/v1/bases", headers=stack.admin).json()["data"]
    port = next(b["engine_url"] for b in bases if b["name"] == base).rsplit(":", 1)[1]
    return next(
        p
        for p in psutil.process_iter(["cmdline"])
        if p.info["cmdline"] and f"--port {port}" in " ".join(p.info["cmdline"])
    )


def metric_families(url: str) -> dict:
    """The gateway's /metrics, parsed: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}


def sample_value(families: dict, sample: str, **labels) -> float:
    """Sum of the samples named `sample` whose labels include `labels` (0 if none)."""
    return sum(
        s.value
        for f in families.values()
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


@dataclass
class MockStack:
    """`deltagate serve` attached to a mock engine (loaders/mock_engine.py): no vLLM, starts in seconds."""

    url: str
    engine_url: str
    admin: dict
    log: Path


MOCK_TOKENS_PER_SECOND = 50


@pytest.fixture(scope="session")
def mock_stack(tied, tmp_path_factory) -> Iterator[MockStack]:
    """Base `mock` (tied's checkpoint) on a mock engine; variants mock-inst (Δ) and mock-half (0.5·Δ)."""
    with mock_gateway(tied, tmp_path_factory.mktemp("mock-stack"), MOCK_TOKENS_PER_SECOND) as stack:
        yield stack


def start_mock_engine(
    work: Path, served_name: str, tokens_per_second: float, swap_seconds: float = 0.0
) -> tuple[subprocess.Popen, str]:
    """A mock engine on a free port, answering health (its log: work/mock-engine.log); (process, URL)."""
    port, log = free_port(), work / "mock-engine.log"
    proc = subprocess.Popen(
        mock_engine_command(port, served_name, tokens_per_second, swap_seconds),
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log, timeout=60)
    return proc, url


def jsonl_eval(url: str, headers: dict, name: str, items: int) -> str:
    """An eval of `items` JSONL items {"q": i}, completions, passing when the answer holds a "w"
    (the mock engine's words do); its id."""
    content = "\n".join(f'{{"q": "{i}"}}' for i in range(items))
    criterion = {
        "type": "string_check",
        "name": "w",
        "input": "{{sample.output_text}}",
        "reference": "w",
        "operation": "like",
    }
    body = {
        "name": name,
        "data_source": {"type": "jsonl", "content": content},
        "prompt": "{{item.q}}",
        "endpoint": "completions",
        "testing_criteria": [criterion],
    }
    r = httpx.post(f"{url}/v1/evals", headers=headers, json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@contextmanager
def mock_gateway(
    tied, work: Path, tokens_per_second: float, gateway_args: tuple[str, ...] = ()
) -> Iterator[MockStack]:
    """A mock engine and `deltagate serve` attached to it, with the mock stack's variants."""
    mock, engine_url = start_mock_engine(work, "mock", tokens_per_second, 0.05)
    port, log = free_port(), work / "gateway.log"
    proc = None
    try:
        args = [
            "--base",
            f"mock={tied.base}",
            "--engine-url",
            f"mock={engine_url}",
            "--variant",
            f"mock-inst={tied.delta}",
            "--variant",
            f"mock-half={tied.delta}:0.5",
            *gateway_args,
        ]
        proc = start_gateway(args, work / "state", port, log)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log, timeout=120)
        yield MockStack(url, engine_url, {"Authorization": f"Bearer {ADMIN}"}, log)
    finally:
        if proc is not None:
            stop_gateway(proc)
        stop_gateway(mock)


@contextmanager
def restartable_mock_gateway(tied, tmp_path, *extra: str):
    """A mock engine (50 tok/s) and a gateway on it (base mock, variant mock-inst) that a test restarts
    (or kills) while the engine stays up; yields (url, restart, gateway log)."""
    mock, engine_url = start_mock_engine(tmp_path, "mock", 50)
    args = [
        "--base",
        f"mock={tied.base}",
        "--engine-url",
        f"mock={engine_url}",
        "--variant",
        f"mock-inst={tied.delta}",
        *extra,
    ]
    port, log = free_port(), tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    gateway = None

    def restart(*, kill: bool) -> None:
        nonlocal gateway
        if gateway is not None:
            os.killpg(gateway.pid, signal.SIGKILL) if kill else stop_gateway(gateway)
            gateway.wait()
        gateway = start_gateway(args, tmp_path / "state", port, log)
        wait_healthy(url, gateway, log, timeout=120)

    try:
        restart(kill=False)
        yield url, restart, log
    finally:
        if gateway is not None:
            stop_gateway(gateway)
        stop_gateway(mock)
