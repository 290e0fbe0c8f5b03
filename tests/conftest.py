"""Shared fixtures: pico checkpoints built once per session (seeded, offline)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

# Every vLLM engine of the suite (the stock references and the gateways' own alike: they inherit
# this) runs its model worker inside its EngineCore process. vLLM's CPU build otherwise spawns a
# third process per engine, which imports vLLM once more: 46 against 64 CPU-seconds per start
# (bench/engine_start.py --configs inproc-worker,default), and the suite is made of engine starts.
# Both sides of every comparison run the same way, one torch thread each; `make serve` and the
# benchmarks keep vLLM's default. TP engines (world size 2) keep their worker processes.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from loaders.pico import PicoSpec, make_pico_base, make_pico_post

# `make test` runs two pytest-xdist workers (--dist loadgroup): a group's tests run in one worker, in
# order. Every module that uses the shared stack (the fleet fixture: its gateway or its references)
# is one group, so the fleet starts once; any other module is a group of its own, run by whichever
# worker is free. The longest go first, so that the last ones are short (measured alone, 2 cores:
# the stack ~1150 s, tensor parallel ~200 s, SmolLM2 ~180 s, the Ray pool ~150 s).
LONGEST_FIRST = (
    "stack",
    "test_model_matrix",
    "test_tensor_parallel",
    "test_real_model",
    "test_faults",
    "test_fidelity",
)
# Ray tests that join a cluster with `--ray-address auto` run in the stack's worker, after it: a
# Ray started by ray.init() leaves no address file, so `auto` joins any cluster running on the
# machine — seen joining test_cluster.py's (stack) cluster from the other worker.
WITH_THE_STACK = {"tests.server.cluster.test_cluster_pool"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (it adds them to the test ids)
def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its xdist group, and order the groups longest first (stable within one)."""
    stack_modules = {item.module.__name__ for item in items if "fleet" in item.fixturenames}

    def group(item) -> str:
        module = item.module.__name__
        return "stack" if module in stack_modules | WITH_THE_STACK else module.rsplit(".", 1)[-1]

    groups = {item.nodeid: group(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(groups[item.nodeid], len(rank)))


def pytest_configure(config) -> None:
    """Refuse a pytest whose test ids xdist cannot group: each worker would start the fleet of its
    own (twice the engines: more memory than this machine has)."""
    version = tuple(map(int, pytest.__version__.split(".")[:2]))
    if config.getoption("dist", None) == "loadgroup" and version >= (9, 2):  # None: xdist not loaded
        raise pytest.UsageError(
            f"pytest {pytest.__version__}: pytest-xdist 3.8 cannot group tests on pytest "
            ">= 9.2 (--dist loadgroup); install the versions pyproject.toml pins"
        )


@dataclass(frozen=True)
class PicoFamily:
    """A base, two post-trained models of it, and the deltas between them."""

    base: Path
    post: Path
    post2: Path
    delta: Path
    delta2: Path


def build_family(root: Path, spec: PicoSpec, seed: int) -> PicoFamily:
    from deltas import extract_delta

    base = make_pico_base(root / "base", spec, seed=seed)
    post = make_pico_post(base, root / "post", seed=seed + 1)
    post2 = make_pico_post(base, root / "post2", seed=seed + 2, chat_template=None)
    extract_delta(base, post, root / "delta.safetensors")
    extract_delta(base, post2, root / "delta2.safetensors")
    return PicoFamily(base, post, post2, root / "delta.safetensors", root / "delta2.safetensors")


@pytest.fixture(scope="session")
def tied(tmp_path_factory) -> PicoFamily:
    """bf16 Llama with tied input/output embeddings (the DESIGN.md pitfall)."""
    return build_family(tmp_path_factory.mktemp("tied"), PicoSpec(tie_word_embeddings=True), seed=0)


@pytest.fixture(scope="session")
def untied(tmp_path_factory) -> PicoFamily:
    """fp32 Llama with a separate lm_head."""
    spec = PicoSpec(tie_word_embeddings=False, dtype="float32")
    return build_family(tmp_path_factory.mktemp("untied"), spec, seed=10)


@pytest.fixture(scope="session")
def tied_updated(tied, tmp_path_factory) -> Path:
    """θ′ for `tied`: its base moved by a small seeded update, as continued pre-training would."""
    return make_pico_post(
        tied.base, tmp_path_factory.mktemp("tied-updated") / "base", seed=50, scale=0.1, chat_template=None
    )


@dataclass(frozen=True)
class PartialDeltas:
    """Two deltas of `tied` covering a few tensors each (copied exactly from tied.delta), and what a swap
    to each from the base must rewrite: the tensors covered, widened to whole fused modules."""

    part1: Path
    part2: Path
    part1_rewrites: tuple[str, ...]
    part2_rewrites: tuple[str, ...]


PART1 = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
)
PART2 = ("model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight", "model.norm.weight")


@pytest.fixture(scope="session")
def tied_parts(tied, tmp_path_factory) -> PartialDeltas:
    """Partial deltas of `tied` with different coverage (an embedding, parts of fused modules, a norm)."""
    from deltas import Checkpoint, CodecPlan, compress_artifact

    work = tmp_path_factory.mktemp("parts")
    names = Checkpoint(tied.base).tensor_names()
    for part in (PART1, PART2):
        plan = CodecPlan(exclude=[n for n in names if n not in part])
        compress_artifact(tied.delta, work / f"part{1 + (part is PART2)}.safetensors", plan)
    qkv = ("q_proj", "k_proj", "v_proj")
    part1 = (
        PART1[0],
        *(f"model.layers.0.self_attn.{p}.weight" for p in qkv),
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    )
    part2 = (*(f"model.layers.1.self_attn.{p}.weight" for p in qkv), *PART2[1:])
    return PartialDeltas(work / "part1.safetensors", work / "part2.safetensors", part1, part2)


LOWRANK_CODECS = """default: lowrank:rank=8
exclude: ["*embed_tokens*", "lm_head.weight", "*norm*"]
"""


@dataclass(frozen=True)
class LowRank:
    """Rank-8 compressions of `untied`'s deltas, the first exported as a PEFT adapter, and what
    stock vLLM engines (no deltagate) answer for them (greedy, with logprobs)."""

    lowrank: Path  # untied.delta compressed to rank 8
    lowrank2: Path  # untied.delta2 compressed to rank 8
    adapter: Path  # `lowrank` exported as a PEFT LoRA adapter (deltagate export-lora)
    refs: dict[str, list[dict]]  # lr, lr-mix (offline merges), post, post-lora, peft, peft-base
    threads: int  # each reference engine's thread count (answers are comparable at equal counts)


@dataclass
class Fleet:
    """Every stock vLLM reference engine of the session, recorded in one pipeline (three at a time,
    tests/server/conftest.py::record_references), with the stack's gateway starting beside them:
    one start-up period for all, instead of one per fixture."""

    lowrank: LowRank
    stack: object  # tests.server.conftest.Stack: started, not yet waited for; its refs filled
    lm_eval: dict  # "tied", "tied-inst" -> lm-eval samples of stock vLLM; "tokenize" -> its tokens


@pytest.fixture(scope="session")
def fleet(tied, untied, tied_updated, tied_parts, tmp_path_factory) -> Fleet:
    """The references: the low-rank deltas merged offline (no LoRA), the post model with and
    without --enable-lora, the exported adapter through vLLM's own multi-LoRA (and that engine's
    plain base); the stack's variants (post models and offline merges); lm-eval on the base and
    on the post model."""
    from tests.server.conftest import (
        STORE_ENV,
        TOOL_FLAGS,
        RefJob,
        _merge,
        answers,
        chat_output,
        client_api_answers,
        deltagate,
        launch_stack,
        record_references,
        ref_cores,
        stack_references,
        stop_gateway,
    )
    from tests.server.evals import lmeval
    from tests.server.stock_answers import Stock

    work = tmp_path_factory.mktemp("fleet")
    stack = launch_stack(tied, untied, tied_parts, work / "stack")
    try:
        (work / "codecs.yaml").write_text(LOWRANK_CODECS)
        lr, lr2, adapter = work / "lowrank.safetensors", work / "lowrank2.safetensors", work / "adapter"
        deltagate("compress", untied.delta, "-o", lr, "--codec-recipe", work / "codecs.yaml")
        deltagate("compress", untied.delta2, "-o", lr2, "--codec-recipe", work / "codecs.yaml")
        deltagate("export-lora", lr, "-o", adapter)
        one = len(ref_cores(0).split(","))  # threads of an engine compared with a one-engine gateway
        two = len(ref_cores(0, engines=2).split(","))  # ... with one of the stack's two engines
        tasks = lmeval.write_tasks(work / "lm-eval-tasks")

        def lm_eval(name: str):
            return lambda url: lmeval.lm_eval_samples(url, "ref", tied.base, tasks, work / f"lm-{name}")

        def tied_inst(url: str) -> dict:
            lm = lm_eval("tied-inst")(url)
            apis = client_api_answers(url, "ref", tied.base)
            return {**answers(url), "lm-eval": lm, "tokenize": lmeval.tokenized(url, "ref"), "apis": apis}

        def tied_base(url: str) -> dict:
            apis = client_api_answers(url, "ref", tied.base)
            return {"lm-eval": lm_eval("tied")(url), "apis": apis, "chat": chat_output(url, "ref")}

        mix = [f"{lr}:0.5", f"{lr2}:0.5"]
        shared = {"untied-inst"} if one == two else set()  # the post model's answers serve both
        excluded = shared | {"tied-inst"}  # recorded by the jobs below
        checkpoints = stack_references(tied, untied, tied_updated, tied_parts, stack.work, excluded)
        # API server engines where a test needs more than completions (chat, tools, lm-eval); every
        # completions-only reference from one process of `vllm.LLM` instances beside them (an engine
        # start each of ~12 CPU-s, against ~45 for an API server), formatted by vLLM's own server code
        chats = {"tied-v2-inst"}
        jobs = [  # the longest first: the pipeline ends with short ones
            RefJob("tied-inst", tied.post, tied_inst, TOOL_FLAGS, ref_cores(0, engines=2), STORE_ENV),
            RefJob("lm-tied", tied.base, tied_base, TOOL_FLAGS, ref_cores(1, engines=2), STORE_ENV),
        ]
        jobs += [RefJob(name, checkpoints[name], answers, cores=ref_cores(1, engines=2)) for name in chats]
        completions = {"openai": True}
        stock_jobs = [
            {"key": "lr", "model": str(_merge(untied.base, [str(lr)], work / "m-lr")), "cores": ref_cores(0)},
            {"key": "lr-mix", "model": str(_merge(untied.base, mix, work / "m-mix")), "cores": ref_cores(0)},
            {"key": "post", "model": str(untied.post), "cores": ref_cores(0)},
            {"key": "post-lora", "model": str(untied.post), "cores": ref_cores(0), "lora": True},
            {"key": "peft", "model": str(untied.base), "cores": ref_cores(0), "lora": True},
        ]
        stock_jobs[-1]["adapters"] = {"-adapter": str(adapter)}  # answers "peft" (plain), "peft-adapter"
        stock_jobs += [
            {"key": name, "model": str(path), "cores": ref_cores(0, engines=2)}
            for name, path in checkpoints.items()
            if name not in chats
        ]
        stock = Stock.start([job | completions for job in stock_jobs], work / "stock", max_model_len=512)
        try:
            got = record_references(jobs, work)
            done = stock.answers()
        finally:
            stock.stop()
        refs = {name: done[name] for name in ("lr", "lr-mix", "post", "post-lora")}
        refs |= {"peft": done["peft-adapter"], "peft-base": done["peft"]}
        stack_answers = {name: got[name] for name in (*chats, "tied-inst")}
        stack.refs = {name: a["completions"] for name, a in stack_answers.items()}
        stack.refs |= {name: done[name] for name in checkpoints if name not in chats}
        stack.chat_refs = {name: a["chat"] for name, a in stack_answers.items()}
        if shared:
            stack.refs["untied-inst"] = done["post"]
        stack.api_refs = {"tied": got["lm-tied"]["apis"], "tied-inst": got["tied-inst"]["apis"]}
        stack.chat_refs["tied"] = got["lm-tied"]["chat"]
        lm = {
            "tied": got["lm-tied"]["lm-eval"],
            "tied-inst": got["tied-inst"]["lm-eval"],
            "tokenize": got["tied-inst"]["tokenize"],
            "tasks": tasks,
        }
        yield Fleet(LowRank(lr, lr2, adapter, refs, threads=one), stack, lm)
    finally:
        stop_gateway(stack.proc)


@pytest.fixture(scope="session")
def lowrank(fleet) -> LowRank:
    """Stock vLLM's answers for the low-rank deltas (shared by tests/loaders/test_lora.py and
    tests/server/test_adapters.py)."""
    return fleet.lowrank


@dataclass(frozen=True)
class S3Server:
    """A real S3-compatible server (moto's server mode) on loopback, and a bucket on it."""

    endpoint: str
    bucket: str


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """moto_server started as its own process; boto/s3fs clients here and in every process started
    from here (gateways, engines) reach it through AWS_ENDPOINT_URL."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from loaders.engine import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(endpoint, timeout=2)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        import s3fs

        s3fs.S3FileSystem().mkdir("deltagate-test")
        yield S3Server(endpoint, "deltagate-test")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Postgres:
    """A real PostgreSQL server (Debian's package) on loopback, in a throwaway data dir; it can be
    killed (-9) and started again on the same data and port."""

    def __init__(self, root: Path):
        import glob
        import shutil

        from loaders.engine import free_port

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found:
            raise RuntimeError("PostgreSQL is not installed (make system-deps installs Debian's postgresql)")
        self.bin = Path(found[-1]).parent
        self.root, self.port = root, free_port()
        self.data, self.log = root / "data", root / "postgres.log"
        self.url = f"postgresql://deltagate@127.0.0.1:{self.port}/postgres"
        self.proc = None
        shutil.chown(root, "postgres")  # the server refuses to run as root
        self._as_postgres(self.bin / "initdb", "-D", self.data, "-U", "deltagate", "--auth=trust")

    def _as_postgres(self, *cmd) -> None:
        import subprocess

        done = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, user="postgres")
        if done.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        import subprocess
        import time

        cmd = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.root),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user="postgres",
        )  # our child: reaped by wait()
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "deltagate"],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def database(self, name: str) -> str:
        """A new, empty database on this server: its URL (each test module its own state)."""
        self._as_postgres(self.bin / "createdb", "-h", "127.0.0.1", "-p", self.port, "-U", "deltagate", name)
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def kill(self) -> None:
        """kill -9 the server and every backend it forked."""
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def postgres() -> Postgres:
    """A PostgreSQL server for the shared state database (tests/server/test_shared_state.py)."""
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="deltagate-pg-"))  # not under pytest's root-only tmp dirs
    server = Postgres(root)
    server.start()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)
