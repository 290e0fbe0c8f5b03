"""The demo models `make serve` uses until a real model is cached: a pico base and a delta."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deltas import extract_delta
from loaders.pico import PicoSpec, make_pico_base, make_pico_post


@dataclass(frozen=True)
class DemoModels:
    base: Path
    delta: Path


def prepare_demo(root: Path, log=print) -> DemoModels:
    """Generate (once, cached under `root`) a pico base, a post model and their delta."""
    base, post, delta = root / "pico-base", root / "pico-post", root / "pico-delta.safetensors"
    if not (base / "model.safetensors").is_file():
        log(f"generating demo base model in {base}")
        make_pico_base(base, PicoSpec(), seed=0)
    if not delta.is_file():
        log(f"generating demo post-trained model in {post} and extracting its delta")
        make_pico_post(base, post, seed=1)
        extract_delta(base, post, delta)
    return DemoModels(base, delta)
