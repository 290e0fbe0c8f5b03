"""Stock vLLM's answers for many checkpoints from one process: `vllm.LLM` instances started one after
another (imports and the compile cache paid once; 6-16 s a tiny model here, against 42-57 CPU-s for an
API server engine), no deltagate code in the engine.

    python -m tests.server.stock_answers OUT.json MAX_MODEL_LEN JOBS.json

JOBS.json: [{"model": CHECKPOINT, optional "quantization": vLLM's --quantization, "hf_overrides"
(its config, for torchao), "tensor_parallel": N, "cores": the cores to bind (as the engine compared
with binds: tests/server/conftest.ref_cores), "lora": true (vLLM's multi-LoRA on, with LORA's flags),
"adapters": {LABEL: PEFT DIR}, "openai": true (answers as the OpenAI completions API gives them),
"key": what to file the answers under (default: CHECKPOINT), "probe": true (the last job: ask once and
record what fails, not the answers)}]. Writes
{key: [{"token_ids", "token_logprobs"} per prompt], key+LABEL: the same through that adapter,
key+WEIGHTS: a quantized job's linear weight types}: greedy,
one prompt at a time, the same prompts and lengths the gateway's answers are asked with
(tests/server/conftest.py). An "openai" job's answers are conftest.completion_outputs' dicts (text,
tokens, token_logprobs, top_logprobs), formatted by vLLM's own completions server code.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loaders.engine import checkpoint_dtype

# The multi-LoRA flags of a "lora" job: those of a gateway started with --lora-slots 2 (its default
# --max-lora-rank 16), so the two engines run the same kernels.
LORA = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 16}
WEIGHTS = "#weights"  # a quantized job's key + this: the linear layers' weight types


def linear_weight_types(worker) -> list[str]:
    """On an engine worker: the type of each linear layer's weight once loaded (a quantization's
    tensor subclass, or Parameter)."""
    from vllm.model_executor.layers.linear import LinearBase

    model = worker.model_runner.get_model()
    return [
        type(m.weight).__name__ for m in model.modules() if isinstance(m, LinearBase) and hasattr(m, "weight")
    ]


def openai_completion(output, tokenizer) -> dict:
    """One `vllm.LLM` completion as the OpenAI completions API answers it (conftest.completion_outputs'
    fields): vLLM's own formatting of tokens and top logprobs, so the two compare bit for bit."""
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    class _Server:  # the formatter reads only these of the server
        return_tokens_as_token_ids = False
        _get_decoded_token = staticmethod(OpenAIServingCompletion._get_decoded_token)

    logprobs = OpenAIServingCompletion._create_completion_logprobs(
        _Server(), output.token_ids, output.logprobs, num_output_top_logprobs=3, tokenizer=tokenizer
    )
    return {"text": output.text, **logprobs.model_dump(exclude={"text_offset"})}


@dataclass
class Stock:
    """This module run as its own process on `jobs`, one `vllm.LLM` after another (started by
    `start`, its answers read by `answers`)."""

    proc: subprocess.Popen
    out: Path
    log: Path

    @classmethod
    def start(cls, jobs: list[dict], work: Path, max_model_len: int) -> Stock:
        work.mkdir(parents=True, exist_ok=True)
        out, log, spec = work / "stock.json", work / "stock.log", work / "stock-jobs.json"
        spec.write_text(json.dumps(jobs))
        cmd = [sys.executable, "-m", "tests.server.stock_answers", str(out), str(max_model_len), str(spec)]
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        return cls(proc, out, log)

    def answers(self) -> dict:
        """Stock vLLM's answers per job key (waits for the process)."""
        code = self.proc.wait(timeout=1800)
        assert code == 0, f"stock answers exited with {code}:\n{self.log.read_text()[-4000:]}"
        return json.loads(self.out.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as EngineProcess starts engines
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from tests.server.conftest import MAX_TOKENS, PROMPTS

    out, max_model_len, jobs = sys.argv[1:]
    jobs = json.loads(open(jobs).read())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3)
    answers = {}
    for i, job in enumerate(jobs):
        start, model = time.monotonic(), job["model"]
        tp, quantization = job.get("tensor_parallel", 1), job.get("quantization")
        if tp > 1:  # a rank per core (one NUMA node here: vLLM does not bind by itself)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in range(tp))
        elif job.get("cores"):
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = job["cores"]
        else:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        llm = LLM(
            model=model,
            max_model_len=int(max_model_len),
            dtype=checkpoint_dtype(model) or "auto",
            seed=0,
            quantization=quantization,
            hf_overrides=job.get("hf_overrides"),
            tensor_parallel_size=tp,
            scheduling_policy=job.get("scheduling_policy", "fcfs"),
            **(LORA if job.get("lora") else {}),
        )
        key = job.get("key", model)
        if quantization:  # what the engine made of the linear layers' weights: quantized or not
            answers[key + WEIGHTS] = sorted(set(sum(llm.collective_rpc(linear_weight_types), [])))
        if job.get("probe"):  # an engine that may fail on every request: what it answers or raises
            try:
                llm.generate([PROMPTS[0]], params, use_tqdm=False)
                answers[key] = "answered"
            except Exception as exc:  # what vLLM raised is the finding
                answers[key] = f"{type(exc).__name__}: {exc}"
            break  # a failed engine core leaves this process unfit for another
        adapters = {"": None} | {
            label: LoRARequest(label, n, path)
            for n, (label, path) in enumerate(job.get("adapters", {}).items(), 1)
        }
        for label, adapter in adapters.items():
            answers[key + label] = []
            for prompt in PROMPTS:
                got = llm.generate([prompt], params, use_tqdm=False, lora_request=adapter)[0].outputs[0]
                if job.get("openai"):
                    answers[key + label].append(openai_completion(got, llm.get_tokenizer()))
                    continue
                logprobs = [entry[t].logprob for t, entry in zip(got.token_ids, got.logprobs, strict=True)]
                answers[key + label].append({"token_ids": list(got.token_ids), "token_logprobs": logprobs})
        del llm
        gc.collect()
        print(f"stock answers {i + 1}/{len(jobs)}: {model} in {time.monotonic() - start:.1f}s", flush=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(answers, f)
    os.replace(tmp, out)
