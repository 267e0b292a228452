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

from orchestrator.sequential import (INCONCLUSIVE, INVALIDATED, OPEN, SIM_PATHS, VALIDATED, _boundaries, boundaries,
                                     decide, decide_all, look_of, obf_spending)

ALPHA, START, BATCH, MAX = 0.05, 2, 2, 10
SEQUENCES = 2000


@pytest.fixture(autouse=True)
def fresh_boundaries():
    """Each test computes the boundaries it reads: the cache would otherwise answer with what an
    earlier test computed (under mutmut, its unmutated pass in the parent of every mutant's
    fork: all 101 mutants of the simulation survived, `rng = None` included)."""
    _boundaries.cache_clear()


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


def test_boundaries_are_reproducible_and_a_look_with_almost_nothing_to_spend_cannot_stop():
    """The same looks give the same boundaries in every process (a resumed sweep decides as the
    interrupted one would have), and a look whose share of alpha is under half a simulated path
    (O'Brien-Fleming spends ~1e-20 at t = 0.1) gets no finite boundary rather than the smallest
    |t| still inside."""
    first = boundaries([2, 4, 6], [0.3, 0.6, 1.0], ALPHA)
    _boundaries.cache_clear()
    assert boundaries([2, 4, 6], [0.3, 0.6, 1.0], ALPHA) == first
    assert obf_spending(0.1, ALPHA) * SIM_PATHS < 0.5
    assert boundaries([2, 3, 10], [0.05, 0.1, 1.0], ALPHA)[:2] == [math.inf, math.inf]


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


# What `python bench/mutation.py --module orchestrator/sequential.py` found unpinned (issue 16):
# the fields of every Look and Decision, which looks count, the validation of a look schedule and
# the spending function's edges.

def test_look_of_pairs_drops_missing_and_has_scipys_standard_error():
    from orchestrator.sequential import repeated_interval

    a, b = [0.91, None, 0.88, 0.93, math.nan], [0.90, 0.80, 0.85, None, 0.70]
    look = look_of(a, b, 5)
    d = [0.91 - 0.90, 0.88 - 0.85]
    assert (look.seeds, look.n) == (5, 2) and look.diff == pytest.approx(np.mean(d))
    assert look.se == pytest.approx(stats.sem(d))  # n = 2 has a standard error
    three = look_of([0.3, 0.5, 0.9], None, 3)
    assert three.se == pytest.approx(stats.sem([0.3, 0.5, 0.9])) and three.diff == pytest.approx(1.7 / 3)
    one = look_of([0.4], [0.1], 1)
    assert (one.n, one.se) == (1, None) and one.diff == pytest.approx(0.3)
    empty = look_of([math.nan], None, 3)
    assert (empty.seeds, empty.n, empty.se) == (3, 0, None) and math.isnan(empty.diff)
    assert repeated_interval(three, math.inf) == (-math.inf, math.inf)
    assert repeated_interval(three, 2.0) == pytest.approx((three.diff - 2 * three.se, three.diff + 2 * three.se))


def test_spending_edges_and_schedule_validation():
    assert obf_spending(0.0, ALPHA) == 0.0 and obf_spending(-0.5, ALPHA) == 0.0
    assert obf_spending(1.0, ALPHA) == pytest.approx(ALPHA) and obf_spending(1.5, ALPHA) == pytest.approx(ALPHA)
    assert obf_spending(0.5, ALPHA) == pytest.approx(2 - 2 * stats.norm.cdf(stats.norm.ppf(0.975) / math.sqrt(0.5)))
    for ns, times in (([], []), ([2, 4], [1.0]), ([1, 4], [0.5, 1.0]), ([2, 4], [0.0, 1.0]), ([2, 4], [0.5, 0.5]),
                      ([2, 4, 6], [0.2, 0.5, 0.4]), ([2, 4, 3], [0.2, 0.4, 0.6])):
        with pytest.raises(ValueError, match="looks must grow from n >= 2 and t > 0"):
            boundaries(ns, times, ALPHA)


def test_decision_fields_look_numbers_and_reasons():
    tight = look_of([1.0, 1.000001], None, 2)  # t = 2e6 (the first boundary is ~5e4): decided at the first look, with only 2 pairs
    first = decide([tight], MAX, ALPHA)
    assert (first.status, first.look, first.level, first.rejects_null) == (VALIDATED, 1, ALPHA, True)
    c = boundaries([2], [0.2], ALPHA)[0]
    assert first.interval == pytest.approx((tight.diff - c * tight.se, tight.diff + c * tight.se))
    assert first.reason == f"crossed the O'Brien-Fleming boundary (|t| {c:.3g}) in the claimed direction"
    lower = decide([tight], MAX, ALPHA, better="lower")  # the same data against a lower-is-better claim
    assert (lower.status, lower.rejects_null) == (INVALIDATED, True) and lower.reason.endswith("against the claim")
    assert decide([look_of([-1.0, -1.000001], None, 2)], MAX, ALPHA, better="lower").status == VALIDATED
    # a look without new pairs or without new seeds is no look: the decision comes at look 3
    weak = look_of([0.1, -0.1, 0.05, 0.02], None, 4)
    looks = [weak, look_of([0.1, -0.1, 0.05, 0.02], None, 6), look_of([0.1, -0.1, 0.05, 0.02, 1.0], None, 4), tight]
    looks[-1] = look_of([1.0, 1.000001, 1.0, 1.000001, 1.0, 1.000001], None, 8)
    later = decide(looks, MAX, ALPHA)
    assert (later.status, later.look) == (VALIDATED, 4)
    still = decide(looks[:3], MAX, ALPHA)
    assert (still.status, still.look, still.level) == (OPEN, None, ALPHA) and still.interval is not None
    assert still.reason == "no boundary crossed in 1 look(s)"
    end = decide([weak, look_of([0.1, -0.1, 0.05, 0.02, 0.0, 0.01], None, MAX)], MAX, ALPHA)
    assert (end.status, end.reason) == (INCONCLUSIVE, "no boundary crossed in 2 look(s) up to the maximum")
    few = decide([look_of([0.1], None, MAX)], MAX, ALPHA)  # at the maximum with one pair: nothing more to run
    assert (few.status, few.look, few.reason) == (INCONCLUSIVE, None, "fewer than 2 paired seeds: no test")
    assert decide([look_of([0.1], None, MAX - 1)], MAX, ALPHA).status == OPEN


def test_margin_edges_are_inside_and_decide_all_passes_margins_on():
    for value in (0.5, -0.5):  # the same difference in every seed (se 0): the interval is the point
        looks = [look_of([value] * 3, None, 3)]
        d = decide(looks, MAX, ALPHA, margin=0.5)
        assert (d.status, d.look, d.level, d.rejects_null) == (INVALIDATED, 1, ALPHA, False)
        assert d.reason == "repeated 0.95 CI inside ±0.5: no meaningful effect"
    looks = [look_of(np.random.default_rng(3).normal(0.0, 0.001, n), None, n) for n in (4, 6)]
    shared = decide_all([looks], MAX, ALPHA, ["higher"], [0.01])
    assert shared[0].status == INVALIDATED and not shared[0].rejects_null
