"""What a compressed delta costs: per-tensor error, and on a served model token agreement, KL, task score.

Served measures are teacher-forced on the exact variant's own greedy continuations: both
variants score the same token sequences (vLLM prompt logprobs), so every position is
compared in the same context. Agreement: the compressed variant's top-1 token equals the
exact variant's. KL(exact ‖ compressed) is estimated from the top-K logprobs the engine
returns: tokens one side did not return get that side's smallest returned probability (an
upper bound), and the remaining mass is one tail bucket.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltas import DeltaArtifact, DeltaTerm, IncompatibleError, Recipe
from deltas.build import relative_error
from loaders.engine import EngineClient, EngineProcess, EngineSpec, engine_http

TOP_K = 20
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "import numpy as np\n\ndef normalize(x):",
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which",
    "A haiku about the sea:\n",
    "The French word for 'thank you' is",
    "In 1969, humans first",
    "SELECT name FROM users WHERE",
    "The main causes of the First World War were",
    "What is 27 + 48? The answer is",
    "Here is a list of healthy breakfast ideas:\n1.",
)


@dataclass(frozen=True)
class TensorError:
    name: str
    encoding: str
    rel_error: float


@dataclass(frozen=True)
class Probe:
    """A teacher-forced sequence: prompt ids + the exact variant's greedy continuation."""

    ids: list[int]
    start: int  # positions start..len(ids)-1 are compared

    @staticmethod
    def request(prompt: str, max_tokens: int) -> dict:
        """The completion body that draws a probe: the greedy continuation, as token ids."""
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}

    @classmethod
    def of(cls, choice: dict) -> Probe:
        """The probe in a choice answered to `request`."""
        prompt_ids = list(choice["prompt_token_ids"])
        return cls(prompt_ids + list(choice["token_ids"]), len(prompt_ids))

    def distributions_request(self) -> dict:
        """The completion body that scores the probe's tokens: top-K prompt logprobs, teacher-forced."""
        return {"prompt": self.ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": TOP_K}

    def distributions(self, choice: dict) -> list[dict[int, float]]:
        """Top-K next-token logprobs at every compared position, from a choice answered to that."""
        return [top_logprobs(e) for e in choice["prompt_logprobs"][self.start :]]


@dataclass
class ServedFidelity:
    positions: int
    agreement: float
    mean_kl: float
    task_score: float | None = None
    reference_task_score: float | None = None
    swap_seconds: float | None = None


def check_same_delta(compressed: DeltaArtifact, reference: DeltaArtifact) -> None:
    """Refuse to compare artifacts of different deltas (base, post or tensors differ)."""
    a, b = compressed.manifest, reference.manifest
    for role in ("base", "post"):
        if getattr(a, role).content_hash != getattr(b, role).content_hash:
            raise IncompatibleError(
                f"{compressed.path} and {reference.path} are deltas of different {role} models "
                f"({getattr(a, role).content_hash[:12]}… vs {getattr(b, role).content_hash[:12]}…)"
            )
    if [(t.name, t.shape) for t in a.tensors] != [(t.name, t.shape) for t in b.tensors]:
        raise IncompatibleError(f"{compressed.path} and {reference.path} hold different tensors")


def tensor_errors(compressed: DeltaArtifact, reference: DeltaArtifact) -> list[TensorError]:
    """‖Δ_compressed − Δ_reference‖ / ‖Δ_reference‖ per tensor, decoded from both files."""
    check_same_delta(compressed, reference)
    return [
        TensorError(
            entry.name,
            entry.encoding,
            relative_error(compressed.delta(entry.name).full(), reference.delta(entry.name).full()),
        )
        for entry in compressed.manifest.tensors
    ]


def top_logprobs(entry: dict) -> dict[int, float]:
    """A vLLM prompt-logprobs entry ({"id": {"logprob", "rank", ...}}) as {id: logprob}."""
    return {int(k): v["logprob"] for k, v in entry.items()}


def top1(dist: dict[int, float]) -> int:
    return max(dist, key=dist.__getitem__)


def kl_topk(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(p ‖ q) over the union of both top-K supports plus one tail bucket (see module doc)."""
    support = set(p) | set(q)
    floor_p, floor_q = min(p.values()), min(q.values())
    pp = {t: math.exp(p.get(t, floor_p)) for t in support}
    qq = {t: math.exp(q.get(t, floor_q)) for t in support}
    tail_p, tail_q = max(0.0, 1 - sum(pp.values())), max(0.0, 1 - sum(qq.values()))
    kl = sum(pv * math.log(pv / max(qq[t], 1e-30)) for t, pv in pp.items() if pv > 0)
    if tail_p > 0:
        kl += tail_p * math.log(tail_p / max(tail_q, 1e-30))
    return max(kl, 0.0)


def agreement(reference: list[dict[int, float]], other: list[dict[int, float]]) -> tuple[int, float]:
    """Along one probe: how many top-1 tokens agree, and the summed KL(reference ‖ other)."""
    pairs = list(zip(reference, other, strict=True))
    return sum(top1(p) == top1(q) for p, q in pairs), sum(kl_topk(p, q) for p, q in pairs)


def compare(reference: list[list[dict[int, float]]], other: list[list[dict[int, float]]]) -> ServedFidelity:
    """Agreement and mean KL over all compared positions."""
    agree, kl, n = 0, 0.0, 0
    for ref_seq, seq in zip(reference, other, strict=True):
        a, k = agreement(ref_seq, seq)
        agree, kl, n = agree + a, kl + k, n + len(seq)
    return ServedFidelity(positions=n, agreement=agree / n if n else 1.0, mean_kl=kl / n if n else 0.0)


class Prober:
    """Greedy probes and teacher-forced distributions from one engine's OpenAI API."""

    def __init__(self, url: str, model: str, concurrency: int = 8):
        self.http = engine_http(url)
        self.model = model
        self._gate = asyncio.Semaphore(concurrency)

    async def close(self) -> None:
        await self.http.aclose()

    async def _complete(self, body: dict) -> dict:
        async with self._gate:
            resp = await self.http.post("/v1/completions", json={"model": self.model, **body})
        resp.raise_for_status()
        return resp.json()["choices"][0]

    async def probe(self, prompt: str, max_tokens: int) -> Probe:
        """The current weights' greedy continuation of `prompt`, as token ids."""
        return Probe.of(await self._complete(Probe.request(prompt, max_tokens)))

    async def distributions(self, probe: Probe) -> list[dict[int, float]]:
        """Top-K next-token logprobs at every compared position of `probe`."""
        return probe.distributions(await self._complete(probe.distributions_request()))

    async def all_distributions(self, probes: list[Probe]) -> list[list[dict[int, float]]]:
        return list(await asyncio.gather(*(self.distributions(p) for p in probes)))


TaskScore = Callable[[str, str], float]  # (engine url, model) -> score under the current weights


@dataclass
class Reference:
    """The exact variant's greedy probes, its distributions along them, and its task score."""

    probes: list[Probe]
    distributions: list[list[dict[int, float]]]
    task_score: float | None


async def record_reference(
    client: EngineClient,
    prober: Prober,
    base: str,
    exact: Path,
    prompts: list[str],
    max_tokens: int,
    task: TaskScore | None = None,
) -> Reference:
    """Apply the exact delta and record what every compressed variant is compared with."""
    await client.apply(Recipe(base=base, deltas=[DeltaTerm(path=str(exact))]))
    probes = list(await asyncio.gather(*(prober.probe(p, max_tokens) for p in prompts)))
    distributions = await prober.all_distributions(probes)
    score = await asyncio.to_thread(task, client.url, prober.model) if task else None
    return Reference(probes, distributions, score)


async def score_variant(
    client: EngineClient,
    prober: Prober,
    base: str,
    artifact: Path,
    reference: Reference,
    task: TaskScore | None = None,
) -> ServedFidelity:
    """Swap `artifact` in and compare it with `reference` on the same token sequences."""
    start = time.perf_counter()
    await client.apply(Recipe(base=base, deltas=[DeltaTerm(path=str(artifact))]))
    swap_seconds = time.perf_counter() - start
    result = compare(reference.distributions, await prober.all_distributions(reference.probes))
    result.swap_seconds = swap_seconds
    result.reference_task_score = reference.task_score
    if task:
        result.task_score = await asyncio.to_thread(task, client.url, prober.model)
    return result


async def measure_served(
    url: str,
    model: str,
    base: str,
    exact: Path,
    compressed: Path,
    prompts: list[str],
    max_tokens: int = 32,
    task: TaskScore | None = None,
) -> ServedFidelity:
    """Exact then compressed variant on a running deltagate engine, compared."""
    client, prober = EngineClient(url, model), Prober(url, model)
    try:
        reference = await record_reference(client, prober, base, exact, prompts, max_tokens, task)
        return await score_variant(client, prober, base, compressed, reference, task)
    finally:
        await client.close()
        await prober.close()


def start_engine(base: str, log_dir: Path, max_model_len: int | None = None) -> EngineProcess:
    """A deltagate-enabled engine on `base` (blocking until healthy); context ≤ 2048 by default."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if max_model_len is None:
        config = json.loads((Path(base) / "config.json").read_text())
        max_model_len = min(2048, int(config.get("max_position_embeddings", 2048)))
    spec = EngineSpec(
        model=base,
        served_name="fidelity",
        max_model_len=max_model_len,
        log_path=log_dir / "fidelity-engine.log",
    )
    proc = EngineProcess(spec)
    proc.start()
    proc.wait_ready(timeout=1800)
    return proc
