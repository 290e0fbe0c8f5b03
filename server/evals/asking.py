"""How an eval asks a variant about one item, per task kind, through the gateway's own relay.

Generation (then graders; HumanEval programs in the sandbox), multiple choice by loglikelihood,
perplexity from echoed prompt logprobs, and fidelity: the reference variant's greedy
continuation, then each variant's top-K distributions along those same tokens. An engine error
is the item's (it counts as errored), never the run's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from contextvars import ContextVar

from loaders.engine import EngineError
from loaders.fidelity import Probe, agreement
from server.evals.graders import ProgramPasses, continuation_logprob, prompt_nll, render
from server.evals.sandbox import Limits, run_program
from server.evals.schemas import RunCreate
from server.evals.tasks import TaskSpec
from server.gateway import Gateway
from server.metrics import Metrics
from server.schemas import InferenceBody
from server.tenancy import ROOT, Principal

# Whose requests a run's items are: set once in the run's task (EvalService._execute) and inherited by
# the item tasks it gathers, so the asker, shared by every run, needs no caller argument on each path.
CALLER: ContextVar[Principal] = ContextVar("eval_caller", default=ROOT)


@dataclasses.dataclass(frozen=True)
class ReferenceProbe:
    """Fidelity: the reference variant's greedy continuation of one prompt and its distributions."""

    prompt: str
    probe: Probe | None
    distributions: list[dict[int, float]] | None
    error: str | None = None


MAX_STOP = 4  # stop strings an OpenAI-style engine takes; a task's further ones are applied here


def _cut(text: str | None, stops: list[str]) -> str | None:
    """The text up to the first of `stops` (the ones the engine was not given)."""
    if text is None:
        return None
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def _new_row(prompt: str) -> dict:
    """A graded item as stored, errored until an answer is graded."""
    return {"input": prompt, "output": None, "grades": {}, "status": "error", "error": None}


def _errored(row: dict, exc: Exception) -> dict:
    """The item failed (engine error, bad answer shape): counted as errored, the run goes on."""
    row["error"] = f"{type(exc).__name__}: {exc}"
    return row


class Asker:
    """Asks variants about items and grades the answers."""

    def __init__(self, gateway: Gateway, metrics: Metrics, limits: Limits):
        self.gateway, self.metrics, self.limits = gateway, metrics, limits

    async def answer(
        self, task: TaskSpec, variant: str, body: RunCreate, item: dict, reference: ReferenceProbe | None
    ) -> dict:
        """One item on one variant, through the same relay as user traffic; errors are the item's."""
        if task.kind == "loglikelihood":
            return await self._choose(task, variant, item)
        if task.kind == "perplexity":
            return await self._perplexity(task, variant, item)
        if task.kind == "fidelity":
            return await self._fidelity(task, variant, item, reference)
        prompt = render(task.prompt, item)
        payload: dict = {
            "model": variant,
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "seed": body.seed,
        }
        if body.top_p is not None:
            payload["top_p"] = body.top_p
        if task.stop:
            payload["stop"] = task.stop[:MAX_STOP]
        chat = task.endpoint == "chat"
        messages = [{"role": "user", "content": prompt}]
        if task.messages:
            messages = [{"role": m["role"], "content": render(m["content"], item)} for m in task.messages]
        payload |= {"messages": messages} if chat else {"prompt": prompt}
        payload |= task.extra_body
        row = _new_row(prompt)
        try:
            data = await self._complete(payload, chat=chat)
            choice = data["choices"][0]
            row["output"] = _cut(
                choice["message"]["content"] if chat else choice["text"], task.stop[MAX_STOP:]
            )
        except Exception as exc:
            return _errored(row, exc)
        return await self._graded(row, task, item, {"output_text": row["output"] or ""})

    async def _choose(self, task: TaskSpec, variant: str, item: dict) -> dict:
        """Multiple choice: the loglikelihood of each choice as the prompt's continuation."""
        context = render(task.prompt, item)
        row = _new_row(context)
        logprobs = []
        try:
            for choice in item["choices"]:
                text = context + " " + choice
                logprobs.append(
                    continuation_logprob(await self._echo(variant, text), len(context), len(text))
                )
        except Exception as exc:
            return _errored(row, exc)
        best = max(range(len(logprobs)), key=logprobs.__getitem__)
        row["output"] = json.dumps({"choice": item["choices"][best], "logprobs": logprobs})
        sample = {"output_text": item["choices"][best], "choice_logprobs": logprobs}
        return await self._graded(row, task, item, sample)

    async def _perplexity(self, task: TaskSpec, variant: str, item: dict) -> dict:
        """The item's text scored by the variant: NLL and token count from echoed prompt logprobs."""
        text = render(task.prompt, item)
        row = _new_row(text)
        try:
            nll, tokens = prompt_nll(await self._echo(variant, text), len(text))
        except Exception as exc:
            return _errored(row, exc)
        row["scores"] = {"nll": nll, "tokens": tokens}
        row["output"] = f"{tokens} tokens, perplexity {math.exp(nll / max(tokens, 1)):.4g}"
        return await self._graded(row, task, item, {"output_text": row["output"]})

    async def _echo(self, variant: str, text: str) -> dict:
        """`text`'s own token logprobs under `variant` (echo + logprobs; the one generated token is
        ignored by the callers, which read only offsets inside the text)."""
        payload = {
            "model": variant,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
        }
        return (await self._complete(payload))["choices"][0]["logprobs"]

    async def reference(self, task: TaskSpec, item: dict) -> ReferenceProbe:
        """The reference variant's greedy continuation of the item's prompt and its distributions."""
        prompt = render(task.prompt, item)
        try:
            payload = {"model": task.reference, **Probe.request(prompt, task.probe_tokens)}
            probe = Probe.of((await self._complete(payload))["choices"][0])
            return ReferenceProbe(prompt, probe, await self._distributions(task.reference, probe))
        except Exception as exc:
            return ReferenceProbe(prompt, None, None, f"the reference failed: {type(exc).__name__}: {exc}")

    async def _fidelity(self, task: TaskSpec, variant: str, item: dict, ref: ReferenceProbe | None) -> dict:
        """Agreement and KL of the variant's distributions with the reference's, on the same tokens."""
        row = _new_row(render(task.prompt, item))
        try:
            if ref is None or ref.probe is None:
                raise EngineError(ref.error if ref else "no reference continuation")
            mine = await self._distributions(variant, ref.probe)
        except Exception as exc:
            return _errored(row, exc)
        agree, kl = agreement(ref.distributions, mine)
        row["scores"] = {"agree": agree, "positions": len(mine), "kl": kl}
        row["output"] = f"{agree}/{len(mine)} top-1 tokens agree, mean KL {kl / max(len(mine), 1):.3g}"
        return await self._graded(row, task, item, {"output_text": row["output"], **row["scores"]})

    async def _distributions(self, variant: str, probe: Probe) -> list[dict[int, float]]:
        """Top-K next-token logprobs of `variant` at every compared position of `probe`."""
        payload = {"model": variant, **probe.distributions_request()}
        return probe.distributions((await self._complete(payload))["choices"][0])

    async def _graded(self, row: dict, task: TaskSpec, item: dict, sample: dict) -> dict:
        """Grade a sample on every criterion; programs (HumanEval) run in the sandbox."""
        for g in task.graders:
            if isinstance(g, ProgramPasses):
                row["grades"][g.name] = (await run_program(g.program(item, sample), self.limits)).passed
            else:
                row["grades"][g.name] = g.grade(item, sample)
        row["status"] = "pass" if all(row["grades"].values()) else "fail"
        return row

    async def _complete(self, payload: dict, *, chat: bool = False) -> dict:
        """One request through the relay; EngineError with the engine's message if it is not a 200."""
        from server.proxy import CHAT, COMPLETIONS, forward

        body = InferenceBody.model_validate(payload)
        route = CHAT if chat else COMPLETIONS
        caller = CALLER.get()  # yields to users (background), with the scopes of the run's key
        resp = await forward(self.gateway, self.metrics, body, {}, route, caller=caller, background=True)
        data = json.loads(resp.body)
        if resp.status_code != 200:
            message = data.get("error", {}).get("message", data) if isinstance(data, dict) else data
            raise EngineError(f"HTTP {resp.status_code}: {message}")
        return data
