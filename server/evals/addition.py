"""The skill task: two-digit addition as chat, with an exact-match score."""

from __future__ import annotations

import random
from dataclasses import dataclass

from server.evals.graders import NumericMatch

INSTRUCTION = "What is {a} + {b}? Answer with the number only."
MAX_TOKENS = 4  # a 3-digit answer is 3 digit tokens
# The one score of the task: the built-in eval grades with it, `score` (the training and bench
# clients) calls it.
GRADER = NumericMatch(name="exact_match", reference="{{item.answer}}")


@dataclass(frozen=True)
class AdditionExample:
    a: int
    b: int

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": INSTRUCTION.format(a=self.a, b=self.b)}]

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def addition_split(n: int, seed: int, held_out: bool = False) -> list[AdditionExample]:
    """`n` examples; held-out ones never share an (a, b) pair with the training ones."""
    rng = random.Random(seed)
    out: list[AdditionExample] = []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if ((a * 7 + b) % 5 == 0) == held_out:  # a fixed 20% of pairs is reserved for evaluation
            out.append(AdditionExample(a, b))
    return out


def score(reply: str, example: AdditionExample) -> bool:
    """The first number in the reply equals the sum (the built-in eval's grader)."""
    return GRADER.grade({"answer": example.answer}, {"output_text": reply})
