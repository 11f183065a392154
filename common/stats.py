"""Interval estimates shared by the evaluation tables and the toy probes."""

from __future__ import annotations

import math

import numpy as np


def wilson(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of ``correct`` right out of ``n`` (written out here:
    numpy has no binomial interval and scipy/statsmodels are not dependencies for one formula)."""
    if n <= 0:
        raise ValueError(f"an interval needs at least one question, got n = {n}")
    p, d = correct / n, 1 + z * z / n
    mid, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, mid - half), min(1.0, mid + half)


def resamples(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Question indices of ``n_boot`` bootstrap resamples of ``n`` questions, [n_boot, n]: drawn
    once and shared by every figure compared on the same questions."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def paired_interval(diff: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-question differences (the same
    questions resampled for both sides: a paired comparison)."""
    boot = diff[draws].mean(axis=1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
