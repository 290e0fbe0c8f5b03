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


def check_compatible(base: Checkpoint, post: Checkpoint) -> None:
    """Refuse, naming the field or tensor, when two checkpoints cannot form a delta."""
    if base.architecture != post.architecture:
        raise IncompatibleError(
            f"architecture differs: base is {base.architecture}, post is {post.architecture}"
        )
    for field in STRUCTURAL_FIELDS:
        if base.config.get(field) != post.config.get(field):
            raise IncompatibleError(
                f"config field {field!r} differs: base has {base.config.get(field)!r}, "
                f"post has {post.config.get(field)!r}"
            )
    base_names, post_names = set(base.tensor_names()), set(post.tensor_names())
    if base_names != post_names:
        only_base = sorted(base_names - post_names)[:3]
        only_post = sorted(post_names - base_names)[:3]
        raise IncompatibleError(f"tensor names differ: only in base {only_base}, only in post {only_post}")
    for name in sorted(base_names):
        b, p = base.shape_and_dtype(name), post.shape_and_dtype(name)
        if b != p:
            raise IncompatibleError(f"tensor {name!r} differs: base is {b[0]} {b[1]}, post is {p[0]} {p[1]}")
