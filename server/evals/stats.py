"""Intervals: Wilson for a pass rate, paired normal for a difference of pass rates on the same items,
and a seeded bootstrap over items for ratio metrics (perplexity, token agreement, KL)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


def wilson(passed: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a pass rate (well-behaved at 0% and 100%)."""
    if n == 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: list[bool], b: list[bool]) -> tuple[float, float, float]:
    """Mean of b − a over the same items and its 95% interval (normal approximation, paired)."""
    if len(a) != len(b) or not a:
        raise ValueError("a paired difference needs the same, non-empty items on both sides")
    d = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    n, mean = len(d), sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class RatioMetric:
    """A corpus-level metric: Σ numerator / Σ denominator over items' scores (exp'd for perplexity)."""

    name: str
    numerator: str
    denominator: str
    exp: bool = False
    lower_is_better: bool = False  # perplexity, KL: a gate or a search minimises them

    def of(self, num: np.ndarray, den: np.ndarray) -> np.ndarray:
        """The metric of each row of resampled item scores (or of one 1-D set)."""
        ratio = num.sum(-1) / np.maximum(den.sum(-1), 1e-12)
        return np.exp(ratio) if self.exp else ratio


def bootstrap(metric: RatioMetric, a: list[dict], b: list[dict] | None = None, seed: int = 0):
    """The metric on items `a` with its 95% percentile interval; with `b` (the same items, paired),
    the difference metric(b) − metric(a) and its interval, resampling the same items on both sides."""
    rng = np.random.default_rng(seed)
    n = len(a)
    if n == 0:
        return 0.0, (0.0, 0.0)
    idx = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))

    def arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.array([r[metric.numerator] for r in rows], dtype=float),
            np.array([r[metric.denominator] for r in rows], dtype=float),
        )

    num_a, den_a = arrays(a)
    value, samples = metric.of(num_a, den_a), metric.of(num_a[idx], den_a[idx])
    if b is not None:
        num_b, den_b = arrays(b)
        value = metric.of(num_b, den_b) - value
        samples = metric.of(num_b[idx], den_b[idx]) - samples
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(value), (float(lo), float(hi))
