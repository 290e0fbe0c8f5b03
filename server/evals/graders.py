"""Graders: OpenAI-Evals-style `string_check` and numeric match, and the built-in task graders.

Templates name fields with `{{item.FIELD}}` (the eval item) and `{{sample.output_text}}` (the
model's answer). A template naming a missing field is refused when the eval is defined.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field

_FIELD = re.compile(r"\{\{\s*(item|sample)\.([A-Za-z0-9_]+)\s*\}\}")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")
_CODE_BLOCK = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def template_fields(template: str) -> list[tuple[str, str]]:
    """The (namespace, field) pairs a template uses."""
    return _FIELD.findall(template)


def render(template: str, item: dict, sample: dict | None = None) -> str:
    """Fill `{{item.x}}` / `{{sample.x}}` (KeyError names a missing field)."""

    def value(m: re.Match) -> str:
        scope = item if m[1] == "item" else (sample or {})
        return str(scope[m[2]])

    return _FIELD.sub(value, template)


class StringCheck(BaseModel):
    """Compare two rendered strings: eq, ne, like (substring), ilike (case-insensitive), regex."""

    type: Literal["string_check"] = "string_check"
    name: str
    input: str = "{{sample.output_text}}"
    reference: str
    operation: Literal["eq", "ne", "like", "ilike", "regex"] = "eq"

    def grade(self, item: dict, sample: dict) -> bool:
        got, ref = render(self.input, item, sample).strip(), render(self.reference, item, sample).strip()
        match self.operation:
            case "eq":
                return got == ref
            case "ne":
                return got != ref
            case "like":
                return ref in got
            case "ilike":
                return ref.lower() in got.lower()
            case "regex":
                return re.search(ref, got) is not None


class NumericMatch(BaseModel):
    """The first (or last) number in the input equals the reference number within `tolerance`."""

    type: Literal["numeric_match"] = "numeric_match"
    name: str
    input: str = "{{sample.output_text}}"
    reference: str
    pick: Literal["first", "last"] = "first"
    tolerance: float = Field(0.0, ge=0)

    def grade(self, item: dict, sample: dict) -> bool:
        numbers = [parse_number(n) for n in _NUMBER.findall(render(self.input, item, sample))]
        numbers = [n for n in numbers if n is not None]
        ref = parse_number(render(self.reference, item, sample))
        if not numbers or ref is None:
            return False
        got = numbers[0] if self.pick == "first" else numbers[-1]
        return abs(got - ref) <= self.tolerance


class GSM8KMatch(BaseModel):
    """GSM8K's final answer: `strict` reads "#### N" or "The answer is N", `flexible` the last number."""

    type: Literal["gsm8k"] = "gsm8k"
    name: str
    mode: Literal["strict", "flexible"]

    def grade(self, item: dict, sample: dict) -> bool:
        text = sample["output_text"]
        if self.mode == "strict":
            m = re.search(r"(?:####|[Tt]he answer is)\s*\$?(-?[\d,]*\.?\d+)", text)
            got = parse_number(m[1]) if m else None
        else:
            numbers = [parse_number(n) for n in _NUMBER.findall(text)]
            got = next((n for n in reversed(numbers) if n is not None), None)
        return got is not None and abs(got - float(item["answer"])) < 1e-6


class ChoiceMatch(BaseModel):
    """Multiple choice: right if the most likely choice (per character if `normalize`) is the label."""

    type: Literal["choice"] = "choice"
    name: str
    normalize: bool = False

    def grade(self, item: dict, sample: dict) -> bool:
        scores = [
            lp / max(1, len(c)) if self.normalize else lp
            for lp, c in zip(sample["choice_logprobs"], item["choices"], strict=True)
        ]
        return max(range(len(scores)), key=scores.__getitem__) == item["label"]


class ProgramPasses(BaseModel):
    """HumanEval pass@1: prompt + completion + the problem's tests, run in the sandbox; exit 0 passes.

    Built in (not a user grader): it needs the server started with code execution allowed."""

    type: Literal["code_execution"] = "code_execution"
    name: str
    extract_code: bool = False  # instruct style: the answer's first code block is the program

    def program(self, item: dict, sample: dict) -> str:
        """The program HumanEval's own harness runs for a completion (or for an answer's code block,
        placed after the prompt so the prompt's imports hold and the answer's function wins)."""
        answer = sample["output_text"]
        if self.extract_code:
            block = _CODE_BLOCK.search(answer)
            answer = "\n" + (block[1] if block else answer)
        return f"{item['prompt']}{answer}\n\n{item['test']}\n\ncheck({item['entry_point']})\n"


class GreedyMatch(BaseModel):
    """Fidelity: the variant's top-1 token equals the reference's at every compared position."""

    type: Literal["greedy_match"] = "greedy_match"
    name: str = "greedy_match"

    def grade(self, item: dict, sample: dict) -> bool:
        return sample["agree"] == sample["positions"]


def continuation_logprob(logprobs: dict, start: int, end: int) -> float:
    """Sum of the logprobs of the prompt tokens that start in [start, end) (vLLM `echo` logprobs)."""
    total = 0.0
    for offset, lp in zip(logprobs["text_offset"], logprobs["token_logprobs"], strict=True):
        if start <= offset < end:
            if lp is None:
                raise ValueError("the continuation starts the prompt: no logprob for its first token")
            total += lp
    return total


def prompt_nll(logprobs: dict, end: int) -> tuple[float, int]:
    """Negative log-likelihood and token count of the prompt tokens starting before `end` (echo
    logprobs); the first token has no logprob (nothing conditions it) and is not counted."""
    nll, tokens = 0.0, 0
    for offset, lp in zip(logprobs["text_offset"], logprobs["token_logprobs"], strict=True):
        if offset < end and lp is not None:
            nll, tokens = nll - lp, tokens + 1
    return nll, tokens


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


Grader = Annotated[StringCheck | NumericMatch | GSM8KMatch, Field(discriminator="type")]
