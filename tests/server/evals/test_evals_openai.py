"""The Evals API as the `openai` SDK sends it (`client.evals`): a custom data source config and a
string_check grader on the eval; the model, the template messages and the items on each run.

Through real engines on the stack (a base and a variant with its own chat template): every graded
answer is the variant's greedy chat answer to the same messages; and on the mock stack, the SDK's
pages, retrieve, cancel and delete, and the errors a user meets.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.server.conftest import ADMIN

ITEM_SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
CHECK = {
    "type": "string_check",
    "name": "has_answer",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "like",
}
TEMPLATE = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "{{item.question}}"},
]
ITEMS = [
    {"question": "The capital of France", "answer": "Paris"},
    {"question": "Numbers: 1 2 3", "answer": "4"},
    {"question": "def add(a, b):", "answer": "return"},
]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0)


def _custom_eval(client: openai.OpenAI):
    return client.evals.create(
        name="sdk-eval",
        data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA, "include_sample_schema": True},
        testing_criteria=[CHECK],
    )


def _data_source(model: str, items=ITEMS, max_tokens: int = 8) -> dict:
    return {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "template", "template": TEMPLATE},
        "sampling_params": {"temperature": 0, "max_completion_tokens": max_tokens, "seed": 0},
        "source": {"type": "file_content", "content": [{"item": i} for i in items]},
    }


def _finished(client: openai.OpenAI, eval_id: str, run_id: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while (run := client.evals.runs.retrieve(run_id, eval_id=eval_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
    return run


@pytest.mark.parametrize("model", ["tied", "tied-inst"])
def test_the_sdk_runs_an_eval_on_a_base_and_a_variant(stack, model):
    client = _client(stack.url)
    ev = _custom_eval(client)
    assert ev.object == "eval" and ev.data_source_config.type == "custom"
    run = client.evals.runs.create(ev.id, name=f"on {model}", data_source=_data_source(model))
    assert run.object == "eval.run" and run.model == model and run.status in ("queued", "in_progress")
    run = _finished(client, ev.id, run.id)
    assert run.status == "completed" and run.error is None, run
    assert run.result_counts.total == len(ITEMS) and run.result_counts.errored == 0
    [criterion] = run.per_testing_criteria_results
    assert criterion.testing_criteria == "has_answer" and criterion.passed + criterion.failed == len(ITEMS)
    items = list(client.evals.runs.output_items.list(run.id, eval_id=ev.id))
    assert sorted(i.datasource_item_id for i in items) == [0, 1, 2]
    chat = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k", max_retries=0).chat.completions
    for item in items:
        question = ITEMS[item.datasource_item_id]
        assert item.datasource_item == question and item.sample.model == model
        assert [m.content for m in item.sample.input] == ["Answer briefly.", question["question"]]
        direct = (
            chat.create(
                model=model,
                messages=[
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": question["question"]},
                ],
                max_tokens=8,
                temperature=0,
                seed=0,
            )
            .choices[0]
            .message.content
        )
        assert item.sample.output[0].content == direct  # the variant's own greedy answer
        [result] = item.results
        assert result.name == "has_answer" and result.passed == (question["answer"] in direct.strip())
        assert item.status == ("pass" if result.passed else "fail")
    one = client.evals.runs.output_items.retrieve(items[0].id, eval_id=ev.id, run_id=run.id)
    assert one.id == items[0].id  # (list and retrieve parse into different SDK classes: compare contents)
    assert [o.content for o in one.sample.output] == [o.content for o in items[0].sample.output]


def test_the_sdks_pages_cancel_and_delete(mock_stack):
    client = _client(mock_stack.url)
    ev = _custom_eval(client)
    one_item = _data_source("mock-inst", ITEMS[:1], 1)
    runs = [client.evals.runs.create(ev.id, data_source=one_item) for _ in range(3)]
    for run in runs:
        _finished(client, ev.id, run.id, timeout=60)
    page = client.evals.runs.list(ev.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    assert [r.id for r in client.evals.runs.list(ev.id, limit=2)] == [r.id for r in runs]  # every page
    assert ev.id in [e.id for e in client.evals.list()]
    slow = client.evals.runs.create(ev.id, data_source=_data_source("mock-inst", ITEMS * 4, 25))
    canceled = client.evals.runs.cancel(slow.id, eval_id=ev.id)
    assert canceled.status == "canceled"
    deleted = client.evals.runs.delete(runs[0].id, eval_id=ev.id)
    assert deleted.deleted and deleted.run_id == runs[0].id
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(runs[0].id, eval_id=ev.id)
    _finished(client, ev.id, slow.id, timeout=60)
    assert client.evals.delete(ev.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(ev.id)


def test_what_a_user_gets_wrong_is_a_clear_4xx(mock_stack):
    client = _client(mock_stack.url)
    ev = _custom_eval(client)
    with pytest.raises(openai.BadRequestError, match=r"content\[1\]\.item does not match"):
        client.evals.runs.create(ev.id, data_source=_data_source("mock", [ITEMS[0], {"question": "q"}]))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{mock_stack.url}/v1/evals/{ev.id}/runs", json={"variants": ["mock"]}, headers=auth)
    assert r.status_code == 400 and "data_source" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="ghost"):
        client.evals.runs.create(ev.id, data_source=_data_source("ghost"))
    with pytest.raises(openai.UnprocessableEntityError, match="item_schema"):
        client.evals.create(
            data_source_config={"type": "custom", "item_schema": {"type": "nope"}}, testing_criteria=[CHECK]
        )
    with pytest.raises(openai.UnprocessableEntityError, match="no field 'missing'"):
        client.evals.create(
            data_source_config={"type": "custom", "item_schema": ITEM_SCHEMA},
            testing_criteria=[CHECK | {"reference": "{{item.missing}}"}],
        )
