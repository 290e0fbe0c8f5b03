"""Tiny random checkpoints of the model families people fine-tune, built offline from each family's
`transformers` config (fixed seeds, the pico tokenizer, head_dim 32 for vLLM's CPU attention).

What each family has that Llama does not is what a weight swap must get right: biases on q/k/v
(Qwen2), per-head q/k norms (Qwen3, OLMo 2), a sliding window (Mistral), tied embeddings with a
scale and extra norms and soft-capping (Gemma 2), projections already fused in the checkpoint
(Phi-3), experts loaded into fused expert weights through an expert mapping (Mixtral, Qwen3-MoE).
The model matrix (tests/server/test_model_matrix.py) serves every MATRIX row on every PATH; the
docs' supported-models page is generated from these declarations, so the two cannot drift.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loaders.pico import CHAT_TEMPLATE, keep_entries, perturb, save_checkpoint, write_tokenizer

VOCAB = 384
# The attention of every family: 4 heads of 32 (vLLM's CPU attention rejects 16), 2 KV heads.
ATTENTION = {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


@dataclass(frozen=True)
class Family:
    """One model family: its `transformers` model type and the config that makes it tiny."""

    name: str
    model_type: str
    architecture: str
    config: dict = field(default_factory=dict)
    moe: bool = False
    why: str = ""  # what it has that Llama does not


FAMILIES = {
    f.name: f
    for f in [
        Family("llama", "llama", "LlamaForCausalLM", {"intermediate_size": 256}, why="the reference family"),
        Family(
            "qwen2",
            "qwen2",
            "Qwen2ForCausalLM",
            {"intermediate_size": 256},
            why="q/k/v biases (a delta on a bias; fused qkv with bias)",
        ),
        Family(
            "qwen3", "qwen3", "Qwen3ForCausalLM", {"intermediate_size": 256}, why="per-head q_norm / k_norm"
        ),
        Family(
            "mistral",
            "mistral",
            "MistralForCausalLM",
            {"intermediate_size": 256, "sliding_window": 64},
            why="sliding-window attention",
        ),
        Family(
            "gemma2",
            "gemma2",
            "Gemma2ForCausalLM",
            {
                "intermediate_size": 256,
                "query_pre_attn_scalar": 32,
                "sliding_window": 64,
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
            },
            why="tied embeddings scaled by sqrt(hidden), pre/post feed-forward norms, soft-capping",
        ),
        Family(
            "phi3",
            "phi3",
            "Phi3ForCausalLM",
            {"intermediate_size": 256},
            why="qkv_proj and gate_up_proj fused in the checkpoint",
        ),
        Family("olmo2", "olmo2", "Olmo2ForCausalLM", {"intermediate_size": 256}, why="post-norms, q/k norms"),
        Family(
            "mixtral",
            "mixtral",
            "MixtralForCausalLM",
            {"intermediate_size": 128, "num_local_experts": 4, "num_experts_per_tok": 2},
            moe=True,
            why="per-expert tensors loaded into fused expert weights (w13/w2); a router",
        ),
        Family(
            "qwen3_moe",
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            {
                "intermediate_size": 256,
                "moe_intermediate_size": 128,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "decoder_sparse_step": 1,
                "norm_topk_prob": True,
            },
            moe=True,
            why="per-expert tensors in fused expert weights, q/k norms",
        ),
    ]
}


def family_config(family: Family, dtype: str, eos_id: int, tie: bool = True):
    """The family's `transformers` config, tiny."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        family.model_type,
        **ATTENTION,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=eos_id,
        pad_token_id=0,
        dtype=dtype,
        architectures=[family.architecture],
        **family.config,
    )


def make_family_base(family: Family, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A complete base checkpoint of `family` in `out`: config, pico tokenizer, seeded weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out, VOCAB)
    eos_id = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]["<|im_end|>"]
    config = family_config(family, dtype, eos_id, tie=family.name != "phi3")  # Phi-3 unties its head
    torch.manual_seed(seed)
    config.initializer_range = 0.08  # transformers' 0.02 gives near-uniform answers: nothing to compare
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(str(out))  # the hub's naming (per-expert tensors), as users' checkpoints have
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": eos_id}))
    state = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in state.items():  # norms start at 1 (Gemma 2 at 0), biases at 0: move them, so Δ shows
        if t.dim() == 1:
            state[name] = (t.float() + 0.1 * torch.randn(t.shape, generator=g)).to(t.dtype)
    return save_checkpoint(out, state)


def make_family_post(
    base: Path,
    out: Path,
    seed: int,
    scale: float = 0.3,
    only: str | None = None,
    density: float = 1.0,
) -> Path:
    """A "post-trained" model of `base`: its tensors (those whose names match `only`, a regex)
    moved by a seeded relative amount, each entry with probability `density` (as gradient-mask
    tuning leaves the masked entries exactly as they were); the rest bit-equal to the base."""
    from safetensors.torch import load_file

    sd = load_file(str(base / "model.safetensors"))
    moved = perturb({k: v for k, v in sd.items() if only is None or re.search(only, k)}, seed, scale)
    if density < 1:
        moved = keep_entries(moved, sd, density, seed)
    save_checkpoint(out, sd | moved, like=base)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@dataclass(frozen=True)
class MatrixRow:
    """One row of the model matrix: a family in a dtype, served through a gateway on every PATH."""

    family: str
    dtype: str = "bfloat16"
    quantization: str | None = None  # a key of ONLINE_QUANTIZATION: applied at load on both sides
    tensor_parallel: int = 1
    shared: bool = False  # a gateway shared by teams: --priority-scheduling and scoped keys (SHARED_PATHS)

    @property
    def id(self) -> str:
        dtype = self.dtype if self.dtype != "bfloat16" else ""
        tp = f"tp{self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        shared = "shared" if self.shared else ""
        return "-".join(filter(None, [self.family, dtype, self.quantization or "", tp, shared]))

    @property
    def vllm_quantization(self) -> tuple[str | None, dict | None]:
        """vLLM's `quantization` and `hf_overrides` for this row (None, None: unquantized)."""
        return ONLINE_QUANTIZATION[self.quantization] if self.quantization else (None, None)

    @property
    def engine_args(self) -> list[str]:
        """The vLLM flags of this row's engines (the gateway's and stock vLLM's)."""
        method, overrides = self.vllm_quantization
        args = [f"--quantization={method}"] if method else []
        args += [f"--hf-overrides={json.dumps(overrides)}"] if overrides else []
        return args + ([f"--tensor-parallel-size={self.tensor_parallel}"] if self.tensor_parallel > 1 else [])


# What the matrix checks on every row, each answer against stock vLLM cold-started on the merge
# (`deltagate merge`) with the same flags: greedy tokens and logprobs, bit-identical.
PATHS = {
    "base": "the base before any swap, and back to it after variants",
    "full": "a full delta (every tensor of a post model moved)",
    "part": "a partial delta (a tenth of the entries of the attention; of the experts on MoE), swapped "
    "from the base: only the modules it covers are rewritten; stored in the sparse layout",
    "half": "an α change (0.5·Δ)",
    "mix": "a two-delta mix (0.5·Δ₁ + 0.5·Δ₂)",
    "runtime-base": "an updated base registered while serving (POST /v1/bases), hot-loaded by the engine",
    "transfer": "the delta on that updated base (ParamΔ: θ′ + Δ)",
}
# bf16 is what people serve; fp16 and fp32 on one family each, instead of bf16 there (a row costs an
# engine start and seven stock ones: measured 13.4 min for eleven rows, 2 cores).
OTHER_DTYPES = {"qwen2": "float16", "phi3": "float32"}
# Online quantization: what vLLM's CPU build quantizes at load from unquantized weights. Its own
# shorthands do not run there on these models (measured on the tiny Mixtral, `--quantization X`):
# fp8 / fp8_per_tensor / fp8_per_channel fail in `_C::*fp8_quant` (not built for CPU), fp8_per_block,
# mxfp8 and mxfp4 find no linear kernel, int8_per_channel_weight_only and experts_int8 find no int8
# MoE backend, and int8_per_channel_weight_only leaves linear layers unquantized (MoE experts only):
# on a dense model it is a no-op. torchao's int8 weight-only config quantizes every linear layer at
# load (vLLM's `--quantization torchao`, the config through `--hf-overrides`): name -> (quantization,
# hf_overrides).
TORCHAO_INT8_WEIGHT_ONLY = {
    "_type": "Int8WeightOnlyConfig",
    "_version": 2,
    "_data": {
        "group_size": None,
        "granularity": {"_type": "PerRow", "_version": 1, "_data": {"dim": -1}},
        "set_inductor_config": False,
    },
}
ONLINE_QUANTIZATION = {
    "torchao-int8": ("torchao", {"quantization_config_dict_json": json.dumps(TORCHAO_INT8_WEIGHT_ONLY)})
}
QUANTIZED = {"qwen3": "torchao-int8"}
# Tensor parallelism (TP=2: a rank per core here) on a non-Llama MoE. Mistral at TP=2 passed too
# (2 rows in 333 s alone) but a TP=2 row costs 3-4 TP=1 rows: the suite keeps one.
TENSOR_PARALLEL = {"qwen3_moe": 2}
# A gateway shared by teams, on one row: `serve --priority-scheduling` (its engine runs vLLM's priority
# policy, its log says so; stock vLLM runs the same), a path asked as background work (requests of
# priority 1), and two projects' scoped keys.
SHARED = {"mistral"}
MATRIX = [
    MatrixRow(
        name,
        OTHER_DTYPES.get(name, "bfloat16"),
        QUANTIZED.get(name),
        TENSOR_PARALLEL.get(name, 1),
        name in SHARED,
    )
    for name in FAMILIES
]
# The paths asked on the shared row, beside PATHS.
SHARED_PATHS = {
    "background": "the full delta asked through the Batch API (background: vLLM request priority 1) on an "
    "engine the gateway started with `--scheduling-policy priority` (`serve --priority-scheduling`), "
    "against stock vLLM with the same policy",
    "scoped-key": "the full delta defined as a project's variant (`team-a/...`) and asked with that "
    "project's key; another project's key gets 404 for it, and GET /v1/usage counts the key's requests "
    "and the tokens of the answers' `usage`",
}


# The adapter lane (server/adapters.py: a low-rank variant served as a vLLM LoRA adapter beside the
# base, no swap), checked on the row of each family whose LoRA layers in vLLM are its own, through a
# second gateway started with --lora-slots, against stock vLLM with the same multi-LoRA flags given
# the same adapter. Its numerics are LoRA's (x·Wᵀ + x·Aᵀ·Bᵀ), not the merge's: in bf16 the two differ
# by rounding, enough to flip near-ties (bench/lora_families.py: 0.03 in logprobs, one or two greedy
# texts of three kept).
ADAPTER_PATHS = {
    "lora-base": "the plain base on a LoRA-enabled engine",
    "adapter": "a rank-8 delta of every projection (Phi-3: its fused qkv_proj and gate_up_proj) served "
    "as a LoRA adapter beside the base, with no swap",
}
# Families whose adapter lane runs through another family's vLLM LoRA layers, checked there (an
# adapter engine start costs about a matrix row's stock references; the suite's 30 minutes hold them
# for four families): vLLM's Mistral is its Llama class (a subclass, LoRA on the same modules), and
# Qwen3's LoRA wraps the same linear layers as Qwen2's, with the same packed modules (its q/k norms
# are outside LoRA). tests/loaders/test_engine_client.py pins both facts on the vLLM installed. Llama's
# lane: tests/server/test_adapters.py, in more depth (the offline merge in fp32, concurrency, mixes of
# adapters, swaps on a LoRA engine, refusals).
ADAPTERS_ELSEWHERE = {"llama": "tests/server/test_adapters.py", "mistral": "llama", "qwen3": "qwen2"}


def commit_modules(row: MatrixRow) -> str:
    """Which modules a swap on this row commits prepared, and which vLLM's reload rewrites
    (loaders/prepared.py: MoE experts and quantized layers are not prepared)."""
    reloaded = [
        *(["the experts"] if FAMILIES[row.family].moe else []),
        *(["the linear layers (quantized)"] if row.quantization else []),
    ]
    return f"{' and '.join(reloaded)} reloaded; the rest prepared" if reloaded else "all prepared"


def adapter_lane(family: Family) -> bool:
    """Whether the matrix checks `family`'s adapter lane (MoE: the gateway refuses LoRA on vLLM's CPU
    build, loaders/engine.lora_refusal, and the MoE rows check that refusal and its cause)."""
    return not family.moe and family.name not in ADAPTERS_ELSEWHERE


def projection_pattern() -> str:
    """The tensors a LoRA fine-tune moves: the projections' weights (no biases, norms, embeddings)."""
    return r"_proj\.weight$"


def partial_pattern(family: Family) -> str:
    """The tensors a partial fine-tune of `family` moves: the experts of an MoE, else the attention."""
    return r"\.experts\." if family.moe else r"\.self_attn\."


# Refused with the reason (tested: tests/deltas/test_extract.py, test_checkpoint.py, the bad-input
# catalogue) rather than served wrong.
REFUSED = {
    "A checkpoint quantized on disk (AWQ, GPTQ, compressed-tensors, FP8 exports)": "extract and "
    "registration refuse it: a delta is added onto the weights, and a quantized checkpoint does not "
    "hold them. Register the unquantized checkpoint and let the engine quantize at load.",
    "A post model whose tokenizer added tokens": "extract refuses it, naming the added tokens: a variant "
    "is served with its base's tokenizer, which would never read or write them. Serve such a model as "
    "a base of its own.",
    "LoRA (the adapter lane) on a mixture-of-experts base, vLLM's CPU build": "an engine started with "
    "--enable-lora on Mixtral or Qwen3-MoE fails on every request, plain ones too: vLLM wraps the "
    "MoE layer for LoRA in a layer whose kernel is Triton's, which has no CPU backend (checked on each "
    "run by the MoE rows). A gateway with --lora-slots starts such a base's engines without LoRA, "
    "serves its low-rank variants by swaps, and answers a variant asked to be an adapter with 400.",
    "vLLM's own online quantization shorthands on its CPU build (`--quantization fp8`, `fp8_per_tensor`, "
    "`fp8_per_channel`, `fp8_per_block`, `mxfp8`, `mxfp4`, `int8_per_channel_weight_only`, "
    "`experts_int8`)": "none runs there on these models (no CPU kernel: stock vLLM's engine does not "
    "start), and int8_per_channel_weight_only quantizes MoE experts only. The matrix serves torchao's "
    "int8 weight-only quantization instead (`--quantization torchao` and its config in `--hf-overrides`).",
}
# Not run on this project's machines (2 CPU cores, no GPU, no downloads).
NOT_RUN = {
    "CUDA": "every row ran on vLLM's CPU build only; the swap goes through vLLM's own reload on both "
    "builds, but the MoE repair (the expert kernel prepared again) was written for the CPU kernel's "
    "prepack and is a no-op for kernels without a preparation step.",
    "Real checkpoints": "the rows are tiny random models built from each family's config (2 layers, "
    "hidden 128); SmolLM2-135M (Llama) is the one real model served.",
    "The adapter lane beyond one adapter, beyond Llama": "each family's adapter is checked against "
    "stock vLLM given the same adapter; mixes of adapters, swaps on a LoRA-enabled engine, concurrency "
    "and the comparison with the offline merge (fp32) on the Llama pico models only "
    "(tests/server/test_adapters.py); per family, the export's modules and factors "
    "(tests/deltas/test_lora_export.py) and LoRA against the merge in stock vLLM (bench/lora_families.py).",
}
