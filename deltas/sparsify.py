"""Which delta entries to keep: by score (top-k) or by seeded coin flip (DARE).

Shared by the `sparse`/`dare` codecs and the `ties`/`dare_*` merge methods, so a
compressed artifact and a merged variant select the same way.
"""

from __future__ import annotations

import zlib

import torch


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the round(density·n) largest scores (at least one if density > 0)."""
    n = scores.numel()
    k = min(n, max(1, round(density * n))) if density > 0 else 0
    mask = torch.zeros(n, dtype=torch.bool)
    if k:
        mask[torch.topk(scores.reshape(-1).float(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def random_mask(shape: torch.Size | list[int], density: float, seed: int, salt: str) -> torch.Tensor:
    """Bernoulli(density) keep-mask, reproducible from (seed, salt) on any machine's CPU."""
    generator = torch.Generator().manual_seed(stable_seed(seed, salt))
    return torch.rand(list(shape), generator=generator) < density


def stable_seed(seed: int, salt: str) -> int:
    """A per-tensor seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(salt.encode())) % (2**63)
