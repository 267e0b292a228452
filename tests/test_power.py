"""Seeds needed for 80% power: the noncentral-t formula against statsmodels' TTestPower."""

import math

import numpy as np
import pytest
from statsmodels.stats.power import TTestPower

from orchestrator.power import n_for_power, power, seeds_needed
from orchestrator.stats import holm_levels


@pytest.mark.parametrize("effect_size, alpha", [(0.3, 0.05), (0.5, 0.05), (1.0, 0.025), (1.5, 0.0125), (2.5, 0.05)])
def test_power_and_seeds_equal_statsmodels(effect_size, alpha):
    ref = TTestPower()
    for n in (3, 5, 12):
        assert power(effect_size, n, alpha) == pytest.approx(ref.power(effect_size, n, alpha, alternative="two-sided"))
    exact = ref.solve_power(effect_size=effect_size, alpha=alpha, power=0.8, alternative="two-sided")
    assert n_for_power(effect_size, alpha) == math.ceil(exact)


def test_seeds_needed_plans_for_the_margin_else_the_observed_difference():
    by_diff = seeds_needed(diff=-0.01, sd=0.02, n_now=3, alpha=0.025)
    assert by_diff.basis == "observed difference" and by_diff.effect == 0.01
    assert by_diff.n == math.ceil(TTestPower().solve_power(effect_size=0.5, alpha=0.025, power=0.8))
    assert by_diff.text() == f"{by_diff.n} ({by_diff.n - 3} more)" and not by_diff.caveat
    by_margin = seeds_needed(diff=0.001, sd=0.02, n_now=3, alpha=0.05, margin=0.04)
    assert by_margin.basis == "margin" and by_margin.n == n_for_power(2.0, 0.05)
    assert seeds_needed(diff=0.05, sd=0.01, n_now=8, alpha=0.05).text().endswith("(have them)")


def test_seeds_needed_says_why_when_it_cannot_name_a_number():
    assert "unreliable" in seeds_needed(0.01, 0.02, 2, 0.05).text()  # n = 2: the sd rests on one df
    assert "at least 2 seeds" in seeds_needed(0.01, None, 1, 0.05).reason
    assert "no difference" in seeds_needed(0.0, 0.01, 4, 0.05).reason
    assert "sd of the differences is 0" in seeds_needed(0.01, 0.0, 4, 0.05).reason
    assert "more than 10000" in seeds_needed(1e-6, 1.0, 4, 0.05).reason
    assert seeds_needed(0.01, None, 1, 0.05).n is None


def test_holm_levels_are_the_step_down_thresholds():
    # sorted 0.01, 0.02, 0.04 -> alpha/3, alpha/2, alpha/1
    assert holm_levels([0.04, 0.01, None, 0.02], 0.05) == pytest.approx([0.05, 0.05 / 3, None, 0.025])
    assert holm_levels([], 0.05) == []


def test_inconclusive_claims_carry_seeds_needed_at_their_holm_level():
    import pandas as pd

    from orchestrator.claims import Claim, Side, check_claims

    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        for lr, shift in (("0.1", 0.0), ("0.2", 0.002), ("0.3", 0.05)):
            rows.append({"run_id": f"{lr}-{seed}", "seed": str(seed), "param.lr": lr, "key": "test/m/acc",
                         "value": 0.8 + shift + rng.normal(0, 0.004)})
    frame = pd.DataFrame(rows)
    weak = Claim("lr 0.2 beats 0.1", "s", Side.of("test/m/acc", {"lr": 0.2}), Side.of("test/m/acc", {"lr": 0.1}))
    strong = Claim("lr 0.3 beats 0.1", "s", Side.of("test/m/acc", {"lr": 0.3}), Side.of("test/m/acc", {"lr": 0.1}))
    weak_result, strong_result = check_claims([weak, strong], {"s": (frame, ["lr"])})
    assert strong_result.status == "VALIDATED" and strong_result.seeds is None
    assert weak_result.status == "INCONCLUSIVE"
    t = weak_result.test
    level = 0.05  # the weak claim's p is the larger of two: Holm asks alpha / 1 of it
    assert weak_result.seeds.alpha == level and weak_result.seeds.sd == pytest.approx(t.diff / t.d_z)
    expected = math.ceil(TTestPower().solve_power(effect_size=abs(t.d_z), alpha=level, power=0.8))
    assert weak_result.seeds.n == expected and weak_result.record()["seeds_needed"] == expected


# What `python bench/mutation.py --module orchestrator/power.py` found unpinned (issue 16): the
# power target, the MAX_SEEDS edge, the sign of the effect, and every field the report prints.

def test_target_sign_and_the_max_seeds_edge():
    exact = TTestPower().solve_power(effect_size=0.5, alpha=0.05, power=0.9, alternative="two-sided")
    assert n_for_power(0.5, 0.05, target=0.9) == math.ceil(exact) == 44
    assert n_for_power(-0.5, 0.05) == n_for_power(0.5, 0.05) and n_for_power(0.0, 0.05) is None
    assert n_for_power(5.0, 0.05) == 3 == math.ceil(TTestPower().solve_power(5.0, alpha=0.05, power=0.8))  # 2.48
    # effect sizes whose 80% power needs exactly MAX_SEEDS = 10000 pairs, and one pair more
    assert n_for_power(0.0280186, 0.05) == 10000 == math.ceil(TTestPower().solve_power(0.0280186, alpha=0.05, power=0.8))
    assert n_for_power(0.0280180, 0.05) is None


def test_seeds_needed_fields_and_text():
    s = seeds_needed(diff=-0.01, sd=0.02, n_now=2, alpha=0.025, target=0.9)
    n = math.ceil(TTestPower().solve_power(effect_size=0.5, alpha=0.025, power=0.9))
    assert s.record() == {"seeds_needed": n, "effect": 0.01, "basis": "observed difference", "alpha": 0.025,
                          "sd": 0.02, "n_now": 2, "reason": "",
                          "caveat": "sd from only 2 seeds: the estimate itself is unreliable"}
    assert s.text() == f"{n} ({n - 2} more); sd from only 2 seeds: the estimate itself is unreliable"
    enough = seeds_needed(diff=0.05, sd=0.01, n_now=20, alpha=0.05)
    assert enough.text() == f"{enough.n} (have them)" and enough.n < 20 and enough.caveat == ""
    exact = seeds_needed(diff=0.05, sd=0.01, n_now=enough.n, alpha=0.05)
    assert exact.text() == f"{enough.n} (have them)"
    none = seeds_needed(diff=0.01, sd=math.nan, n_now=3, alpha=0.05, margin=-1.0)
    assert none.text() == "n/a (n=3: no sd of the differences yet, run at least 2 seeds)"
    assert (none.basis, none.effect, none.caveat, none.n) == ("observed difference", 0.01, "", None)
    nan_diff = seeds_needed(diff=math.nan, sd=0.01, n_now=3, alpha=0.05)
    assert nan_diff.effect is None and nan_diff.reason == "no difference to plan for (observed 0, no margin)"
    assert seeds_needed(0.01, 0.0, 4, 0.05).reason == "sd of the differences is 0: every seed agrees, more seeds add nothing"
    assert seeds_needed(1e-6, 1.0, 4, 0.05).reason == "more than 10000 seeds (effect 1e-06 vs sd 1)"
    assert seeds_needed(0.01, 0.02, 2, 0.05).n == n_for_power(0.5, 0.05)  # n_now = 2 is enough for an sd


def test_for_test_reads_diff_sd_and_n_from_the_paired_test():
    from orchestrator.power import for_test
    from orchestrator.stats import paired_test

    t = paired_test([0.91, 0.93, 0.90, 0.94], [0.90, 0.90, 0.91, 0.90])
    s = for_test(t, 0.05, margin=0.0)
    assert (s.n_now, s.sd, s.effect) == (4, t.sd, abs(t.diff)) and s.n == n_for_power(t.diff / t.sd, 0.05)
    assert for_test(t, 0.05, margin=0.02).effect == 0.02 and for_test(t, 0.01).alpha == 0.01
    empty = for_test(None, 0.05)
    assert empty.n is None and empty.n_now == 0 and empty.reason.startswith("n=0:")
    assert (empty.alpha, empty.basis, for_test(None, 0.01, margin=0.02).effect) == (0.05, "observed difference", 0.02)
    assert for_test(None, 0.01, margin=0.02).alpha == 0.01 and for_test(None, 0.01, margin=0.02).basis == "margin"


def test_no_number_without_two_seeds_and_an_sd():
    assert seeds_needed(0.01, 0.02, 1, 0.05).n is None  # an sd handed in with one seed is not one to plan on
    assert seeds_needed(0.01, None, 3, 0.05).reason == "n=3: no sd of the differences yet, run at least 2 seeds"
    zero = seeds_needed(0.01, 0.0, 4, 0.05)
    assert (zero.alpha, zero.sd, zero.effect, zero.n_now) == (0.05, 0.0, 0.01, 4)
