"""Stock vLLM's answers for many checkpoints from one process: `vllm.LLM` instances started one after
another (imports and the compile cache paid once; 6-16 s a tiny model here, against 42-57 CPU-s for an
API server engine), no deltagate code in the engine.

    python -m tests.server.stock_answers OUT.json MAX_MODEL_LEN JOBS.json

JOBS.json: [{"model": CHECKPOINT, "quantization": None or vLLM's --quantization, "tensor_parallel": N}].
Writes
{checkpoint: [{"token_ids", "token_logprobs"} per prompt]}: greedy, one prompt at a time,
the same prompts and lengths the gateway's answers are asked with (tests/server/conftest.py).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

from loaders.engine import checkpoint_dtype

if __name__ == "__main__":
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # as EngineProcess starts engines
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process

    from vllm import LLM, SamplingParams

    from tests.server.conftest import MAX_TOKENS, PROMPTS

    out, max_model_len, jobs = sys.argv[1:]
    jobs = json.loads(open(jobs).read())
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3)
    answers = {}
    for i, job in enumerate(jobs):
        start, model = time.monotonic(), job["model"]
        if job["tensor_parallel"] > 1:  # a rank per core (one NUMA node here: vLLM does not bind by itself)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(c) for c in range(job["tensor_parallel"]))
        else:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        llm = LLM(
            model=model,
            max_model_len=int(max_model_len),
            dtype=checkpoint_dtype(model) or "auto",
            seed=0,
            quantization=job["quantization"],
            tensor_parallel_size=job["tensor_parallel"],
        )
        answers[model] = []
        for prompt in PROMPTS:
            got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
            logprobs = [entry[t].logprob for t, entry in zip(got.token_ids, got.logprobs, strict=True)]
            answers[model].append({"token_ids": list(got.token_ids), "token_logprobs": logprobs})
        del llm
        gc.collect()
        print(f"stock answers {i + 1}/{len(jobs)}: {model} in {time.monotonic() - start:.1f}s", flush=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(answers, f)
    os.replace(tmp, out)
