"""Intervals for pass rates: Wilson for one variant, paired normal for a difference on the same items."""

from __future__ import annotations

import math

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
