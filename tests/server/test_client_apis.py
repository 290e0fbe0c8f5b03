"""The clients people use, through real engines: the `openai` SDK's Responses API and
`models.retrieve`, the `anthropic` SDK's Messages API, tools and structured output — on a base and
on a variant with its own chat template, each equal to stock vLLM serving the same weights with the
same flags (the fleet's references, tests/server/conftest.py::client_api_answers)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.batches.test_batches import finished, lines_of, upload
from tests.server.conftest import chat_params, client_api_answers, metric_families, sample_value


@pytest.mark.parametrize("model", ["tied", "tied-inst"])
def test_sdks_get_what_stock_vllm_answers(stack, tied, model):
    """Responses and Messages (plain and streamed), count_tokens, a forced tool call, tools with
    "auto" and a json_schema answer: every text, token count and logprob as stock vLLM's, and the
    stream events name the model the client asked for."""
    got = client_api_answers(stack.url, model, tied.base)
    want = dict(stack.api_refs[model])
    assert got.pop("stream_models") == [model] and want.pop("stream_models") == ["ref"]
    assert got == want
    assert [name for name, _ in got["tool_call"]["calls"]] == ["get_weather"]  # a real call was made
    assert got["json_schema"].startswith('{"capital":')


def test_a_variant_renders_with_its_own_template_on_every_route(stack):
    """tied-inst's template (its post model's) differs from the base's: the prompts it renders are
    longer on every chat route, tools included in them when offered."""
    base, inst = stack.api_refs["tied"], stack.api_refs["tied-inst"]
    assert inst["messages"]["usage"][0] != base["messages"]["usage"][0]
    assert inst["responses"]["usage"][0] != base["responses"]["usage"][0]
    assert inst["count_tokens"] == inst["messages"]["usage"][0]
    assert inst["tool_auto"]["prompt_tokens"] > inst["messages"]["usage"][0]  # the template shows the tools


def test_models_retrieve_names_the_base(stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k", max_retries=0)
    model = client.models.retrieve("tied-inst")
    assert model.id == "tied-inst" and model.base == "tied"
    listed = {m.id: m.base for m in client.models.list()}
    assert listed["tied"] == "tied" and listed["untied-inst"] == "untied"
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.models.retrieve("nope")


def test_new_routes_are_counted_with_their_endpoint_and_tokens(stack):
    """Requests and tokens on /v1/responses and /v1/messages appear in the gateway's metrics
    (usage read from input/output tokens, streamed or not)."""
    before = metric_families(stack.url)
    body = {"model": "tied-inst", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    for stream in (False, True):
        r = httpx.post(f"{stack.url}/v1/messages", json=body | {"stream": stream}, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(
            f"{stack.url}/v1/responses",
            json={"model": "tied-inst", "input": "hi", "max_output_tokens": 5, "stream": stream},
            timeout=120,
        )
        assert r.status_code == 200, r.text
    after = metric_families(stack.url)

    def grew(sample: str, **labels) -> float:
        return sample_value(after, sample, **labels) - sample_value(before, sample, **labels)

    for endpoint in ("/v1/messages", "/v1/responses"):
        labels = {"variant": "tied-inst", "endpoint": endpoint, "status_class": "2xx"}
        assert grew("deltagate_requests_total", **labels) == 2
    assert grew("deltagate_generation_tokens_total", variant="tied-inst") == 4 * 5
    assert grew("deltagate_prompt_tokens_total", variant="tied-inst") > 0


def test_a_client_cannot_send_a_template_or_the_gateways_own_field(stack):
    for field in ("chat_template", "deltagate_chat"):
        body = {
            "model": "tied-inst",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            field: "{{ 'x' }}",
        }
        r = httpx.post(f"{stack.url}/v1/messages", json=body, timeout=60)
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_a_batch_answers_as_stock_vllm_on_a_base_and_a_variant(stack):
    """files.create + batches.create + polling + files.content: every line's answer (text and
    logprobs) is stock vLLM's for the same weights."""
    oa = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k", max_retries=0)
    models = ["tied", "tied-inst"] * 2
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_params(m)}
        for i, m in enumerate(models)
    ]
    batch = oa.batches.create(
        input_file_id=upload(oa, lines).id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = finished(oa, batch.id, timeout=300)
    assert batch.status == "completed" and batch.request_counts.completed == 4, batch
    out = lines_of(oa, batch.output_file_id)
    for i, model in enumerate(models):
        choice = out[f"r{i}"]["response"]["body"]["choices"][0]
        got = {"content": choice["message"]["content"], "logprobs": choice["logprobs"]["content"]}
        assert got == stack.chat_refs[model], model


def test_a_stored_response_belongs_to_its_engine_and_variant(stack):
    """serve --responses-store: a response is retrieved from the engine that made it, naming its
    variant; continuing it on another variant's name is refused (it would be other weights)."""
    oa = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="k", max_retries=0)
    first = oa.responses.create(model="tied-inst", input="hi", max_output_tokens=4, temperature=0)
    again = oa.responses.retrieve(first.id)
    assert again.id == first.id and again.model == "tied-inst" and again.output_text == first.output_text
    events = list(
        oa.responses.create(model="tied-inst", input="hi", max_output_tokens=4, temperature=0, stream=True)
    )
    streamed = next(e.response for e in events if e.type == "response.completed")
    assert oa.responses.retrieve(streamed.id).output_text == streamed.output_text
    with pytest.raises(openai.BadRequestError, match="continue it with model 'tied-inst'"):
        oa.responses.create(model="tied", input="and?", previous_response_id=first.id, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError, match="resp_nope"):
        oa.responses.retrieve("resp_nope")
    with pytest.raises(openai.BadRequestError, match="background"):
        oa.responses.create(model="tied-inst", input="hi", background=True)
