"""The persisted registry of bases, deltas and variants (one JSON file, written atomically)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from deltas.recipe import MethodName
from server.errors import ConflictError, NotFoundError

Lane = Literal["auto", "swap", "adapter"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def check_name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(
            "names are 1-128 characters: letters, digits and . _ : / -, starting with a letter or digit"
        )
    return value


class BaseRecord(BaseModel):
    """A base model: a checkpoint dir, and which engine serves it."""

    name: str
    path: str
    engine: str | None = Field(
        None, description="the base whose engine hot-loads this one (None: an engine of its own)"
    )
    runtime: bool = Field(False, description="registered through the API (not a start-up flag)")
    architecture: str = ""
    content_hash: str = Field("", description="sha256 over its tensors; a delta extracted on it names it")
    vocab_digest: str | None = Field(None, description="sha256 of its tokenizer's token -> id map")
    files: str = Field("", description="size and mtime of its weight files (content_hash is reused)")


class DeltaRecord(BaseModel):
    """A registered artifact; size and mtime detect a file changed after registration."""

    name: str
    path: str
    size_bytes: int
    mtime_ns: int
    base_architecture: str
    base_content_hash: str
    tensors: int
    encodings: list[str] = Field(default_factory=lambda: ["dense"], description="codecs its tensors use")
    lossless: bool = Field(True, description="rebuilds the post-trained weights exactly on its base")
    chat_template: str | None = None
    eos_token_ids: list[int] = Field(default_factory=list)
    uploaded: bool = False
    adapter_rank: int | None = Field(None, description="LoRA rank that carries it exactly (None: cannot)")
    adapter_unfit: str | None = Field(None, description="why it cannot be a LoRA adapter")
    vocab_digest: str | None = Field(None, description="its post model's tokenizer (token -> id map)")
    source: str | None = Field(None, description="the local file it was registered from, when `path` is "
                               "its artifact-store URI")
    source_mtime_ns: int | None = Field(None, description="that file's mtime (a newer one is re-registered)")


class VariantTerm(BaseModel):
    delta: str
    alpha: float = 1.0
    density: float = Field(1.0, gt=0, le=1, description="fraction kept by ties/dare_* (1: all)")


class VariantRecord(BaseModel):
    name: str
    base: str
    deltas: list[VariantTerm] = Field(default_factory=list)
    method: MethodName = "linear"
    normalize: bool | None = None
    seed: int = Field(0, ge=0)
    allow_vocab_mismatch: bool = Field(
        False, description="serve deltas whose post model's tokenizer differs from this base's"
    )
    lane: Lane = Field(
        "auto",
        description="swap: the engine's resident weights; adapter: a vLLM LoRA adapter on the resident "
        "base; auto: adapter where the variant fits one and the engine has LoRA slots",
    )

    _check = field_validator("name")(check_name)


class RegistryState(BaseModel):
    bases: dict[str, BaseRecord] = Field(default_factory=dict)
    deltas: dict[str, DeltaRecord] = Field(default_factory=dict)
    variants: dict[str, VariantRecord] = Field(default_factory=dict)


class Registry:
    """In-memory registry mirrored to `path` after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.state = (
            RegistryState.model_validate_json(path.read_text()) if path.is_file() else RegistryState()
        )

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as out:  # a crash at any point leaves the old file or the new one
            out.write(self.state.model_dump_json(indent=2))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)

    # bases -------------------------------------------------------------
    def put_base(self, record: BaseRecord) -> None:
        self.state.bases[record.name] = record
        self.save()

    def remove_base(self, name: str) -> BaseRecord:
        record = self.base(name)
        users = [v.name for v in self.state.variants.values() if v.base == name]
        if users:
            raise ConflictError(f"base {name!r} is used by variants {users}; delete them first")
        del self.state.bases[name]
        self.save()
        return record

    def base(self, name: str) -> BaseRecord:
        try:
            return self.state.bases[name]
        except KeyError:
            raise NotFoundError(f"unknown base {name!r}; known: {sorted(self.state.bases)}") from None

    # deltas ------------------------------------------------------------
    def add_delta(self, record: DeltaRecord) -> None:
        if record.name in self.state.deltas:
            raise ConflictError(f"delta {record.name!r} exists; delete it first")
        self.state.deltas[record.name] = record
        self.save()

    def delta(self, name: str) -> DeltaRecord:
        try:
            return self.state.deltas[name]
        except KeyError:
            raise NotFoundError(f"unknown delta {name!r}; list them with GET /v1/deltas") from None

    def remove_delta(self, name: str) -> DeltaRecord:
        record = self.delta(name)
        users = [v.name for v in self.state.variants.values() if any(t.delta == name for t in v.deltas)]
        if users:
            raise ConflictError(f"delta {name!r} is used by variants {users}; delete them first")
        del self.state.deltas[name]
        self.save()
        return record

    # variants ----------------------------------------------------------
    def add_variant(self, record: VariantRecord) -> None:
        if record.name in self.state.variants or record.name in self.state.bases:
            raise ConflictError(f"model name {record.name!r} is taken")
        self.state.variants[record.name] = record
        self.save()

    def variant(self, name: str) -> VariantRecord:
        """A variant by name; a base's name is the variant of the plain base."""
        if name in self.state.variants:
            return self.state.variants[name]
        if name in self.state.bases:
            return VariantRecord(name=name, base=name)
        raise NotFoundError(f"unknown model {name!r}; list them with GET /v1/models")

    def remove_variant(self, name: str) -> None:
        if name not in self.state.variants:
            raise NotFoundError(f"unknown variant {name!r}")
        del self.state.variants[name]
        self.save()

    def model_names(self) -> list[str]:
        return sorted(self.state.bases) + sorted(self.state.variants)


def file_identity(path: str | Path) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns
