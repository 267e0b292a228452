"""Statistics over seeds: Student-t confidence intervals (scipy.stats)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width, n) of a two-sided Student-t interval; half-width is NaN for n < 2
    and 0 when every value is identical."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    sem = float(stats.sem(x))
    if sem == 0:
        return mean, 0.0, n
    return mean, float(sem * stats.t.ppf((1 + confidence) / 2, n - 1)), n


def format_interval(mean: float, half: float, n: int, digits: int = 4) -> str:
    """``0.9153 ± 0.0021 (n=3)``; a single run says so instead of pretending to an interval."""
    if n == 0 or math.isnan(mean):
        return "—"
    if math.isnan(half):
        return f"{mean:.{digits}f} (n={n})"
    return f"{mean:.{digits}f} ± {half:.{digits}f} (n={n})"
