"""Statistics over seeds against scipy on fixed data, including n = 1, n = 2 and identical samples."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from orchestrator.stats import fmt, format_interval, format_p, holm, one_sample_test, p_is, paired_test, t_interval

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
