"""Shared fixtures: pico checkpoints built once per session (seeded, offline)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from loaders.pico import PicoSpec, make_pico_base, make_pico_post


@dataclass(frozen=True)
class PicoFamily:
    """A base, two post-trained models of it, and the deltas between them."""

    base: Path
    post: Path
    post2: Path
    delta: Path
    delta2: Path


def build_family(root: Path, spec: PicoSpec, seed: int) -> PicoFamily:
    from deltas.extract import extract_delta

    base = make_pico_base(root / "base", spec, seed=seed)
    post = make_pico_post(base, root / "post", seed=seed + 1)
    post2 = make_pico_post(base, root / "post2", seed=seed + 2, chat_template=None)
    extract_delta(base, post, root / "delta.safetensors")
    extract_delta(base, post2, root / "delta2.safetensors")
    return PicoFamily(base, post, post2, root / "delta.safetensors", root / "delta2.safetensors")


@pytest.fixture(scope="session")
def tied(tmp_path_factory) -> PicoFamily:
    """bf16 Llama with tied input/output embeddings (the DESIGN.md pitfall)."""
    return build_family(tmp_path_factory.mktemp("tied"), PicoSpec(tie_word_embeddings=True), seed=0)


@pytest.fixture(scope="session")
def untied(tmp_path_factory) -> PicoFamily:
    """fp32 Llama with a separate lm_head."""
    spec = PicoSpec(tie_word_embeddings=False, dtype="float32")
    return build_family(tmp_path_factory.mktemp("untied"), spec, seed=10)


@pytest.fixture(scope="session")
def tied_updated(tied, tmp_path_factory) -> Path:
    """θ′ for `tied`: its base moved by a small seeded update, as continued pre-training would."""
    return make_pico_post(tied.base, tmp_path_factory.mktemp("tied-updated") / "base", seed=50, scale=0.1,
                          chat_template=None)  # fmt: skip
