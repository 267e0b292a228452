"""The group-sequential rule over seeds, by simulation (numpy, no Ray).

Under no effect, the chance of a wrong verdict (VALIDATED, or INVALIDATED as significant
against the claim) over every look must stay at alpha; the same data re-tested with the
fixed-n t-test after each round must not (that is what the rule is for). A large effect must
stop in the first rounds.
"""

import math

import numpy as np
import pytest
from scipy import stats

from orchestrator.sequential import (INCONCLUSIVE, INVALIDATED, OPEN, VALIDATED, boundaries, decide, decide_all,
                                     look_of, obf_spending)

ALPHA, START, BATCH, MAX = 0.05, 2, 2, 10
SEQUENCES = 2000


def run_until_decided(d: np.ndarray) -> tuple[str, int]:
    """The --until-decided loop on one sequence of paired differences: look, decide, add seeds."""
    looks, seeds = [], START
    while True:
        looks.append(look_of(d[:seeds], None, seeds))
        decision = decide(looks, MAX, ALPHA)
        if decision.status != OPEN:
            return decision.status, seeds
        seeds = min(seeds + BATCH, MAX)


def naive_wrong(data: np.ndarray) -> int:
    """What the rule replaces: the fixed-n paired t-test after every round, stopping at p < alpha;
    the number of sequences it ever declares significant."""
    ever = np.zeros(len(data), dtype=bool)
    for seeds in range(START, MAX + 1, BATCH):
        ever |= stats.ttest_1samp(data[:, :seeds], 0.0, axis=1).pvalue < ALPHA
    return int(ever.sum())


def not_above(wrong: int, alpha: float) -> bool:
    """The count is consistent with a true rate <= alpha (one-sided binomial test at 1%)."""
    return stats.binomtest(wrong, SEQUENCES, alpha, alternative="greater").pvalue > 0.01


def test_wrong_verdicts_under_no_effect_stay_at_alpha_and_naive_retesting_exceeds_it():
    data = np.random.default_rng(2024).standard_normal((SEQUENCES, MAX)) * 0.03  # sd does not matter
    outcomes = [run_until_decided(d) for d in data]
    wrong = sum(status in (VALIDATED, INVALIDATED) for status, _ in outcomes)
    assert not_above(wrong, ALPHA), f"{wrong}/{SEQUENCES} wrong verdicts"
    assert wrong / SEQUENCES <= ALPHA + 0.01
    assert sum(n == MAX for _, n in outcomes) >= 0.9 * SEQUENCES  # no effect: almost all run to the maximum
    naive = naive_wrong(data)
    assert not not_above(naive, ALPHA), f"naive re-testing: {naive}/{SEQUENCES}"  # the check can fail


def test_a_large_effect_stops_in_the_first_rounds():
    data = np.random.default_rng(7).normal(3.0, 1.0, (SEQUENCES, MAX))  # d_z = 3
    outcomes = [run_until_decided(d) for d in data]
    assert all(status == VALIDATED for status, _ in outcomes)
    used = np.array([n for _, n in outcomes])
    assert np.mean(used <= START + 2 * BATCH) >= 0.95  # by the third look of five
    assert used.mean() < MAX * 0.65


def test_boundaries_spend_alpha_as_the_spending_function_says():
    ns, times = [2, 4, 6, 8, 10], [0.2, 0.4, 0.6, 0.8, 1.0]
    cs = boundaries(ns, times, ALPHA)
    assert cs[0] == pytest.approx(stats.t.isf(obf_spending(0.2, ALPHA) / 2, 1))  # first look: Student's t exactly
    assert boundaries([6], [1.0], ALPHA)[0] == pytest.approx(stats.t.ppf(0.975, 5))  # one look = the fixed-n test
    assert all(a > b for a, b in zip(cs[1:], cs[2:]))  # O'Brien-Fleming: strict early, near fixed-n at the end
    # an independent simulation of t paths crosses each boundary first at the spent rate
    x = np.random.default_rng(99).standard_normal((400_000, 10))
    first_cross = np.full(len(x), -1)
    for k, (n, c) in enumerate(zip(ns, cs)):
        t = np.abs(stats.ttest_1samp(x[:, :n], 0.0, axis=1).statistic)
        first_cross[(first_cross < 0) & (t >= c)] = k
    spent = np.diff([0.0] + [obf_spending(t, ALPHA) for t in times])
    observed = [np.mean(first_cross == k) for k in range(5)]
    assert observed == pytest.approx(list(spent), abs=0.0015)
    with pytest.raises(ValueError):
        boundaries([4, 4], [0.5, 1.0], ALPHA)


def test_margin_decides_no_effect_and_frees_no_alpha():
    d = np.random.default_rng(3).normal(0.0, 0.001, MAX)
    looks = [look_of(d[:n], None, n) for n in (2, 4, 6)]
    decision = decide(looks, MAX, ALPHA, margin=0.01)
    assert decision.status == INVALIDATED and not decision.rejects_null and "inside ±0.01" in decision.reason
    assert -0.01 <= decision.interval[0] and decision.interval[1] <= 0.01
    assert decide(looks, MAX, ALPHA).status == OPEN  # without a margin nothing is decided yet
    assert decide([look_of(d[:1], None, 1)], MAX, ALPHA).status == OPEN  # n = 1: no test, more seeds


def test_sequential_holm_passes_alpha_on():
    rng = np.random.default_rng(5)
    strong_d = rng.normal(2.0, 1.0, 10)
    strong = [look_of(strong_d[:n], None, n) for n in (4, 10)]
    weak_d = rng.normal(0.0, 1.0, 10)
    weak_d += 2.5 * weak_d.std(ddof=1) / math.sqrt(10) - weak_d.mean()  # t = 2.5 at the last look
    weak = [look_of(weak_d[:n], None, n) for n in (4, 10)]
    final = {level: boundaries([4, 10], [0.4, 1.0], level)[1] for level in (ALPHA, ALPHA / 2)}
    assert final[ALPHA] < 2.5 < final[ALPHA / 2]
    assert decide(weak, MAX, ALPHA).status == VALIDATED and decide(weak, MAX, ALPHA / 2).status == INCONCLUSIVE
    both = decide_all([strong, weak], MAX, ALPHA, ["higher", "higher"], [0.0, 0.0])
    assert both[0].status == VALIDATED and both[0].level == ALPHA / 2
    assert both[1].status == VALIDATED and both[1].level == ALPHA  # the strong claim's share passed on
    null = [look_of(rng.normal(0.0, 1.0, n), None, n) for n in (4, 10)]
    shared = decide_all([null, weak], MAX, ALPHA, ["higher", "higher"], [0.0, 0.0])
    assert shared[0].status == INCONCLUSIVE
    assert shared[1].status == INCONCLUSIVE and shared[1].level == ALPHA / 2  # nothing rejected: no share passed on
