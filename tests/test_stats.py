"""Statistics over seeds against scipy on fixed data, including n = 1, n = 2 and identical samples."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from orchestrator.stats import (fmt, format_interval, format_p, holm, holm_levels, one_sample_test, p_is, paired_test,
                                t_interval)

A = [0.912, 0.918, 0.905, 0.921, 0.915]
B = [0.909, 0.910, 0.907, 0.915, 0.908]


def test_t_interval_equals_scipy():
    mean, half, n = t_interval(A)
    lo, hi = stats.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=stats.sem(A))
    assert n == 5 and mean == pytest.approx(np.mean(A)) and half == pytest.approx((hi - lo) / 2)
    mean, half, n = t_interval([0.5, 0.7])  # n = 2: t(0.975, 1) = 12.71
    assert half == pytest.approx(12.7062047 * 0.1) and n == 2
    assert t_interval([0.3, None, float("nan"), 0.5])[2] == 2


def test_degenerate_intervals_never_print_nan():
    assert t_interval([0.8, 0.8, 0.8]) == (pytest.approx(0.8), 0.0, 3)
    assert format_interval(*t_interval([0.8, 0.8, 0.8])) == "0.8000 ± 0.0000 (n=3)"
    assert format_interval(*t_interval([0.8])) == "0.8000 (n=1, no interval)"
    assert format_interval(*t_interval([])) == "—"
    assert format_interval(123.456, 1.2, 3) == "123.5 ± 1.2 (n=3)"
    assert fmt(None) == fmt(float("nan")) == "n/a"
    assert format_p(None) == "n/a" and format_p(3e-7) == "< 0.0001" and format_p(0.03125) == "0.0312"
    assert p_is(0.03) == "p = 0.0300" and p_is(1e-9) == "p < 0.0001"


def test_paired_test_equals_scipy():
    t = paired_test(A, B)
    d = np.subtract(A, B)
    assert t.n == 5 and t.diff == pytest.approx(d.mean())
    assert t.p_t == pytest.approx(stats.ttest_rel(A, B).pvalue)
    assert t.p_wilcoxon == pytest.approx(stats.wilcoxon(d).pvalue)
    assert t.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert t.diff_ci == pytest.approx((lo, hi))
    assert t.p_a_gt_b == pytest.approx(0.8)  # A > B in 4 of 5 seeds
    assert paired_test([1, 2, 3], [1, 3, 2]).p_a_gt_b == pytest.approx(0.5)  # one win, one loss, one tie


def test_paired_test_n2_identical_and_constant_differences():
    t2 = paired_test([0.6, 0.72], [0.5, 0.6])
    assert t2.p_t == pytest.approx(stats.ttest_rel([0.6, 0.72], [0.5, 0.6]).pvalue)
    assert t2.p_wilcoxon == pytest.approx(0.5) and t2.diff_half is not None
    same = paired_test([0.8, 0.9, 0.85], [0.8, 0.9, 0.85])
    assert same.p_t is None and same.p_wilcoxon is None and same.d_z is None and same.diff_ci == (0.0, 0.0)
    assert "identical" in same.note and same.p_a_gt_b == 0.5
    shift = paired_test([0.91, 0.81, 0.71], [0.90, 0.80, 0.70])  # the same +0.01 in every seed (float noise aside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the zero variance it handles
        assert shift.p_t == 0.0 == stats.ttest_rel([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]).pvalue
    assert shift.d_z is None and shift.diff_half == 0.0 and "sd = 0" in shift.note
    one = paired_test([0.9], [0.8])
    assert one.n == 1 and one.p_t is None and one.diff_ci is None and one.diff == pytest.approx(0.1)
    empty = paired_test([math.nan], [0.8])
    assert empty.n == 0 and empty.p_t is None
    with pytest.raises(ValueError):
        paired_test([1, 2], [1])


def test_one_sample_equals_scipy():
    x = [0.21, 0.25, 0.32, 0.19]
    t = one_sample_test(x, 1.0)
    assert t.p_t == pytest.approx(stats.ttest_1samp(x, 1.0).pvalue)
    assert t.diff == pytest.approx(np.mean(x) - 1.0) and t.mean_b == 1.0


def test_holm_by_hand():
    # sorted 0.01, 0.02, 0.03, 0.04 -> 4*0.01, 3*0.02, 2*0.03 -> max(0.06, 0.06), 1*0.04 -> max(0.06, 0.04)
    assert holm([0.03, 0.01, None, 0.04, 0.02]) == pytest.approx([0.06, 0.04, None, 0.06, 0.06])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([None]) == [None] and holm([]) == []


# Every field of the degenerate results, the display thresholds and holm_levels (the survivors of
# `python bench/mutation.py --module orchestrator/stats.py`, issue 16): a table prints these fields.

def test_paired_fields_of_every_degenerate_case():
    empty = paired_test([math.nan, 0.7], [0.8, math.nan])
    assert (empty.n, empty.note, empty.sd, empty.diff_half, empty.p_wilcoxon, empty.d_z, empty.p_a_gt_b) == (
        0, "no paired seeds", None, None, None, None, None)
    assert math.isnan(empty.mean_a) and math.isnan(empty.mean_b) and math.isnan(empty.diff)
    one = paired_test([0.9, math.nan], [0.8, 0.7])
    assert (one.mean_a, one.mean_b, one.p_a_gt_b, one.note) == (0.9, 0.8, 1.0, "n=1: no test")
    assert one.p_wilcoxon is None and one.d_z is None and one.sd is None and one.diff_half is None
    same = paired_test([0.8, 0.9, 0.85], [0.8, 0.9, 0.85])
    assert (same.mean_a, same.mean_b, same.diff, same.sd, same.note) == (
        pytest.approx(0.85), pytest.approx(0.85), 0.0, 0.0, "identical in every seed")
    a, b = [0.91, 0.81, 0.71, 0.61], [0.90, 0.80, 0.70, 0.60]
    shift = paired_test(a, b)  # the same +0.01 in every seed: Wilcoxon is still defined (all ranks positive)
    assert shift.p_wilcoxon == pytest.approx(stats.wilcoxon(np.subtract(a, b)).pvalue) == pytest.approx(0.125)
    assert (shift.mean_a, shift.mean_b, shift.diff) == (pytest.approx(np.mean(a)), pytest.approx(np.mean(b)),
                                                        pytest.approx(0.01))
    assert shift.p_a_gt_b == 1.0 and shift.sd == 0.0 and shift.note == "same difference in every seed (sd = 0)"
    lose = paired_test(b, a)
    assert lose.p_a_gt_b == 0.0 and lose.diff == pytest.approx(-0.01) and lose.p_t == 0.0


def test_paired_fields_of_the_regular_case():
    t = paired_test(A, B)
    d = np.subtract(A, B)
    assert (t.mean_a, t.mean_b) == (pytest.approx(np.mean(A)), pytest.approx(np.mean(B)))
    assert t.sd == pytest.approx(np.std(d, ddof=1)) and t.note == ""
    t90 = paired_test(A, B, confidence=0.9)
    lo, hi = stats.t.interval(0.9, 4, loc=d.mean(), scale=stats.sem(d))
    assert t90.diff_ci == pytest.approx((lo, hi))
    lo, hi = stats.t.interval(0.9, 4, loc=np.mean(A), scale=stats.sem(A))
    assert t_interval(A, confidence=0.9)[1] == pytest.approx((hi - lo) / 2)
    x = [0.21, 0.25, 0.32, 0.19]
    one = one_sample_test(x + [None, math.nan], 0.2, confidence=0.9)  # None and NaN are dropped, not counted
    lo, hi = stats.t.interval(0.9, 3, loc=np.mean(x) - 0.2, scale=stats.sem(x))
    assert one.n == 4 and one.diff_ci == pytest.approx((lo, hi))


def test_constant_means_equal_up_to_rounding_relative_to_the_values():
    # a spread of 1e-7 on values of 1e6 is rounding (relative 1e-13); on values near 1 it is a real spread
    assert t_interval([1e6, 1e6 + 1e-7, 1e6])[1] == 0.0
    assert t_interval([0.5, 0.5 + 1e-7, 0.5])[1] > 0
    assert t_interval([0.5, 0.5 + 1.5e-12, 0.5])[1] > 0 and t_interval([0.5, 0.5 + 5e-13, 0.5])[1] == 0.0
    assert t_interval([-1e6, -1e6 - 1e-7, -1e6])[1] == 0.0  # the scale is |x|, negatives included


def test_decimals_at_every_threshold():
    assert [fmt(v) for v in (100.0, 99.99, 10.0, 9.999, 1.0, 0.9999)] == [
        "100.0", "99.99", "10.00", "9.999", "1.000", "0.9999"]
    assert fmt(-100.0) == "-100.0" and fmt(-0.5) == "-0.5000"
    assert fmt(0.5, digits=2) == "0.50" and fmt(0.5, signed=True) == "+0.5000" and fmt(-0.5, 1, True) == "-0.5"
    assert fmt(3) == "3.000"  # an int is formatted, not mistaken for NaN
    assert fmt(math.inf) == "∞" and fmt(-math.inf) == "−∞"
    assert format_interval(0.91234, 0.0021, 3, digits=2) == "0.91 ± 0.00 (n=3)"
    assert format_interval(0.91234, math.nan, 1, digits=2) == "0.91 (n=1, no interval)"
    assert format_interval(math.nan, math.nan, 2) == "—"
    assert format_p(1e-4) == "0.0001" and format_p(0.99996) == "1.0000"


def test_holm_levels_give_statsmodels_holm_rejections():
    from statsmodels.stats.multitest import multipletests

    p = [0.03, 0.004, None, 0.012, 0.02, 0.5]
    levels = holm_levels(p, 0.05)
    assert levels == pytest.approx([0.05 / 2, 0.05 / 5, None, 0.05 / 4, 0.05 / 3, 0.05 / 1])
    tested = [(q, lv) for q, lv in zip(p, levels) if q is not None]
    order = sorted(range(len(tested)), key=lambda i: tested[i][0])
    reached, step_down = True, [False] * len(tested)
    for i in order:  # step-down: a test is rejected when it and every smaller p reach their level
        reached = reached and tested[i][0] <= tested[i][1]
        step_down[i] = reached
    assert step_down == list(multipletests([q for q, _ in tested], 0.05, method="holm")[0])
    assert holm_levels([None, None], 0.05) == [None, None] and holm_levels([], 0.05) == []


def test_paired_inputs_holm_cap_and_the_wilcoxon_of_a_constant_shift():
    t = paired_test([0.9, None, 0.8, 0.7], [0.7, 0.6, None, 0.5])  # None is a missing seed, like NaN
    assert t.n == 2 and t.mean_a == pytest.approx(0.8) and t.mean_b == pytest.approx(0.6)
    ones = paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # d = 1 in every seed
    assert ones.p_wilcoxon == pytest.approx(stats.wilcoxon([1.0, 1.0, 1.0]).pvalue) == pytest.approx(0.25)
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # 2 * 0.6 = 1.2 is capped at 1
    with pytest.raises(ValueError, match="paired samples differ in length"):
        paired_test([1, 2], [1])
    assert paired_test([0.8, 0.9, 0.85], [0.8, 0.9, 0.85]).n == 3 and paired_test([2.0, 3.0], [1.0, 2.0]).n == 2
    assert math.isnan(t_interval([None, math.nan])[0]) and t_interval([None, math.nan])[2] == 0


@pytest.mark.parametrize("n_seeds", [3, 6])
def test_claim_evidence_names_wilcoxon_only_where_it_can_reach_significance(n_seeds):
    import pandas as pd

    from orchestrator.claims import Claim, Side, check_claims

    rng = np.random.default_rng(1)
    rows = [{"run_id": f"{lr}-{seed}", "seed": str(seed), "param.lr": lr, "key": "test/m/acc",
             "value": 0.8 + (0.05 if lr == "0.2" else 0.0) + rng.normal(0, 0.004)}
            for seed in range(n_seeds) for lr in ("0.1", "0.2")]
    claim = Claim("lr 0.2 beats 0.1", "s", Side.of("test/m/acc", {"lr": 0.2}), Side.of("test/m/acc", {"lr": 0.1}))
    (result,) = check_claims([claim], {"s": (pd.DataFrame(rows), ["lr"])})
    assert ("Wilcoxon" in result.evidence) == (n_seeds >= 6)


@pytest.mark.parametrize("alpha", [0.05, 0.0625, 0.25])
def test_wilcoxon_can_decide_equals_scipys_smallest_exact_p(alpha):
    from orchestrator.stats import wilcoxon_can_decide

    for n in range(1, 10):  # the smallest p: every difference of one sign
        smallest = stats.wilcoxon(np.arange(1.0, n + 1), method="exact").pvalue
        assert wilcoxon_can_decide(n, alpha) == (smallest < alpha), (n, alpha)
    assert not wilcoxon_can_decide(0, alpha)
