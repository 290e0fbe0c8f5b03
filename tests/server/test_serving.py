"""Variants served through the real gateway equal stock vLLM serving the same weights."""

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import CHAT, MAX_TOKENS, PROMPTS, chat_output, completion_outputs

pytestmark = pytest.mark.engine

VARIANTS = ["tied-inst", "tied-half", "tied-mix", "untied-inst"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_is_bit_identical_to_offline_merge(stack, variant):
    """Same greedy tokens and the same logprobs (top-3 included) as a fresh vLLM load."""
    got = completion_outputs(stack.url, variant)
    assert got == stack.refs[variant]


def test_variants_really_differ_from_their_base(stack):
    assert stack.refs["tied-inst"] != stack.base_before["tied"]
    assert stack.refs["tied-half"] != stack.refs["tied-inst"]


@pytest.mark.parametrize("base", ["tied", "untied"])
def test_base_is_restored_exactly_after_variants(stack, base):
    completion_outputs(stack.url, f"{base}-inst")
    assert completion_outputs(stack.url, base) == stack.base_before[base]


def test_no_stale_prefix_cache_after_swap(stack):
    """The same prompt right after a swap is answered from the new weights, both ways."""
    for variant, expected in [
        ("tied", stack.base_before["tied"]),
        ("tied-inst", stack.refs["tied-inst"]),
        ("tied", stack.base_before["tied"]),
        ("tied-mix", stack.refs["tied-mix"]),
    ]:
        assert completion_outputs(stack.url, variant)[0] == expected[0], variant


def _prefix_cache(stack) -> tuple[float, float]:
    """tied's engine's prefix-cache counters (queries, hits), in tokens, through the gateway."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(stack.url + "/metrics/engines/tied").text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples["vllm:prefix_cache_queries_total"], samples["vllm:prefix_cache_hits_total"]


def _long_prompt(stack, tokens: int) -> str:
    """A prompt of at least `tokens` tokens for the pico tokenizer (counted by the gateway)."""
    words = []
    while True:
        words += [f"fact {len(words)} is that deltas add"]
        body = {"model": "tied", "prompt": " ".join(words)}
        if httpx.post(stack.url + "/tokenize", json=body).json()["count"] >= tokens:
            return " ".join(words)


def test_a_returning_variant_finds_its_prefix_cached_and_another_variant_never_does(stack):
    """Swaps keep the engine's prefix cache (--kv-across-swaps, the default): each request carries
    a cache_salt of its weights, so a prompt cached under tied-part1 is never reused under
    tied-part2 (whose swap left it cached), and is reused when tied-part1 comes back."""
    prompt = _long_prompt(stack, 420)  # above the engine's KV block (up to 256 tokens on the CPU build)

    def ask(model: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1}
        r = httpx.post(stack.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]

    first = ask("tied-part1")
    queries, hits = _prefix_cache(stack)
    ask("tied-part2")  # a swap: tied-part1's blocks stay cached, under its salt
    other_queries, other_hits = _prefix_cache(stack)
    assert other_queries > queries and other_hits == hits  # asked, never reused across weights
    again = ask("tied-part1")  # a swap back: its prefix is found
    assert _prefix_cache(stack)[1] > hits
    assert again["text"] == first["text"] and again["logprobs"]["tokens"] == first["logprobs"]["tokens"]


def test_chat_uses_the_variants_chat_template(stack):
    """The post model's template (carried in the artifact) differs from the base's."""
    assert chat_output(stack.url, "tied-inst") == stack.chat_refs["tied-inst"]


def test_openai_client_chat_and_stream(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    assert {"tied", "untied", *VARIANTS} <= {m.id for m in client.models.list()}
    reply = client.chat.completions.create(
        model="tied-inst", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert reply.model == "tied-inst"
    assert reply.choices[0].message.content == stack.chat_refs["tied-inst"]["content"]
    stream = client.chat.completions.create(
        model="tied-inst", messages=CHAT, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = list(stream)
    assert all(c.model == "tied-inst" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == stack.chat_refs["tied-inst"]["content"]


def test_completions_pass_n_stop_seed_through(stack):
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused")
    ref_text = stack.refs["tied-inst"][0]["text"]
    stop = ref_text[3:5]
    reply = client.completions.create(
        model="tied-inst", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stop=[stop], temperature=0
    )
    assert reply.choices[0].text == ref_text[: ref_text.index(stop)]

    def sample() -> list[str]:
        reply = client.completions.create(
            model="tied-inst", prompt=PROMPTS[0], max_tokens=8, n=2, seed=7, temperature=1.0
        )
        return [c.text for c in reply.choices]

    first = sample()
    assert len(first) == 2
    assert sample() == first  # same seed, same samples


async def test_swap_under_concurrent_streaming_traffic(stack):
    """Streams alternating between two variants all complete, each equal to its reference."""
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused")
    expected = {
        "tied-inst": stack.refs["tied-inst"],
        "tied-mix": stack.refs["tied-mix"],
        "tied": stack.base_before["tied"],
    }

    async def one(i: int) -> tuple[str, int, str]:
        variant = ["tied-inst", "tied-mix", "tied"][i % 3]
        p = i % len(PROMPTS)
        stream = await client.completions.create(
            model=variant, prompt=PROMPTS[p], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        text = "".join([c.choices[0].text async for c in stream if c.choices])
        return variant, p, text

    before = _swap_count(stack)
    results = await asyncio.gather(*(one(i) for i in range(18)))
    assert len(results) == 18
    for variant, p, text in results:
        assert text == expected[variant][p]["text"], (variant, p)
    assert _swap_count(stack) > before  # traffic really forced swaps


def _swap_count(stack) -> float:
    body = httpx.get(stack.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("deltagate_swaps_total{") and 'result="ok"' in line
    )


def test_engine_metrics_relayed_include_what_the_dashboard_reads(stack):
    """The real vLLM engine's own metrics, through the gateway; every vllm:* dashboard query names one."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.server.test_observability import dashboard_metric_names

    completion_outputs(stack.url, "tied")
    r = httpx.get(stack.url + "/metrics/engines/tied")
    assert r.status_code == 200, r.text
    exported = set()
    for family in text_string_to_metric_families(r.text):
        exported |= {family.name, f"{family.name}_total"}
    used = {m for m in dashboard_metric_names() if m.startswith("vllm:")}
    assert len(used) >= 4
    assert used <= exported, used - exported
    assert "vllm:lora_requests_info" in exported  # the variant residency, added by the gateway


@pytest.mark.parametrize(
    ("source", "criteria"),
    [
        ({"type": "builtin", "task": "addition"}, {"exact_match"}),
        ({"type": "builtin", "task": "gsm8k", "shots": 0}, {"strict_match", "flexible_match"}),
    ],
)
def test_builtin_eval_runs_through_real_engines(stack, source, criteria):
    """A built-in task as a paired run on the base and a variant, through the evals API."""
    body = {"variants": ["tied", "tied-inst"], "limit": 3, "max_tokens": 8, "seed": 1}
    eval_id, run = _finished_run(stack, {"name": source["task"], "data_source": source}, body)
    assert run["status"] == "completed", run
    assert run["progress"] == {"done": 6, "total": 6}
    for variant in ("tied", "tied-inst"):
        result = run["per_variant"][variant]
        assert set(result["criteria"]) == criteria
        assert result["passed"] + result["failed"] + result["errored"] == 3
    assert {c["criterion"] for c in run["comparisons"]} == criteria or run["result_counts"]["errored"]
    assert run["measured"]["recipes"]["tied-inst"]["deltas"][0]["sha256"]
    items = httpx.get(f"{stack.url}/v1/evals/{eval_id}/runs/{run['id']}/output_items", headers=stack.admin)
    assert all(i["output"] is not None or i["error"] for i in items.json()["data"])


def test_multiple_choice_eval_scores_by_loglikelihood_through_real_engines(stack):
    """acc/acc_norm from echo logprobs relayed by the gateway; the sums match a direct request."""
    import json

    items = [
        {"question": "The capital of France", "choices": ["is Paris.", "is Rome.", "def add"], "label": 0},
        {"question": "Numbers: 1 2 3", "choices": ["4 5 6", "a b c"], "label": 0},
    ]
    body = {
        "name": "mc",
        "data_source": {"type": "multiple_choice", "content": "\n".join(json.dumps(i) for i in items)},
    }
    eval_id, run = _finished_run(stack, body, {"variants": ["tied", "tied-inst"]})
    assert run["status"] == "completed" and run["result_counts"]["errored"] == 0, run
    assert set(run["per_variant"]["tied-inst"]["criteria"]) == {"acc", "acc_norm"}
    out = httpx.get(
        f"{stack.url}/v1/evals/{eval_id}/runs/{run['id']}/output_items", headers=stack.admin
    ).json()
    first = next(i for i in out["data"] if i["variant"] == "tied-inst" and i["index"] == 0)
    scored = json.loads(first["output"])["logprobs"]
    context = "Question: The capital of France\nAnswer:"
    for choice, got in zip(items[0]["choices"], scored, strict=True):
        text = f"{context} {choice}"
        r = httpx.post(
            f"{stack.url}/v1/completions",
            json={
                "model": "tied-inst",
                "prompt": text,
                "max_tokens": 1,
                "temperature": 0,
                "echo": True,
                "logprobs": 1,
            },
        )
        lp = r.json()["choices"][0]["logprobs"]
        want = sum(
            v
            for o, v in zip(lp["text_offset"], lp["token_logprobs"], strict=True)
            if len(context) <= o < len(text)
        )
        assert got == pytest.approx(want, abs=1e-6)
    assert json.loads(first["output"])["choice"] == items[0]["choices"][scored.index(max(scored))]


def _finished_run(stack, eval_body: dict, run_body: dict) -> tuple[str, dict]:
    """Define an eval, run it, wait for the end; (eval id, the finished run)."""
    import time

    ev = httpx.post(stack.url + "/v1/evals", json=eval_body, headers=stack.admin)
    assert ev.status_code == 201, ev.text
    eval_id = ev.json()["id"]
    run = httpx.post(f"{stack.url}/v1/evals/{eval_id}/runs", json=run_body, headers=stack.admin).json()
    deadline = time.monotonic() + 300
    while run["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, run
        time.sleep(0.5)
        run = httpx.get(f"{stack.url}/v1/evals/{eval_id}/runs/{run['id']}", headers=stack.admin).json()
    return eval_id, run


def test_perplexity_eval_matches_the_engines_own_logprobs(stack):
    """Corpus perplexity per variant with an interval; an item's NLL equals a direct echo request's."""
    import json
    import math

    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Numbers: 1 2 3 4 5 6"]
    source = {"type": "perplexity", "content": "\n".join(json.dumps({"text": t}) for t in texts)}
    eval_id, run = _finished_run(
        stack, {"name": "ppl", "data_source": source}, {"variants": ["tied", "tied-inst"]}
    )
    assert run["status"] == "completed" and run["result_counts"]["errored"] == 0, run
    for variant in ("tied", "tied-inst"):
        ppl = run["per_variant"][variant]["metrics"]["perplexity"]
        assert ppl["n"] == 3 and ppl["value"] > 1 and ppl["ci95"][0] <= ppl["value"] <= ppl["ci95"][1]
    assert [c["criterion"] for c in run["comparisons"]] == ["perplexity"]
    items = httpx.get(f"{stack.url}/v1/evals/{eval_id}/runs/{run['id']}/output_items", headers=stack.admin)
    first = next(i for i in items.json()["data"] if i["variant"] == "tied-inst" and i["index"] == 0)
    body = {
        "model": "tied-inst",
        "prompt": texts[0],
        "max_tokens": 1,
        "temperature": 0,
        "echo": True,
        "logprobs": 0,
    }
    lp = httpx.post(stack.url + "/v1/completions", json=body).json()["choices"][0]["logprobs"]
    prompt_lps = [
        v for o, v in zip(lp["text_offset"], lp["token_logprobs"], strict=True) if o < len(texts[0])
    ]
    assert first["scores"]["tokens"] == len(prompt_lps) - 1  # the first token has no logprob
    assert first["scores"]["nll"] == pytest.approx(-sum(prompt_lps[1:]), abs=1e-6)
    scores = [i["scores"] for i in items.json()["data"] if i["variant"] == "tied-inst"]
    want = math.exp(sum(s["nll"] for s in scores) / sum(s["tokens"] for s in scores))
    assert run["per_variant"]["tied-inst"]["metrics"]["perplexity"]["value"] == pytest.approx(want)


def test_fidelity_eval_against_a_reference_variant(stack):
    """The reference itself agrees everywhere with KL 0; the int4 TIES mix and the base do not."""
    source = {"type": "fidelity", "reference": "tied-inst", "max_tokens": 8}
    run_body = {"variants": ["tied-inst", "tied-ties", "tied"]}
    _, run = _finished_run(stack, {"name": "fid", "data_source": source}, run_body)
    assert run["status"] == "completed" and run["result_counts"]["errored"] == 0, run
    metrics = {v: r["metrics"] for v, r in run["per_variant"].items()}
    assert metrics["tied-inst"]["token_agreement"]["value"] == 1.0
    assert metrics["tied-inst"]["mean_kl"]["value"] == pytest.approx(0.0, abs=1e-9)
    assert run["per_variant"]["tied-inst"]["criteria"]["greedy_match"]["score"] == 1.0
    assert metrics["tied"]["mean_kl"]["value"] > metrics["tied-inst"]["mean_kl"]["value"]
    assert metrics["tied"]["token_agreement"]["value"] < 1.0
    assert metrics["tied-ties"]["mean_kl"]["value"] > 0
    assert run["measured"]["reference"]["variant"] == "tied-inst"
    assert {c["criterion"] for c in run["comparisons"]} == {"greedy_match", "token_agreement", "mean_kl"}


def test_humaneval_and_jsonl_evals_run_through_real_engines(stack):
    """HumanEval (both styles, programs run in the sandbox) and user JSONL items with string_check."""
    import json

    for style in ("completion", "instruct"):
        source = {"type": "builtin", "task": "humaneval", "style": style}
        # seed 2 samples two short problems: the stack's context is 512 tokens
        run_body = {"variants": ["tied-inst"], "limit": 2, "seed": 2, "max_tokens": 16}
        _, run = _finished_run(stack, {"name": f"he-{style}", "data_source": source}, run_body)
        assert run["status"] == "completed" and run["result_counts"]["errored"] == 0, run
        assert run["per_variant"]["tied-inst"]["criteria"]["pass@1"]["n"] == 2
    want = completion_outputs(stack.url, "tied-inst")[0]["text"]  # a greedy answer the check must match
    items = "\n".join(json.dumps({"q": p, "expected": want}) for p in PROMPTS[:1])
    body = {
        "name": "jsonl",
        "data_source": {"type": "jsonl", "content": items},
        "prompt": "{{item.q}}",
        "endpoint": "completions",
        "testing_criteria": [
            {
                "type": "string_check",
                "name": "same",
                "input": "{{sample.output_text}}",
                "reference": "{{item.expected}}",
                "operation": "eq",
            }
        ],
    }
    run_body = {"variants": ["tied-inst", "tied"], "max_tokens": MAX_TOKENS}
    _, run = _finished_run(stack, body, run_body)
    assert run["status"] == "completed", run
    assert run["per_variant"]["tied-inst"]["criteria"]["same"]["score"] == 1.0
    assert run["per_variant"]["tied"]["criteria"]["same"]["score"] == 0.0
