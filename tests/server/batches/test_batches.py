"""The Files and Batch APIs as the `openai` SDK calls them, through a real gateway on a mock engine
(whose answers name the weights that made them): a batch over two variants, one swap per variant,
bad lines, errors, cancel, and a batch that survives the gateway being killed. The same through
real engines, compared with stock vLLM: tests/server/test_client_apis.py."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from loaders.mock_engine import weights_tag
from tests.server.conftest import metric_families, restartable_mock_gateway, sample_value


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)


def chat_line(custom_id: str, model: str, tokens: int = 2, **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "max_tokens": tokens,
            "messages": [{"role": "user", "content": "hi"}],
            **body,
        },
    }


def upload(oa: openai.OpenAI, lines: list[dict]):
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return oa.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")


def finished(oa: openai.OpenAI, batch_id: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while (batch := oa.batches.retrieve(batch_id)).status in (
        "validating",
        "in_progress",
        "finalizing",
        "cancelling",
    ):
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)
    return batch


def lines_of(oa: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if file_id is None:
        return {}
    return {
        (line := json.loads(raw))["custom_id"]: line for raw in oa.files.content(file_id).text.splitlines()
    }


def test_a_batch_over_two_variants_costs_one_swap_each(mock_stack):
    oa = client(mock_stack.url)
    models = ["mock", "mock-inst"] * 4  # alternating: line by line would swap at every line
    lines = [chat_line(f"req-{i}", m) for i, m in enumerate(models)]
    before = sample_value(metric_families(mock_stack.url), "deltagate_swaps_total", engine="mock")
    infile = upload(oa, lines)
    assert infile.object == "file" and infile.purpose == "batch" and infile.bytes > 0
    batch = oa.batches.create(
        input_file_id=infile.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert batch.object == "batch" and batch.status == "in_progress" and batch.request_counts.total == 8
    batch = finished(oa, batch.id)
    assert batch.status == "completed" and batch.completed_at and batch.error_file_id is None
    assert batch.request_counts.completed == 8 and batch.request_counts.failed == 0
    assert batch.usage.output_tokens == 8 * 2 and batch.metadata == {"job": "nightly"}
    swaps = sample_value(metric_families(mock_stack.url), "deltagate_swaps_total", engine="mock") - before
    assert swaps <= 2, swaps  # one per variant (the first may already be resident)
    out = lines_of(oa, batch.output_file_id)
    assert set(out) == {line["custom_id"] for line in lines}
    tags = {m: f" {weights_tag(None)}" for m in models}
    tags["mock-inst"] = out["req-1"]["response"]["body"]["choices"][0]["message"]["content"][:8]
    assert tags["mock-inst"] != tags["mock"]
    for line in lines:
        answer = out[line["custom_id"]]
        assert answer["error"] is None and answer["response"]["status_code"] == 200
        body = answer["response"]["body"]
        assert body["model"] == line["body"]["model"]  # the variant asked for, not the engine's name
        assert body["choices"][0]["message"]["content"] == tags[line["body"]["model"]] * 2
    assert batch.id in [b.id for b in oa.batches.list()]
    assert oa.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_lines_that_fail_go_to_the_error_file(mock_stack):
    oa = client(mock_stack.url)
    lines = [chat_line("ok", "mock"), chat_line("ghost", "ghost"), chat_line("engine", "mock", 2)]
    lines[2]["body"]["messages"] = "mock:500"
    batch = finished(
        oa,
        oa.batches.create(
            input_file_id=upload(oa, lines).id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 2)
    assert set(lines_of(oa, batch.output_file_id)) == {"ok"}
    errors = lines_of(oa, batch.error_file_id)
    assert (
        errors["ghost"]["response"]["status_code"] == 404 and "ghost" in errors["ghost"]["error"]["message"]
    )
    assert errors["engine"]["response"]["status_code"] == 500


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "mock"}},
            "not this batch",
        ),
        (
            {"custom_id": "a", "method": "GET", "url": "/v1/chat/completions", "body": {}},
            "method must be POST",
        ),
        ({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "mock"}}, "custom_id"),
        (chat_line("a", "mock", stream=True), "cannot stream"),
        (chat_line("dup", "mock"), "appears twice"),
    ],
)
def test_a_file_with_bad_lines_fails_the_batch_naming_each_line(mock_stack, line, message):
    oa = client(mock_stack.url)
    lines = [chat_line("dup", "mock"), line]
    batch = oa.batches.create(
        input_file_id=upload(oa, lines).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at
    [error] = batch.errors.data
    assert error.line == 2 and message in error.message


def test_what_the_api_refuses(mock_stack):
    oa = client(mock_stack.url)
    infile = upload(oa, [chat_line("a", "mock")])
    with pytest.raises(openai.BadRequestError, match="only '24h'"):
        oa.batches.create(input_file_id=infile.id, endpoint="/v1/chat/completions", completion_window="1h")
    with pytest.raises(openai.BadRequestError, match="batches run on"):
        oa.batches.create(input_file_id=infile.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        oa.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        oa.files.create(file=("x.jsonl", io.BytesIO(b"{}")), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        oa.batches.retrieve("batch_nope")
    assert oa.files.delete(infile.id).deleted
    r = httpx.get(f"{mock_stack.url}/v1/files/{infile.id}/content")
    assert r.status_code == 404


def test_cancel_stops_a_batch_and_keeps_what_was_answered(mock_stack):
    oa = client(mock_stack.url)
    lines = [chat_line(f"r{i}", "mock", 25) for i in range(40)]  # 0.5 s a line, 8 at once
    batch = oa.batches.create(
        input_file_id=upload(oa, lines).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    time.sleep(0.8)
    assert oa.batches.cancel(batch.id).status == "cancelling"
    batch = finished(oa, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    done = batch.request_counts.completed
    assert 0 < done < 40 and len(lines_of(oa, batch.output_file_id)) == done


def test_a_batch_survives_the_gateway_being_killed(tied, tmp_path):
    """kill -9 mid-batch; the restarted gateway answers the lines not yet answered, each once."""
    with restartable_mock_gateway(tied, tmp_path) as (url, restart, log):
        oa = client(url)
        lines = [chat_line(f"r{i}", m, 20) for i, m in enumerate(["mock", "mock-inst"] * 12)]  # 0.4 s a line
        batch = oa.batches.create(
            input_file_id=upload(oa, lines).id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while oa.batches.retrieve(batch.id).request_counts.completed < 8:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        restart(kill=True)
        oa = client(url)
        batch = finished(oa, batch.id)
        assert batch.status == "completed" and batch.request_counts.completed == 24, batch
        out = oa.files.content(batch.output_file_id).text.splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in out) == sorted(
            line["custom_id"] for line in lines
        )
        assert "resuming batch" in log.read_text()
