"""Generate tiny ("pico") Llama checkpoints with a real BPE tokenizer, offline and seeded.

Used by the tests and by `make serve` as a demo until a real model is cached. A pico
"post-trained" model is its base plus a seeded perturbation, so deltas between them
are real deltas of realistic magnitude (not zeros).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "A delta is the difference between two sets of weights.",
    "def add(a, b):\n    return a + b\n",
    "Serving many model variants from one base saves memory and time.",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20.",
]


@dataclass(frozen=True)
class PicoSpec:
    """Shape of a pico model; head_dim 32 because vLLM's CPU attention rejects 16."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 384
    tie_word_embeddings: bool = True
    dtype: str = "bfloat16"
    architecture: str = "LlamaForCausalLM"


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on a fixed local corpus and save it HF-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def write_config(out: Path, spec: PicoSpec, eos_id: int) -> None:
    config = {
        "architectures": [spec.architecture],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.hidden_size // spec.num_heads,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype,
        "bos_token_id": 0,
        "eos_token_id": eos_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": eos_id}, indent=2)
    )


def pico_state_dict(spec: PicoSpec, seed: int) -> dict[str, torch.Tensor]:
    """Random Llama weights in HF naming, scaled so activations stay reasonable."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    kv = spec.num_kv_heads * (h // spec.num_heads)
    dtype = getattr(torch, spec.dtype)

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    sd = {
        "model.embed_tokens.weight": rnd(v, h, scale=0.15),
        "model.norm.weight": torch.ones(h, dtype=dtype),
    }
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        sd[p + "self_attn.q_proj.weight"] = rnd(h, h)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, h)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
    if not spec.tie_word_embeddings:
        sd["lm_head.weight"] = rnd(v, h, scale=0.15)
    return sd


def perturb(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A seeded "fine-tune": every tensor moved by a small relative amount."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(sd):
        t = sd[name]
        noise = torch.randn(t.shape, generator=g) * scale * (t.float().abs().mean() + 1e-3)
        out[name] = (t.float() + noise).to(t.dtype)
    return out


def keep_entries(
    moved: dict[str, torch.Tensor], original: dict[str, torch.Tensor], density: float, seed: int
) -> dict[str, torch.Tensor]:
    """`moved` where a seeded `density` of each tensor's entries keep their move, the rest exactly as
    in `original` (gradient-mask tuning leaves masked entries as they were)."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.where(torch.rand(v.shape, generator=g) < density, v, original[k])
        for k, v in sorted(moved.items())
    }


def save_checkpoint(out: Path, sd: dict[str, torch.Tensor], like: Path | None = None) -> Path:
    """Write `sd` as model.safetensors into `out`, copying config/tokenizer from `like`."""
    out.mkdir(parents=True, exist_ok=True)
    if like is not None:
        for f in like.iterdir():
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy(f, out / f.name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    return out


def make_pico_base(out: Path, spec: PicoSpec = PicoSpec(), seed: int = 0) -> Path:
    """Write a complete pico base checkpoint (weights, config, tokenizer) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, spec.vocab_size)
    eos_id = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    write_config(out, spec, eos_id)
    return save_checkpoint(out, pico_state_dict(spec, seed))


# Renders `tools` as Hermes-style models do (a tool-capable template, for the tool-call tests);
# without tools it renders what it always has.
POST_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system: <tools>{{ tools | tojson }}</tools><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}: "
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


def make_pico_post(
    base: Path, out: Path, seed: int, scale: float = 0.3, chat_template: str | None = POST_CHAT_TEMPLATE
) -> Path:
    """A pico "post-trained" model: `base` perturbed with a seeded update, own chat template."""
    from safetensors.torch import load_file

    sd = load_file(str(base / "model.safetensors"))
    save_checkpoint(out, perturb(sd, seed, scale), like=base)
    if chat_template is not None:
        (out / "chat_template.jinja").write_text(chat_template)
    return out
