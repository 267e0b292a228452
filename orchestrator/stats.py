"""Statistics over seeds (scipy.stats): Student-t intervals, paired tests, Holm correction.

Every function returns plain numbers or ``None`` where a quantity is undefined (n < 2, all
differences zero); ``None`` is what the report prints as "n/a (reason)". Nothing here returns
NaN: a NaN in a table would read as a number.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

# scipy.stats is imported where it is used: this module is imported (through claims) to validate a
# family YAML before anything starts, and scipy.stats' import is 0.6 s of every sweep's start on
# the 2-core VM; the sweep's warmup imports it beside ray.init instead (orchestrator/warmup.py).

CONFIDENCE = 0.95


def _clean(values) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None], dtype=float)
    return x[~np.isnan(x)]


def _constant(x: np.ndarray) -> bool:
    """All values equal up to float rounding (scipy's variance of such data is noise, not zero)."""
    return len(x) > 0 and float(np.ptp(x)) <= 1e-12 * max(1.0, float(np.max(np.abs(x))))


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(mean, half-width, n) of a two-sided Student-t interval. The half-width is NaN for n < 2
    (no interval exists) and 0 when every value is identical; the mean is NaN for n = 0."""
    x = _clean(values)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, n
    if _constant(x):
        return mean, 0.0, n
    from scipy import stats

    sem = float(stats.sem(x))
    return mean, float(sem * stats.t.ppf((1 + confidence) / 2, n - 1)), n


def decimals(value: float) -> int:
    """Decimals that keep about four significant digits for values near 1 and below."""
    size = abs(value)
    return 1 if size >= 100 else 2 if size >= 10 else 3 if size >= 1 else 4


def fmt(value: float | None, digits: int | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    d = decimals(value) if digits is None else digits
    return f"{value:+.{d}f}" if signed else f"{value:.{d}f}"


def format_interval(mean: float, half: float, n: int, digits: int | None = None) -> str:
    """``0.9153 ± 0.0021 (n=3)``; a single run says so (``0.9153 (n=1, no interval)``) instead of
    pretending to an interval; no data at all is ``—``."""
    if n == 0 or math.isnan(mean):
        return "—"
    d = decimals(mean) if digits is None else digits
    if math.isnan(half):
        return f"{mean:.{d}f} (n={n}, no interval)"
    return f"{mean:.{d}f} ± {half:.{d}f} (n={n})"


def format_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


def p_is(p: float | None) -> str:
    """``p = 0.0312`` or ``p < 0.0001`` (for running text)."""
    text = format_p(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


@dataclass
class Paired:
    """A paired comparison of A and B over the same seeds (differences d = A - B).

    ``p_t``: paired t-test; ``p_wilcoxon``: Wilcoxon signed-rank (exact for small n); both
    two-sided and uncorrected (see :func:`holm`). ``d_z``: Cohen's d of the differences
    (mean / sd). ``p_a_gt_b``: fraction of seeds with A > B, ties counting one half.
    ``note`` says why a quantity is n/a; ``sd`` is the sd of the differences (n >= 2)."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    diff_half: float | None
    p_t: float | None
    p_wilcoxon: float | None
    d_z: float | None
    p_a_gt_b: float | None
    note: str = ""
    sd: float | None = None

    @property
    def diff_ci(self) -> tuple[float, float] | None:
        if self.diff_half is None:
            return None
        return self.diff - self.diff_half, self.diff + self.diff_half


def paired_test(a, b, confidence: float = CONFIDENCE) -> Paired:
    """Compare two equally long sequences of per-seed values (pairs with a NaN are dropped)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape} vs {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    d = a - b
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, None, None, None, None, None, "no paired seeds")
    mean_a, mean_b, diff = float(a.mean()), float(b.mean()), float(d.mean())
    p_gt = float((np.sum(d > 0) + 0.5 * np.sum(d == 0)) / n)
    if n < 2:
        return Paired(n, mean_a, mean_b, diff, None, None, None, None, p_gt, "n=1: no test")
    _, half, _ = t_interval(d, confidence)
    if _constant(d):
        if diff == 0:
            return Paired(n, mean_a, mean_b, 0.0, 0.0, None, None, None, p_gt, "identical in every seed", 0.0)
        # every seed shows the same non-zero difference: scipy's t is infinite, its p-value 0
        p_w = _wilcoxon(d)
        return Paired(n, mean_a, mean_b, diff, 0.0, 0.0, p_w, None, p_gt, "same difference in every seed (sd = 0)", 0.0)
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_t = float(stats.ttest_rel(a, b).pvalue)
    sd = float(np.std(d, ddof=1))
    return Paired(n, mean_a, mean_b, diff, half, p_t, _wilcoxon(d), diff / sd, p_gt, sd=sd)


def _wilcoxon(d: np.ndarray) -> float | None:
    if not np.any(d != 0):
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.wilcoxon(d).pvalue)
    return None if math.isnan(p) else p


def one_sample_test(values, threshold: float, confidence: float = CONFIDENCE) -> Paired:
    """Values against a fixed threshold: a paired test of the values with a constant sample
    (``mean_b`` = threshold, d = value - threshold)."""
    x = _clean(values)
    return paired_test(x, np.full(len(x), float(threshold)), confidence)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); ``None`` entries
    (no test) stay ``None`` and do not count towards the number of tests."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def holm_levels(pvalues: list[float | None], alpha: float) -> list[float | None]:
    """The raw-p threshold Holm's step-down puts on each test: ``alpha / (m - rank)`` for the
    test at 0-based ``rank`` in ascending order of p (m tests; ``None`` entries stay ``None``).
    It is the level a test must reach in its own place of the order, whatever the tests ranked
    before it do; what :func:`orchestrator.power.seeds_needed` plans for."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    for rank, (_, i) in enumerate(tested):
        out[i] = alpha / (len(tested) - rank)
    return out


def wilcoxon_can_decide(n: int, alpha: float = 0.05) -> bool:
    """Whether a two-sided exact Wilcoxon signed-rank test over ``n`` non-zero paired
    differences can reach p < alpha: its smallest p (every difference one sign) is 2 / 2^n,
    0.25 at n = 3 and 0.0625 at n = 5, so it needs n >= 6 at alpha 0.05."""
    return n > 0 and 2.0 ** (1 - n) < alpha
