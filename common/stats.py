"""Interval estimates shared by the evaluation tables and the toy probes."""

from __future__ import annotations

import math


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of ``correct`` right out of ``n`` (written out here:
    numpy has no binomial interval and scipy/statsmodels are not dependencies for one formula)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one question, got n = {n}")
    p, d = correct / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)
