"""Lazy, tensor-by-tensor access to a Hugging Face safetensors checkpoint directory."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from deltas.errors import IncompatibleError, InvalidArtifactError

# Config fields that decide whether two checkpoints have the same tensor layout.
# Other fields (rope scaling, token ids, names) may differ between a base and its
# updated version without making a delta inapplicable.
STRUCTURAL_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)

# Side files a served variant needs besides weights.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class Checkpoint:
    """A checkpoint directory: config, side files and lazily read tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise InvalidArtifactError(f"{self.path}: not a checkpoint directory (no config.json)")
        self._handles: dict[Path, object] = {}

    @cached_property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["unknown"]
        return archs[0]

    @cached_property
    def _tensor_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.path / fname for name, fname in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InvalidArtifactError(f"{self.path}: no *.safetensors files")
        mapping: dict[str, Path] = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    mapping[name] = f
        return mapping

    def tensor_names(self) -> list[str]:
        """Every tensor name, sorted."""
        return sorted(self._tensor_files)

    def _handle(self, file: Path):
        if file not in self._handles:
            # One open shard at a time keeps memory flat on sharded checkpoints.
            self._handles.clear()
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        try:
            file = self._tensor_files[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None
        return self._handle(file).get_tensor(name)

    def shape_and_dtype(self, name: str) -> tuple[list[int], str]:
        """Shape and dtype of one tensor without reading its bytes."""
        sl = self._handle(self._tensor_files[name]).get_slice(name)
        return list(sl.get_shape()), str(sl.get_dtype())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) one at a time, in name order."""
        for name in self.tensor_names():
            yield name, self.get(name)

    def structural_config(self) -> dict:
        return {k: self.config.get(k) for k in STRUCTURAL_FIELDS if k in self.config}

    def config_fingerprint(self) -> str:
        blob = json.dumps(self.structural_config(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def side_files(self) -> dict[str, str]:
        """Tokenizer, chat template and generation config files present, as text."""
        return {name: (self.path / name).read_text() for name in SIDE_FILES if (self.path / name).is_file()}

    def chat_template(self) -> str | None:
        """The chat template, from chat_template.jinja or tokenizer_config.json."""
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        tok_cfg = self.path / "tokenizer_config.json"
        if tok_cfg.is_file():
            template = json.loads(tok_cfg.read_text()).get("chat_template")
            if isinstance(template, str):
                return template
        return None

    def generation_config(self) -> dict:
        f = self.path / "generation_config.json"
        return json.loads(f.read_text()) if f.is_file() else {}


def tensor_digest(hasher, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor's identity and bytes into a running hash."""
    hasher.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
    hasher.update(tensor_bytes(tensor))


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    t = tensor.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def content_hash(ckpt: Checkpoint) -> str:
    """sha256 over every tensor, streamed."""
    hasher = hashlib.sha256()
    for name, tensor in ckpt.iter_tensors():
        tensor_digest(hasher, name, tensor)
    return hasher.hexdigest()


def refuse_quantized(ckpt: Checkpoint) -> None:
    """Refuse a checkpoint quantized on disk (AWQ, GPTQ, compressed-tensors, FP8...): a delta is added
    onto the weights themselves, and a quantized checkpoint does not hold them."""
    quant = ckpt.config.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method", "unnamed") if isinstance(quant, dict) else "unnamed"
    raise InvalidArtifactError(
        f"the checkpoint is quantized ({method}): deltas are added onto unquantized weights. Use its "
        "unquantized checkpoint and let the engine quantize at load (online quantization; on vLLM's CPU "
        "build: --engine-arg=--quantization=int8_per_channel_weight_only)"
    )


def check_compatible(base: Checkpoint, post: Checkpoint) -> None:
    """Refuse, naming the field or tensor, when two checkpoints cannot form a delta."""
    refuse_quantized(base)
    refuse_quantized(post)
    added = added_tokens(base.side_files(), post.side_files())
    if added:
        shown = ", ".join(repr(t) for t in added[:5]) + (", ..." if len(added) > 5 else "")
        raise IncompatibleError(
            f"the post model's tokenizer adds {len(added)} tokens to the base's ({shown}); a variant is "
            "served with its base's tokenizer, which would never read or write them: serve the post model "
            "as a base of its own, or fine-tune without adding tokens"
        )
    problem = layout_difference(base, post, "base", "post", STRUCTURAL_FIELDS)
    if problem:
        raise IncompatibleError(problem)


def _vocabulary(side_files: dict[str, str]) -> tuple[dict, list[tuple[int, str]]] | None:
    """A tokenizer.json's vocabulary and its added tokens as sorted (id, content); None without one."""
    text = side_files.get("tokenizer.json")
    if text is None:
        return None
    try:
        tokenizer = json.loads(text)
        vocab = tokenizer["model"]["vocab"]
        added = sorted((t["id"], t["content"]) for t in tokenizer.get("added_tokens", []))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArtifactError(
            f"tokenizer.json has no readable vocabulary ({type(exc).__name__})"
        ) from None
    return vocab, added


def _token_map(side_files: dict[str, str]) -> dict[str, int] | None:
    """A tokenizer's tokens (its vocabulary and added tokens) -> ids; None without a tokenizer.json."""
    vocabulary = _vocabulary(side_files)
    if vocabulary is None:
        return None
    vocab, added = vocabulary
    return {**dict(vocab), **{content: id for id, content in added}}


def added_tokens(base_files: dict[str, str], post_files: dict[str, str]) -> list[str]:
    """Tokens the post model's tokenizer has and the base's has not, by id (none when either has no
    tokenizer.json: nothing to compare)."""
    base, post = _token_map(base_files), _token_map(post_files)
    if base is None or post is None:
        return []
    return sorted((t for t in post if t not in base), key=post.__getitem__)


# Config fields that do not change what a checkpoint computes. A base that differs from an
# engine's base only in these (and in tensor values) can be hot-loaded into that engine,
# which keeps the config it started with: rope, norm eps, activation must all match.
NON_SERVING_FIELDS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "use_cache",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    }
)


def serving_difference(engine_base: Checkpoint, other: Checkpoint) -> str | None:
    """Why `other` cannot be loaded into an engine started on `engine_base` (None: it can)."""
    fields = sorted((set(engine_base.config) | set(other.config)) - NON_SERVING_FIELDS)
    problem = layout_difference(engine_base, other, "the engine's base", "this base", fields)
    if problem is None and vocabulary_digest(engine_base.side_files()) != vocabulary_digest(
        other.side_files()
    ):
        # the engine tokenizes with its start-up base's tokenizer
        problem = "tokenizer differs: the engine's base and this base map tokens to other ids"
    return problem


def layout_difference(a: Checkpoint, b: Checkpoint, a_is: str, b_is: str, fields) -> str | None:
    """The first config field or tensor (name, shape, dtype) in which `a` and `b` differ."""
    if a.architecture != b.architecture:
        return f"architecture differs: {a_is} is {a.architecture}, {b_is} is {b.architecture}"
    for field in fields:
        if a.config.get(field) != b.config.get(field):
            return (
                f"config field {field!r} differs: {a_is} has {a.config.get(field)!r}, "
                f"{b_is} has {b.config.get(field)!r}"
            )
    a_names, b_names = set(a.tensor_names()), set(b.tensor_names())
    if a_names != b_names:
        only_a, only_b = sorted(a_names - b_names)[:3], sorted(b_names - a_names)[:3]
        return f"tensor names differ: only in {a_is} {only_a}, only in {b_is} {only_b}"
    for name in sorted(a_names):
        x, y = a.shape_and_dtype(name), b.shape_and_dtype(name)
        if x != y:
            return f"tensor {name!r} differs: {a_is} is {x[0]} {x[1]}, {b_is} is {y[0]} {y[1]}"
    return None


def check_checkpoint(ckpt: Checkpoint) -> None:
    """Refuse, naming the field or tensor, a directory that is not a servable checkpoint."""
    try:
        config = ckpt.config
    except (OSError, ValueError) as exc:
        raise InvalidArtifactError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArtifactError("config.json is not a JSON object")
    for field in ("architectures", "model_type", "vocab_size"):
        if field not in config:
            raise InvalidArtifactError(f"config.json has no {field!r}")
    refuse_quantized(ckpt)
    try:
        names = ckpt.tensor_names()
        layout = {name: ckpt.shape_and_dtype(name) for name in names}
    except InvalidArtifactError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise InvalidArtifactError(f"weights are unreadable: {type(exc).__name__}: {exc}") from None
    for name, (shape, dtype) in layout.items():
        if dtype not in FLOAT_DTYPES:
            raise InvalidArtifactError(f"tensor {name!r} is {dtype}; a base's weights must be floating point")
        if "embed_tokens" in name and shape[0] != config["vocab_size"]:
            raise InvalidArtifactError(
                f"tensor {name!r} has {shape[0]} rows, config.json says vocab_size {config['vocab_size']}"
            )
    if not any((ckpt.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise InvalidArtifactError("no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    if (ckpt.path / "tokenizer.json").is_file():
        vocabulary_digest(ckpt.side_files())


FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


def vocabulary_digest(side_files: dict[str, str]) -> str | None:
    """sha256 of a tokenizer's token -> id map (tokenizer.json), None without one.

    Two checkpoints with the same digest read and write token ids the same way, so a delta's
    embedding rows mean the same tokens on either.
    """
    vocabulary = _vocabulary(side_files)
    if vocabulary is None:
        return None
    vocab, added = vocabulary
    blob = json.dumps({"vocab": vocab, "added": added}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()
