"""Graders, templates, intervals and eval definitions, without a server."""

import pytest
from pydantic import ValidationError

from server.evals.graders import (
    ChoiceMatch,
    GSM8KMatch,
    NumericMatch,
    StringCheck,
    continuation_logprob,
    render,
)
from server.evals.schemas import EvalCreate
from server.evals.stats import paired_difference, wilson
from server.evals.tasks import BuiltinSource, builtin_task


def test_templates_fill_item_and_sample_fields():
    filled = render("Q: {{item.q}} A: {{ sample.output_text }}", {"q": "2+2"}, {"output_text": "4"})
    assert filled == "Q: 2+2 A: 4"
    with pytest.raises(KeyError):
        render("{{item.missing}}", {})


@pytest.mark.parametrize(
    ("operation", "reference", "output", "expected"),
    [
        ("eq", "Paris", " Paris ", True),
        ("ne", "Paris", "Rome", True),
        ("like", "Par", "It is Paris.", True),
        ("like", "par", "It is Paris.", False),
        ("ilike", "par", "It is Paris.", True),
        ("regex", r"^\d+$", "42", True),
        ("regex", r"^\d+$", "42 apples", False),
    ],
)
def test_string_check_operations(operation, reference, output, expected):
    grader = StringCheck(name="s", reference=reference, operation=operation)
    assert grader.grade({}, {"output_text": output}) is expected


def test_numeric_match_reads_first_or_last_number():
    item = {"answer": "1,234"}
    first = NumericMatch(name="n", reference="{{item.answer}}")
    last = NumericMatch(name="n", reference="{{item.answer}}", pick="last")
    assert first.grade(item, {"output_text": "1234 because 12 + 22"})
    assert not last.grade(item, {"output_text": "1234 because 12 + 22"})
    assert not first.grade(item, {"output_text": "no number"})


def test_gsm8k_strict_and_flexible():
    item = {"answer": "18"}
    strict, flexible = GSM8KMatch(name="s", mode="strict"), GSM8KMatch(name="f", mode="flexible")
    assert strict.grade(item, {"output_text": "9 * 2 = 18. The answer is 18."})
    assert strict.grade(item, {"output_text": "so #### 18"})
    assert not strict.grade(item, {"output_text": "she makes 18 dollars"})
    assert flexible.grade(item, {"output_text": "she makes $18."})
    assert not flexible.grade(item, {"output_text": "18 eggs, 2 dollars"})


def test_wilson_interval_is_sane_at_the_edges():
    # reference values of the Wilson score interval (z = 1.96)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)


def test_paired_difference():
    assert paired_difference([True] * 4, [False] * 4) == (-1.0, -1.0, -1.0)
    mean, lo, hi = paired_difference([True, False, True, False], [True, True, True, False])
    assert mean == 0.25 and lo < 0 < hi
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_builtin_tasks_load_offline():
    gsm8k = builtin_task(BuiltinSource(task="gsm8k", shots=5))
    assert len(gsm8k.items) == 1319 - 5 and gsm8k.items[0]["answer"].lstrip("-").isdigit()
    assert gsm8k.prompt.count("Question:") == 6 and "{{item.question}}" in gsm8k.prompt
    addition = builtin_task(BuiltinSource(task="addition"))
    assert len(addition.items) == 200 and addition.graders[0].name == "exact_match"


def _jsonl(content: str, **extra) -> dict:
    criteria = [{"type": "string_check", "name": "s", "reference": "x"}]
    return {
        "data_source": {"type": "jsonl", "content": content},
        "prompt": "{{item.q}}",
        "testing_criteria": criteria,
        **extra,
    }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"data_source": {"type": "builtin", "task": "mmlu"}}, "gsm8k"),
        (_jsonl('{"q": 1}\n{oops'), "line 2"),
        (_jsonl('{"q": 1}\n{"r": 2}'), "item 2 has no field 'q'"),
        (_jsonl('{"q": 1}', testing_criteria=[{"type": "rouge", "name": "s"}]), "rouge"),
        (_jsonl('{"q": 1}', testing_criteria=[]), "testing criterion"),
        (_jsonl('{"q": 1}', prompt=None), "prompt template"),
    ],
)
def test_bad_definitions_name_the_problem(body, message):
    with pytest.raises(ValidationError, match=message):
        EvalCreate.model_validate({"name": "e", **body})


def test_continuation_logprob_sums_the_continuation_tokens_only():
    # "Q: x\nA:" + " Paris" + one generated token; offsets as vLLM's echo returns them
    logprobs = {"text_offset": [0, 2, 4, 6, 8, 14], "token_logprobs": [None, -1.0, -2.0, -0.5, -0.25, -9.0]}
    context, text = "Q: x\nA:", "Q: x\nA: Paris"
    assert len(context) == 7 and len(text) == 13
    assert continuation_logprob(logprobs, 8, 14) == -0.25
    assert continuation_logprob(logprobs, 6, 13) == -0.75
    with pytest.raises(ValueError, match="first token"):
        continuation_logprob(logprobs, 0, 3)


def test_choice_match_plain_and_length_normalised():
    item = {"choices": ["a", "much longer"], "label": 1}
    sample = {"choice_logprobs": [-2.0, -5.0]}  # per character: -2.0 vs -0.45
    assert not ChoiceMatch(name="acc").grade(item, sample)
    assert ChoiceMatch(name="acc_norm", normalize=True).grade(item, sample)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "q", "choices": ["a"], "label": 0}', "at least two"),
        ('{"question": "q", "choices": ["a", "b"], "label": 2}', "index of the right choice"),
        ('{"choices": ["a", "b"], "label": 0}', "'question'"),
    ],
)
def test_bad_multiple_choice_items_are_named(content, message):
    with pytest.raises(ValidationError, match=message):
        EvalCreate.model_validate(
            {"name": "mc", "data_source": {"type": "multiple_choice", "content": content}}
        )


def test_prompt_nll_skips_the_unconditioned_first_token_and_the_generated_one():
    from server.evals.graders import prompt_nll

    logprobs = {"text_offset": [0, 3, 7, 12], "token_logprobs": [None, -1.0, -0.5, -9.0]}
    assert prompt_nll(logprobs, end=12) == (1.5, 2)


def test_bootstrap_ratio_metric_and_paired_difference():
    import math

    from server.evals.stats import RatioMetric, bootstrap

    ppl = RatioMetric("perplexity", "nll", "tokens", exp=True)
    a = [{"nll": 10.0, "tokens": 5}, {"nll": 30.0, "tokens": 10}, {"nll": 4.0, "tokens": 4}]
    value, (lo, hi) = bootstrap(ppl, a)
    assert value == pytest.approx(math.exp(44 / 19)) and lo <= value <= hi
    assert bootstrap(ppl, a, a) == (0.0, (0.0, 0.0))  # identical sides: no difference, no spread
    b = [{"nll": r["nll"] * 1.1, "tokens": r["tokens"]} for r in a]
    diff, (lo, hi) = bootstrap(ppl, a, b)
    assert diff == pytest.approx(math.exp(44 * 1.1 / 19) - math.exp(44 / 19)) and 0 < lo <= diff <= hi
    assert bootstrap(ppl, a) == bootstrap(ppl, a)  # seeded: the same answer every time


def test_stop_strings_beyond_the_engines_four_are_applied_to_the_text():
    from server.evals.asking import MAX_STOP, _cut

    stops = builtin_task(BuiltinSource(task="humaneval")).stop
    assert len(stops) > MAX_STOP  # HumanEval's five: the fifth is applied by the gateway
    assert _cut("    return x\nprint(f(1))\n", stops[MAX_STOP:]) == "    return x"
    assert _cut("    return x\n", stops[MAX_STOP:]) == "    return x\n"


def test_instruct_humaneval_runs_the_answers_code_block_after_the_prompt():
    from server.evals.graders import ProgramPasses

    item = {
        "prompt": 'import math\n\ndef f(x):\n    """doc"""\n',
        "test": "def check(c):\n    assert c(4) == 2\n",
        "entry_point": "f",
    }
    answer = "Here it is:\n```python\ndef f(x):\n    return int(math.sqrt(x))\n```\nDone."
    program = ProgramPasses(name="p", extract_code=True).program(item, {"output_text": answer})
    namespace: dict = {}
    exec(program, namespace)  # the check passes: the answer's f replaced the prompt's, math imported
    assert "Done." not in program and "Here it is" not in program
