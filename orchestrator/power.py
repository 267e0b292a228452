"""Seeds needed: how many paired seeds give a paired t-test the power to detect an effect.

For an INCONCLUSIVE claim (or an A/B cell without a verdict) the report asks: with the spread
the seeds showed so far, how many paired seeds would a two-sided paired t-test at the level
Holm would require need to detect the claim's margin (or, without one, the difference seen)
with 80% power? The power of the test with n pairs is the noncentral t tail mass beyond the
critical values, noncentrality ``effect / sd * sqrt(n)``, df ``n - 1`` (the same formula as
statsmodels' ``TTestPower``; tests/test_power.py holds the two to each other).

A planning number, not a promise: the sd of the differences is itself estimated from the
seeds run so far, and from 2 seeds it can be off by a factor of several (the ``caveat``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

POWER = 0.8
MAX_SEEDS = 10_000  # beyond this the answer is "not with seeds": report it as such


@dataclass(frozen=True)
class SeedsNeeded:
    """``n``: paired seeds for the power asked (None, with ``reason``, where none can be named);
    ``effect`` the difference planned for and where it came from; ``alpha`` the level."""

    n: int | None
    effect: float | None
    basis: str  # "margin" | "observed difference"
    alpha: float
    sd: float | None
    n_now: int
    reason: str = ""

    @property
    def caveat(self) -> str:
        if self.n is not None and self.n_now < 3:
            return f"sd from only {self.n_now} seeds: the estimate itself is unreliable"
        return ""

    def text(self) -> str:
        if self.n is None:
            return f"n/a ({self.reason})"
        more = max(self.n - self.n_now, 0)
        out = f"{self.n} ({more} more)" if more else f"{self.n} (have them)"
        return out + (f"; {self.caveat}" if self.caveat else "")

    def record(self) -> dict:
        return {"seeds_needed": self.n, "effect": self.effect, "basis": self.basis, "alpha": self.alpha,
                "sd": self.sd, "n_now": self.n_now, "reason": self.reason, "caveat": self.caveat}


def power(effect_size: float, n: int, alpha: float) -> float:
    """Power of a two-sided one-sample (paired) t-test with ``n`` pairs at standardised effect
    ``effect_size`` (mean / sd of the differences)."""
    from scipy import stats  # where it is used: see orchestrator/stats.py

    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = effect_size * math.sqrt(n)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


def n_for_power(effect_size: float, alpha: float, target: float = POWER) -> int | None:
    """The smallest n >= 2 whose power reaches ``target`` (None past MAX_SEEDS)."""
    effect_size = abs(effect_size)
    if effect_size == 0:
        return None
    # power rises with n: bracket by doubling, then bisect on integers
    low, high = 1, 2
    while power(effect_size, high, alpha) < target:
        low, high = high, high * 2
        if low > MAX_SEEDS:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if power(effect_size, mid, alpha) < target else (low, mid)
    return high if high <= MAX_SEEDS else None


def for_test(test, level: float, margin: float = 0.0) -> SeedsNeeded:
    """:func:`seeds_needed` from a :class:`orchestrator.stats.Paired` (None: no paired seeds)."""
    if test is None:
        return seeds_needed(None, None, 0, level, margin)
    return seeds_needed(test.diff, test.sd, test.n, level, margin)


def seeds_needed(diff: float | None, sd: float | None, n_now: int, alpha: float, margin: float = 0.0,
                 target: float = POWER) -> SeedsNeeded:
    """Paired seeds for ``target`` power to detect ``margin`` (when > 0) or else the observed
    ``diff``, given the observed sd of the paired differences and the test's level ``alpha``."""
    basis = "margin" if margin > 0 else "observed difference"
    effect = margin if margin > 0 else (None if diff is None or math.isnan(diff) else abs(diff))

    def none(reason: str) -> SeedsNeeded:
        return SeedsNeeded(None, effect, basis, alpha, sd, n_now, reason)

    if n_now < 2 or sd is None or math.isnan(sd):
        return none(f"n={n_now}: no sd of the differences yet, run at least 2 seeds")
    if effect is None or effect == 0:
        return none("no difference to plan for (observed 0, no margin)")
    if sd == 0:
        return none("sd of the differences is 0: every seed agrees, more seeds add nothing")
    n = n_for_power(effect / sd, alpha, target)
    if n is None:
        return none(f"more than {MAX_SEEDS} seeds (effect {effect:.3g} vs sd {sd:.3g})")
    return SeedsNeeded(n, effect, basis, alpha, sd, n_now)
