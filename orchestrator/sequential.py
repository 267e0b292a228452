"""Group-sequential decisions over seeds: Lan-DeMets alpha spending with O'Brien-Fleming-type
boundaries, applied to the paired t statistic after every round of seeds.

Why not re-run the fixed-n t-test after each round: with looks after 2, 4, 6, ... seeds a 5%
test rejects a true null far more often than 5% of the time (every look is another chance).
A group-sequential design splits alpha over the looks instead. Lan & DeMets (1983) spend it as
a function of the information fraction t = seeds so far / maximum seeds; the O'Brien-Fleming
type spending function ``alpha(t) = 2 - 2 * Phi(z_{1-alpha/2} / sqrt(t))`` spends almost
nothing early and keeps the final look close to the fixed-n test. Looks may fall anywhere
(unequal rounds, an interrupted sweep): the boundaries follow the looks actually made, and the
look at the maximum spends what is left.

The boundaries are on the paired t statistic itself: ``c_k`` solves ``P(|T_j| < c_j for j < k,
|T_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})`` under the null, computed by Monte Carlo of the
t statistics' exact joint law for normal differences (T is pivotal: the unknown sd drops out).
Mapping each look's t to the z scale through its p-value and using the Brownian-motion
boundaries (the "significance level approach", Jennison & Turnbull 2000, sec. 11.4) is the
textbook shortcut, but with 2-10 seeds it rejected a true null 5.5-5.7% of the time at alpha
5% in our simulation: the estimated variance makes the looks less correlated than the z
theory assumes. Decisions at each look use the repeated confidence interval (Jennison &
Turnbull 1989), ``diff ± c_k * se``, which covers the true difference at every look at once
with probability 1 - alpha:

- it excludes 0 on the claimed side: VALIDATED; on the other side: INVALIDATED (significant
  against the claim); it lies inside [-margin, +margin]: INVALIDATED (no effect worth the name);
- otherwise the claim goes on to the next round, and at the maximum it is INCONCLUSIVE.

Several claims of one study share alpha by a sequential Holm procedure (Maurer & Bretz 2013,
"Multiple testing in group sequential trials using graphical approaches"): each open claim is
tested at alpha / (open claims); a claim that rejects its null passes its share on, and the
others are re-tested at the higher level at every look so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

SIM_PATHS = 200_000  # null paths per look schedule: about ±0.001 on the alpha spent at 5%
SIM_SEED = 15  # fixed: the same looks always give the same boundaries (a resumed sweep decides alike)
VALIDATED, INVALIDATED, INCONCLUSIVE, OPEN = "VALIDATED", "INVALIDATED", "INCONCLUSIVE", "OPEN"


def obf_spending(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming-type spending function (two-sided): alpha spent by time t."""
    if t <= 0:
        return 0.0
    return float(min(alpha, 2 - 2 * stats.norm.cdf(stats.norm.ppf(1 - alpha / 2) / math.sqrt(min(t, 1.0)))))


def boundaries(ns: list[int], times: list[float], alpha: float) -> list[float]:
    """Two-sided boundaries c_1..c_K on |t| for looks with ``ns`` paired values (n >= 2,
    increasing) at information fractions ``times`` (increasing, the last may be 1), spending
    ``alpha`` by the O'Brien-Fleming-type function."""
    if not ns or len(ns) != len(times) or ns[0] < 2 or any(b <= a for a, b in zip(ns, ns[1:])) \
            or times[0] <= 0 or any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"looks must grow from n >= 2 and t > 0: n {ns}, t {times}")
    return list(_boundaries(tuple(int(n) for n in ns), tuple(float(t) for t in times), float(alpha)))


def _simulated_boundaries(ns: tuple, times: tuple, alpha: float) -> tuple:
    """Monte Carlo of the t statistics' exact joint null law (normal differences; t is pivotal,
    so the sd does not matter): the boundary of look k is the |t| that the paths still inside
    every earlier boundary exceed with probability alpha(t_k) - alpha(t_{k-1})."""
    rng = np.random.default_rng(SIM_SEED)
    total = np.zeros(SIM_PATHS)
    squares = np.zeros(SIM_PATHS)
    alive = np.ones(SIM_PATHS, dtype=bool)
    out, seen, spent = [], 0, 0.0
    for n, t in zip(ns, times):
        block = rng.standard_normal((SIM_PATHS, n - seen))
        total += block.sum(axis=1)
        squares += (block ** 2).sum(axis=1)
        seen = n
        mean = total / n
        sd = np.sqrt(np.maximum(squares - n * mean ** 2, 0) / (n - 1))
        stat = np.abs(mean) / (sd / math.sqrt(n))
        goal = obf_spending(t, alpha) - spent
        spent += goal
        if not out:  # the first look's law is Student's t itself: no simulation error there
            c = float(stats.t.isf(goal / 2, n - 1)) if goal > 0 else math.inf
        else:
            exceed = int(round(goal * SIM_PATHS))  # how many living paths this look may stop
            inside = np.sort(stat[alive])[::-1]
            c = math.inf if exceed == 0 else float(inside[min(exceed, len(inside)) - 1])
        out.append(c)
        alive &= stat < c
    return tuple(out)


# every claim of a sweep, and every re-decision, looks at the same schedule; cached by wrapping,
# not with the decorator, which would keep mutmut from mutating the simulation (bench/mutation.py)
_boundaries = lru_cache(maxsize=256)(_simulated_boundaries)


@dataclass(frozen=True)
class Look:
    """One look at a claim: n paired values, their mean difference (claimed sign not applied)
    and standard error; ``seeds`` the seeds run so far (what the information fraction counts)."""

    seeds: int
    n: int
    diff: float
    se: float | None  # None: n < 2


@dataclass(frozen=True)
class Decision:
    status: str  # VALIDATED | INVALIDATED | INCONCLUSIVE | OPEN
    look: int | None  # 1-based look at which it was decided
    reason: str
    interval: tuple[float, float] | None = None  # the repeated CI at the deciding (or last) look
    level: float | None = None
    rejects_null: bool = False  # decided by crossing a boundary (not by the margin)


def look_of(a, b, seeds: int) -> Look:
    """A look from paired values (b None: a threshold claim's values minus the threshold)."""
    d = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    d = d[~np.isnan(d)]
    n = len(d)
    if n == 0:
        return Look(seeds, 0, math.nan, None)
    se = float(np.std(d, ddof=1) / math.sqrt(n)) if n > 1 else None
    return Look(seeds, n, float(d.mean()), se)


def repeated_interval(look: Look, c: float) -> tuple[float, float]:
    """diff ± c * se: the look's repeated confidence interval for boundary c on |t|."""
    if not math.isfinite(c):
        return (-math.inf, math.inf)
    return look.diff - c * look.se, look.diff + c * look.se


def decide(looks: list[Look], max_seeds: int, alpha: float, better: str = "higher", margin: float = 0.0) -> Decision:
    """The decision of one claim given its looks so far (in order) at level ``alpha``. Looks
    with fewer than 2 pairs spend nothing (there is no test); the first look at which the
    repeated CI decides is the one reported."""
    usable: list[tuple[int, Look]] = []  # (1-based look number, look)
    for index, lk in enumerate(looks, start=1):  # a look that added no pairs (no new seeds in its cells) is no look
        last = usable[-1][1] if usable else None
        if lk.n >= 2 and lk.se is not None and (last is None or (lk.n > last.n and lk.seeds > last.seeds)):
            usable.append((index, lk))
    if not usable:
        return Decision(OPEN if looks and looks[-1].seeds < max_seeds else INCONCLUSIVE, None,
                        "fewer than 2 paired seeds: no test")
    cs = boundaries([lk.n for _, lk in usable], [min(lk.seeds / max_seeds, 1.0) for _, lk in usable], alpha)
    sign = 1.0 if better == "higher" else -1.0
    interval = None
    for (index, lk), c in zip(usable, cs):
        interval = repeated_interval(lk, c)  # se 0 (the same difference in every seed): the point
        lo, hi = interval
        if -margin <= lo and hi <= margin:
            return Decision(INVALIDATED, index, f"repeated {1 - alpha:.3g} CI inside ±{margin:g}: no meaningful effect",
                            interval, alpha)
        if lo > 0 or hi < 0:
            claimed = (lo > 0) == (sign > 0)
            way = "in the claimed direction" if claimed else "against the claim"
            return Decision(VALIDATED if claimed else INVALIDATED, index,
                            f"crossed the O'Brien-Fleming boundary (|t| {c:.3g}) {way}", interval, alpha, True)
    done = looks[-1].seeds >= max_seeds
    return Decision(INCONCLUSIVE if done else OPEN, None,
                    f"no boundary crossed in {len(usable)} look(s){' up to the maximum' if done else ''}",
                    interval, alpha)


def decide_all(claims_looks: list[list[Look]], max_seeds: int, alpha: float, better: list[str],
               margins: list[float]) -> list[Decision]:
    """Sequential Holm over several claims (Maurer & Bretz 2013): every claim whose null is
    not yet rejected is tested at alpha / (their number); when some reject, the rest are
    decided again at the higher level (over every look so far), until nothing changes.
    Rejecting the null means VALIDATED, or INVALIDATED by significance against the claim;
    INVALIDATED by the margin is a statement about the effect's size and frees no alpha."""
    m = len(claims_looks)
    out: list[Decision | None] = [None] * m
    rejected: set[int] = set()
    while True:
        level = alpha / (m - len(rejected)) if len(rejected) < m else alpha
        newly = set()
        for i, looks in enumerate(claims_looks):
            if i in rejected:
                continue
            out[i] = decide(looks, max_seeds, level, better[i], margins[i])
            if out[i].rejects_null:
                newly.add(i)
        if not newly:
            return out
        rejected |= newly
