"""orchestrator/claims.py on small in-memory frames shaped like report_data's (no MLflow store):
the grammar and its errors, which trials each side selects and how they pair, and the verdicts
and their evidence, every number against scipy / statsmodels / a hand computation here.
These are the module's own tests for bench/mutation.py (the report end to end is test_report.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from orchestrator.claims import (INCONCLUSIVE, INVALIDATED, VALIDATED, Claim, Side, cell_sides, check_claims,
                                 lower_is_better, paired_values, parse_claims, rows_of, same_value, validate_claims)
from orchestrator.errors import UsageError
from report_frames import holm, tidy_frame

SEEDS = range(6)
BASE = np.array([0.80, 0.82, 0.81, 0.79, 0.83, 0.80])
GAIN = np.array([0.05, 0.04, 0.06, 0.05, 0.03, 0.07])  # good = base + gain: clearly better
LOSS = np.array([0.02, 0.01, 0.03, 0.02, 0.015, 0.025])  # worse = base - loss: clearly worse
NOISE = np.array([0.01, -0.02, 0.015, -0.005, 0.0, 0.002])  # noisy = base + noise: no effect to see
BASE_ECE = np.array([0.10, 0.12, 0.11, 0.09, 0.10, 0.13])
ECE_CUT = np.array([0.02, 0.03, 0.025, 0.02, 0.035, 0.03])
PERF = np.array([0.20, 0.25, 0.30, 0.22, 0.28, 0.26])


def headline_frame(extra=None):
    return tidy_frame([(s, {"lr": 0.1}, {
        "test/base/acc": BASE[s], "test/good/acc": BASE[s] + GAIN[s], "test/worse/acc": BASE[s] - LOSS[s],
        "test/noisy/acc": BASE[s] + NOISE[s], "test/same/acc": BASE[s], "test/base/ece": BASE_ECE[s],
        "test/good/ece": BASE_ECE[s] - ECE_CUT[s], "perf/x_ms": PERF[s], **(extra or {})}) for s in SEEDS], study="h")


def compare(text, metric, baseline=None, study="h", **extra):
    spec = {"metric": metric, **({"baseline": baseline} if baseline else {}), **extra.pop("spec", {})}
    return {"claim": text, "study": study, "compare": spec, **extra}


def claims_of(*entries, doc=None):
    return parse_claims({**(doc or DOC), "claims": list(entries)}, "fam")


def p_text(p):
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"


DOC = {
    "default_study": "h",
    "defaults": {"lr": 0.1, "batch_size": 128, "noise": 0.0, "scenario": "a", "attention": True},
    "eval": {"k": [1, 5]},
    "studies": {"first": {}, "h": {}, "h20": {"eval": {"k": [20]}},
                "ab": {"grid": {"batch_size": [64, 128, 256]}}, "noise": {"grid": {"noise": [0.0, 0.3]}}},
}


# ---------------------------------------------------------------- directions, sides, matching values


@pytest.mark.parametrize("key, lower", [
    ("test/m/acc", False), ("test/m:k:5/ece", True), ("val/m/nll", True), ("test/m/brier", True),
    ("test/m/loss", True), ("test/m/macro_f1", False), ("perf/fit_ms", True), ("test/m/unknown", False)])
def test_lower_is_better_follows_the_metric_table(key, lower):
    assert lower_is_better(key) is lower


def test_side_is_hashable_sorted_and_described():
    side = Side.of("test/a/acc", {"lr": 0.1, "batch_size": 64})
    assert side.where == (("batch_size", 64), ("lr", 0.1))
    assert side == Side.of("test/a/acc", {"batch_size": 64, "lr": 0.1}) and len({side, Side.of("test/a/acc", {"batch_size": 64, "lr": 0.1})}) == 1
    assert side.filters == {"lr": 0.1, "batch_size": 64}
    assert side.describe() == "test/a/acc [batch_size=64, lr=0.1]"
    assert Side.of("test/a/acc").describe() == "test/a/acc" and Side.of("test/a/acc", None) == Side.of("test/a/acc", {})


@pytest.mark.parametrize("logged, wanted, same", [
    ("0.3", 0.3, True), ("0.30", 0.3, True), (0.3, 0.3, True), ("128", 128, True), ("128.0", 128, True),
    ("64", 128, False), ("abc", 1, False), ("True", True, True), ("true", True, True), ("False", True, False),
    ("False", False, True), ("1.0", True, False),  # a bool matches its spelling, not a number
    ("a", "a", True), ("a", "b", False), ("1", "1.0", False),  # strings compare as strings
    (None, "None", False), (math.nan, "nan", False), (math.nan, math.nan, False)])  # a param the run lacks
def test_same_value_matches_mlflow_strings_to_yaml_values(logged, wanted, same):
    assert same_value(logged, wanted) is same


def grid_frame():
    """lr 0.1 and 0.2, seeds 0-2; a and b both in every trial, with values that name their trial."""
    return tidy_frame([(s, {"lr": lr}, {"test/a/acc": 0.5 + lr + s / 100, "test/b/acc": 0.4 + lr / 2 + s / 100})
                       for lr in (0.1, 0.2) for s in range(3)])


def test_rows_of_selects_by_key_and_config_values():
    frame = grid_frame()
    assert len(rows_of(frame, Side.of("test/a/acc"))) == 6
    assert set(rows_of(frame, Side.of("test/a/acc"))["key"]) == {"test/a/acc"}
    rows = rows_of(frame, Side.of("test/a/acc", {"lr": 0.1}))
    assert sorted(rows["seed"]) == ["0", "1", "2"] and set(rows["param.lr"]) == {"0.1"}
    assert rows_of(frame, Side.of("test/a/acc", {"lr": 0.2, "seed": 1}))["value"].tolist() == pytest.approx([0.71])
    assert rows_of(frame, Side.of("test/a/acc", {"lr": 0.3})).empty
    missing = rows_of(frame, Side.of("test/a/acc", {"nokey": 1}))  # a param no run logged selects nothing
    assert missing.empty and list(missing.columns) == list(frame.columns)
    assert rows_of(frame, Side.of("test/zz/acc", {"lr": 0.1})).empty


# ---------------------------------------------------------------- pairing


def test_pairs_by_seed_and_every_swept_param_both_sides_share():
    pairs = paired_values(grid_frame(), ["lr"], Side.of("test/a/acc"), Side.of("test/b/acc"))
    assert list(pairs.index.names) == ["seed", "param.lr"] and len(pairs) == 6
    for (seed, lr), row in pairs.iterrows():
        s, r = int(seed), float(lr)
        assert (row["a"], row["b"]) == pytest.approx((0.5 + r + s / 100, 0.4 + r / 2 + s / 100))


def test_a_param_a_side_fixes_is_not_a_pairing_unit():
    pairs = paired_values(grid_frame(), ["lr"], Side.of("test/a/acc", {"lr": 0.2}), Side.of("test/a/acc", {"lr": 0.1}))
    assert list(pairs.index) == ["0", "1", "2"]
    assert pairs["a"].tolist() == pytest.approx([0.7, 0.71, 0.72]) and pairs["b"].tolist() == pytest.approx([0.6, 0.61, 0.62])


def test_a_param_only_one_side_fixes_is_not_a_pairing_unit_either():
    # "every swept parameter that neither side fixes": a's value per seed is its mean over lr
    pairs = paired_values(grid_frame(), ["lr"], Side.of("test/a/acc"), Side.of("test/b/acc", {"lr": 0.1}))
    assert list(pairs.index) == ["0", "1", "2"]
    assert pairs["a"].tolist() == pytest.approx([0.65 + s / 100 for s in range(3)])
    assert pairs["b"].tolist() == pytest.approx([0.45 + s / 100 for s in range(3)])


def wm_frame():
    """The method comes from the trial: attention=True trials report "attention", False ones "base"."""
    values = {("a", True): [0.70, 0.72], ("a", False): [0.60, 0.63], ("b", True): [0.80, 0.83], ("b", False): [0.75, 0.76]}
    return tidy_frame([(s, {"scenario": sc, "attention": att}, {f"test/{'attention' if att else 'base'}/acc": v[s]})
                       for (sc, att), v in values.items() for s in range(2)]), values


def test_methods_from_different_trials_pair_on_the_params_they_share():
    frame, values = wm_frame()
    a, b = cell_sides(frame, {"scenario": "a", "attention": "True"}, "test/attention/acc", "test/base/acc")
    assert a == Side.of("test/attention/acc", {"scenario": "a", "attention": "True"})
    assert b == Side.of("test/base/acc", {"scenario": "a"})  # attention cannot be held: base never has True
    pairs = paired_values(frame, ["scenario", "attention"], a, b)
    assert pairs["a"].tolist() == values["a", True] and pairs["b"].tolist() == values["a", False]
    every = paired_values(frame, ["scenario", "attention"], Side.of("test/attention/acc"), Side.of("test/base/acc"))
    assert list(every.index.names) == ["seed", "param.scenario"] and len(every) == 4
    for (seed, scenario), row in every.iterrows():
        assert (row["a"], row["b"]) == (values[scenario, True][int(seed)], values[scenario, False][int(seed)])


def noise_frame():
    """noise 0.0 and 0.3, seeds 0-3; seed 3 has no trial at 0.3 (it diverged)."""
    acc = {("good", 0.0): [0.85, 0.86, 0.84, 0.85], ("good", 0.3): [0.75, 0.758, 0.742],
           ("base", 0.0): [0.80, 0.81, 0.79, 0.80], ("base", 0.3): [0.79, 0.799, 0.781]}
    trials = [(s, {"noise": n}, {f"test/{m}/acc": acc[m, n][s] for m in ("good", "base")})
              for n in (0.0, 0.3) for s in range(4 if n == 0.0 else 3)]
    return tidy_frame(trials, study="noise"), acc


def test_drop_pairs_each_side_first_value_minus_second_per_seed():
    frame, acc = noise_frame()
    drop = {"param": "noise", "from": 0.0, "to": 0.3}
    pairs = paired_values(frame, ["noise"], Side.of("test/good/acc"), Side.of("test/base/acc"), drop)
    assert list(pairs.index) == ["0", "1", "2"]  # seed 3 has nothing at 0.3
    assert pairs["a"].tolist() == pytest.approx(np.subtract(acc["good", 0.0][:3], acc["good", 0.3]))
    assert pairs["b"].tolist() == pytest.approx(np.subtract(acc["base", 0.0][:3], acc["base", 0.3]))


def test_trials_of_one_unit_are_averaged_and_nan_pairs_dropped():
    frame = tidy_frame([(0, {}, {"test/a/acc": 0.6, "test/b/acc": 0.5}), (0, {}, {"test/a/acc": 0.8, "test/b/acc": 0.5}),
                        (1, {}, {"test/a/acc": math.nan, "test/b/acc": 0.5}), (2, {}, {"test/a/acc": 0.9, "test/b/acc": 0.4})])
    pairs = paired_values(frame, [], Side.of("test/a/acc"), Side.of("test/b/acc"))
    assert list(pairs.index) == ["0", "2"] and pairs["a"].tolist() == pytest.approx([0.7, 0.9])


def test_no_pairs_when_the_sides_share_no_seed_or_one_side_is_empty():
    frame = tidy_frame([(s, {}, {"test/a/acc": 0.6} if s < 2 else {"test/b/acc": 0.5}) for s in range(4)])
    assert paired_values(frame, [], Side.of("test/a/acc"), Side.of("test/b/acc")).empty
    assert paired_values(frame, [], Side.of("test/a/acc"), Side.of("test/zz/acc")).empty
    frame, _ = noise_frame()
    drop = {"param": "noise", "from": 0.0, "to": 0.3}
    assert paired_values(frame, ["noise"], Side.of("test/zz/acc"), Side.of("test/base/acc"), drop).empty


# ---------------------------------------------------------------- the grammar


def test_compare_defaults_study_baseline_direction_and_margin():
    c, ece, perf, lower, first = claims_of(
        compare("x", "test/good/acc", "test/base/acc"),
        compare("y", "test/good/ece", "test/base/ece"), compare("z", "perf/a_ms", "perf/b_ms"),
        compare("w", "test/good/acc", "test/base/acc", spec={"better": "lower"}, margin=1),
        {"claim": "v", "compare": {"metric": "test/good/acc", "baseline": "test/base/acc"}})
    assert (c.text, c.study, c.a, c.b, c.better, c.threshold, c.drop) == (
        "x", "h", Side.of("test/good/acc"), Side.of("test/base/acc"), "higher", None, None)
    assert c.margin == 0.0 and isinstance(c.margin, float)
    assert (ece.better, perf.better, lower.better) == ("lower", "lower", "lower")
    assert lower.margin == 1.0 and isinstance(lower.margin, float)
    assert first.study == "h"  # no study given: the default study
    no_default = parse_claims({**DOC, "default_study": None, "claims": [{"claim": "v", "compare": {
        "metric": "test/good/acc", "baseline": "test/base/acc"}}]}, "fam")
    assert no_default[0].study == "first"  # no default study either: the first one


def test_compare_where_applies_to_both_sides_and_baseline_where_to_b():
    (c,) = claims_of(compare("x", "test/good/acc", spec={"where": {"lr": 0.2}, "baseline_where": {"batch_size": 64}}))
    assert c.a == Side.of("test/good/acc", {"lr": 0.2})
    assert c.b == Side.of("test/good/acc", {"lr": 0.2, "batch_size": 64})  # baseline defaults to the metric
    (c,) = claims_of(compare("x", "test/good/acc", spec={"where": {"lr": 0.2}, "baseline_where": {"lr": 0.1}}))
    assert c.b == Side.of("test/good/acc", {"lr": 0.1})


def test_threshold_and_drop_claims():
    below, above = claims_of({"claim": "b", "threshold": {"metric": "perf/x_ms", "below": 1, "where": {"lr": 0.1}}},
                             {"claim": "a", "study": "noise", "threshold": {"metric": "info/flag", "above": 0.5}})
    assert (below.a, below.b, below.threshold, below.better) == (Side.of("perf/x_ms", {"lr": 0.1}), None, 1.0, "lower")
    assert isinstance(below.threshold, float)
    assert (above.study, above.a, above.threshold, above.better) == ("noise", Side.of("info/flag"), 0.5, "higher")
    (drop,) = claims_of(compare("d", "test/good/acc", "test/base/acc", study="noise",
                                drop={"param": "noise", "from": 0.0, "to": 0.3}))
    assert drop.drop == {"param": "noise", "from": 0.0, "to": 0.3}


def test_no_claims_and_claims_not_a_list():
    assert parse_claims(DOC, "fam") == [] and parse_claims({**DOC, "claims": None}, "fam") == []
    assert parse_claims({}, "fam") == []  # a family file without studies yet
    with pytest.raises(UsageError, match=r"^fam\.yaml: claims\[0\]\.study: unknown study None$"):
        parse_claims({"claims": [GOOD | {"study": None}]}, "fam")
    with pytest.raises(UsageError, match=r"^fam\.yaml: claims: expected a list$"):
        parse_claims({**DOC, "claims": {"claim": "x"}}, "fam")
    with pytest.raises(UsageError, match=r"^my/fam\.yaml: claims: expected a list$"):
        parse_claims({**DOC, "claims": "x"}, "fam", "my/fam.yaml")


GOOD = compare("ok", "test/good/acc", "test/base/acc")


@pytest.mark.parametrize("entry, message", [
    ("x", ": expected a mapping with a 'claim' text"),
    ({"claim": 3, "compare": {"metric": "test/a/acc"}}, ": expected a mapping with a 'claim' text"),
    ({**GOOD, "colour": 1, "alpha": 2}, ": unknown key(s) ['alpha', 'colour']"),
    ({**GOOD, "study": "nope"}, ".study: unknown study 'nope'"),
    ({"claim": "x"}, ": needs exactly one of 'compare' or 'threshold'"),
    ({**GOOD, "threshold": {"metric": "perf/x_ms", "below": 1}}, ": needs exactly one of 'compare' or 'threshold'"),
    ({**GOOD, "margin": -0.1}, ".margin: expected a number >= 0"),
    ({**GOOD, "margin": True}, ".margin: expected a number >= 0"),
    ({**GOOD, "margin": "0.1"}, ".margin: expected a number >= 0"),
    ({**GOOD, "margin": math.inf}, ".margin: expected a number >= 0"),
    ({**GOOD, "margin": math.nan}, ".margin: expected a number >= 0"),
    ({"claim": "x", "threshold": 3}, ".threshold: expected {metric: KEY, below|above: NUMBER[, where: {...}]}"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms"}}, ".threshold: expected {metric: KEY"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": 1, "above": 0}}, ".threshold: expected {metric: KEY"),
    ({"claim": "x", "threshold": {"metric": 3, "below": 1}}, ".threshold: expected {metric: KEY"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": 1, "colour": 1}}, ".threshold: expected {metric: KEY"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": "1"}}, ".threshold: the bound must be a number, got '1'"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "above": True}}, ".threshold: the bound must be a number, got True"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "above": math.inf}}, ".threshold: the bound must be a number"),
    ({"claim": "x", "threshold": {"metric": "acc", "below": 1}},
     ": 'acc' is not a metric key (<split>/<method>/<metric>, perf/<what>_ms)"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": 1, "where": {"zz": 1, "aa": 2}}},
     ".threshold.where: unknown config key(s) ['aa', 'zz']"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": 1, "where": ["lr"]}},
     ".threshold.where: expected a mapping of config key -> value"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": 1}, "drop": {"param": "lr", "from": 1, "to": 2}},
     ": 'drop' goes with 'compare', not 'threshold'"),
    ({"claim": "x", "compare": "test/a/acc"}, ".compare: expected {metric, baseline, better, where, baseline_where} with a metric key"),
    ({"claim": "x", "compare": {"metric": 3}}, ".compare: expected {metric, baseline, better, where, baseline_where}"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "baseline": "test/b/acc", "colour": 1}}, ".compare: expected {metric"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "baseline": "test/b/acc", "better": "up"}},
     ".compare.better: expected higher or lower, got 'up'"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "baseline": "base"}}, ": 'base' is not a metric key"),
    ({"claim": "x", "compare": {"metric": "acc", "baseline": "test/b/acc"}}, ": 'acc' is not a metric key"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "where": {"zz": 1}}}, ".compare.where: unknown config key(s) ['zz']"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "baseline_where": {"zz": 1}}},
     ".compare.baseline_where: unknown config key(s) ['zz']"),
    ({**GOOD, "drop": ["lr"]}, ".drop: expected {param, from, to}"),
    ({**GOOD, "drop": {"param": "lr", "from": 1}}, ".drop: expected {param, from, to}"),
    ({**GOOD, "drop": {"param": "zz", "from": 1, "to": 2}}, ".drop.param: unknown config key 'zz'"),
    ({"claim": "x", "compare": {"metric": "test/a/acc"}}, ".compare: both sides are the same (test/a/acc)"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "where": {"lr": 0.1}, "baseline_where": {"lr": 0.1}}},
     ".compare: both sides are the same (test/a/acc [lr=0.1])"),
])
def test_malformed_claims_are_one_error_naming_the_entry(entry, message):
    with pytest.raises(UsageError) as error:
        claims_of(GOOD, entry)  # the second entry: its index is in the message
    assert str(error.value).startswith("fam.yaml: claims[1]" + message)


# ---------------------------------------------------------------- what only the study can tell


def validate(*entries):
    return validate_claims({**DOC, "claims": list(entries)}, "fam", "src.yaml")


def test_validate_accepts_grid_values_eval_axes_and_params_outside_the_grid():
    claims = validate(compare("a", "test/good/acc", study="ab", spec={"where": {"batch_size": 256},
                                                                      "baseline_where": {"batch_size": 128.0}}),
                      compare("b", "test/good:k:5/acc", "test/base:k:1/acc", spec={"where": {"lr": 0.3}}),
                      compare("c", "test/good:k:20/acc", "test/base:k:20/acc", study="h20"),
                      compare("d", "test/good/acc", "test/base/acc", study="noise",
                              drop={"param": "noise", "from": 0, "to": 0.3}),
                      {"claim": "e", "study": "ab", "threshold": {"metric": "perf/x_ms", "below": 1,
                                                                   "where": {"batch_size": 64}}})
    assert [c.text for c in claims] == ["a", "b", "c", "d", "e"]


def test_validate_names_its_source_in_grammar_errors():
    with pytest.raises(UsageError, match=r"^src\.yaml: claims\[0\]\.study: unknown study 'nope'$"):
        validate(GOOD | {"study": "nope"})


@pytest.mark.parametrize("entry, message", [
    (compare("x", "test/good/acc", study="ab", spec={"where": {"batch_size": 32}, "baseline_where": {"batch_size": 128}}),
     "batch_size=32 is not in study 'ab''s grid [64, 128, 256]"),
    (compare("x", "test/good/acc", study="ab", spec={"baseline_where": {"batch_size": 32}}),
     "batch_size=32 is not in study 'ab''s grid [64, 128, 256]"),
    ({"claim": "x", "study": "ab", "threshold": {"metric": "perf/x_ms", "below": 1, "where": {"batch_size": 32}}},
     "batch_size=32 is not in study 'ab''s grid [64, 128, 256]"),
    (compare("x", "test/good:k:20/acc", "test/base/acc"), "test/good:k:20/acc names eval axis k=20, but study 'h' evaluates k: [1, 5]"),
    (compare("x", "test/good/acc", "test/base:k:20/acc"), "test/base:k:20/acc names eval axis k=20, but study 'h' evaluates k: [1, 5]"),
    (compare("x", "test/good:k:1/acc", "test/base/acc", study="h20"), "test/good:k:1/acc names eval axis k=1, but study 'h20' evaluates k: [20]"),
    (compare("x", "test/good:tta:2/acc", "test/base/acc"), "test/good:tta:2/acc names eval axis tta=2, but study 'h' evaluates tta: not an eval axis"),
    ({"claim": "x", "threshold": {"metric": "test/good:k:20/acc", "above": 0.5}},
     "test/good:k:20/acc names eval axis k=20, but study 'h' evaluates k: [1, 5]"),
    (compare("x", "test/good/acc", "test/base/acc", study="noise", drop={"param": "noise", "from": 0.0, "to": 0.5}),
     "drop needs noise swept in study 'noise' with 0.0 and 0.5 in its grid (grid: [0.0, 0.3])"),
    (compare("x", "test/good/acc", "test/base/acc", study="noise", drop={"param": "noise", "from": 0.5, "to": 0.3}),
     "drop needs noise swept in study 'noise' with 0.5 and 0.3 in its grid (grid: [0.0, 0.3])"),
    (compare("x", "test/good/acc", "test/base/acc", drop={"param": "noise", "from": 0.0, "to": 0.3}),
     "drop needs noise swept in study 'h' with 0.0 and 0.3 in its grid (grid: None)"),
])
def test_validate_refuses_claims_that_could_select_no_trial(entry, message):
    with pytest.raises(UsageError) as error:
        validate(GOOD, entry)
    assert str(error.value) == "src.yaml: claims[1] ('x'): " + message


# ---------------------------------------------------------------- verdicts


def studies(frame=None, cell_params=()):
    return {"h": (headline_frame() if frame is None else frame, list(cell_params))}


def test_statuses_p_values_and_holm_across_claims():
    entries = [compare("good", "test/good/acc", "test/base/acc"), compare("worse", "test/worse/acc", "test/base/acc"),
               compare("noisy", "test/noisy/acc", "test/base/acc"), compare("ece", "test/good/ece", "test/base/ece"),
               {"claim": "fast", "study": "h", "threshold": {"metric": "perf/x_ms", "below": 0.5}},
               {"claim": "faster", "study": "h", "threshold": {"metric": "perf/x_ms", "below": 0.1}},
               compare("elsewhere", "test/good/acc", "test/base/acc", study="ab")]  # no trials: not in the Holm family
    results = check_claims(claims_of(*entries), studies())
    raw = [stats.ttest_rel(BASE + GAIN, BASE).pvalue, stats.ttest_rel(BASE - LOSS, BASE).pvalue,
           stats.ttest_rel(BASE + NOISE, BASE).pvalue, stats.ttest_rel(BASE_ECE - ECE_CUT, BASE_ECE).pvalue,
           stats.ttest_1samp(PERF, 0.5).pvalue, stats.ttest_1samp(PERF, 0.1).pvalue]
    adjusted = holm(raw)
    assert [r.status for r in results] == [VALIDATED, INVALIDATED, INCONCLUSIVE, VALIDATED, VALIDATED, INVALIDATED,
                                           INCONCLUSIVE]
    for r, p, p_adj in zip(results, raw, adjusted):
        assert r.test.p_t == pytest.approx(p, rel=1e-9) and r.p_holm == pytest.approx(p_adj, rel=1e-9)
    assert results[-1].test is None and results[-1].p_holm is None
    assert [r.reason for r in results] == [
        "significant (Holm p < 0.05) in the claimed direction", "significant (Holm p < 0.05) against the claim",
        "not significant after Holm (alpha 0.05)", "significant (Holm p < 0.05) in the claimed direction",
        "significant (Holm p < 0.05) in the claimed direction", "significant (Holm p < 0.05) against the claim",
        "no finished trials of study 'ab' in this report"]
    # the threshold claims test value - threshold: mean_b is the threshold
    assert (results[4].test.mean_a, results[4].test.mean_b) == pytest.approx((PERF.mean(), 0.5))
    assert results[4].test.diff == pytest.approx(PERF.mean() - 0.5)


def test_a_claimed_lower_value_is_validated_by_a_significant_fall():
    lower, higher = check_claims(claims_of(compare("w", "test/worse/acc", "test/base/acc", spec={"better": "lower"}),
                                           {"claim": "t", "study": "h", "threshold": {"metric": "perf/x_ms", "above": 0.1}}),
                                 studies())
    assert (lower.status, higher.status) == (VALIDATED, VALIDATED)


def test_significance_is_strictly_below_alpha():
    (claim,) = claims_of(GOOD)
    p = stats.ttest_rel(BASE + GAIN, BASE).pvalue  # one claim: Holm leaves its p as it is
    (at,) = check_claims([claim], studies(), alpha=p)
    (above,) = check_claims([claim], studies(), alpha=p * (1 + 1e-9))
    assert (at.status, above.status) == (INCONCLUSIVE, VALIDATED)
    assert at.reason == f"not significant after Holm (alpha {p})"
    assert above.reason == f"significant (Holm p < {p * (1 + 1e-9)}) in the claimed direction"


def constant_frame(diffs, base=0.5):
    return tidy_frame([(s, {}, {"test/a/acc": base + d, "test/b/acc": base}) for s, d in enumerate(diffs)])


def test_margin_interval_is_closed_and_catches_identical_seeds():
    # every seed's difference exactly +0.25 / -0.25 (binary-exact): the interval is that point
    on_edge = [compare(f"m{i}", "test/a/acc", "test/b/acc", margin=0.25) for i in range(2)]
    up, = check_claims(claims_of(on_edge[0]), studies(constant_frame([0.25] * 3)))
    down, = check_claims(claims_of(on_edge[1]), studies(constant_frame([-0.25] * 3)))
    assert (up.status, down.status) == (INVALIDATED, INVALIDATED)
    assert up.reason == "95% CI of the difference inside ±0.2500: no meaningful effect"
    past, = check_claims(claims_of(compare("m", "test/a/acc", "test/b/acc", margin=0.125)), studies(constant_frame([0.25] * 3)))
    assert past.status == VALIDATED and past.reason == "significant (Holm p < 0.05) in the claimed direction"
    same, = check_claims(claims_of(compare("s", "test/a/acc", "test/b/acc")), studies(constant_frame([0.0] * 3)))
    assert (same.status, same.reason) == (INVALIDATED, "identical in every seed")
    # mean difference 0 but not identical: inside the margin for a reason other than identity
    wobble, = check_claims(claims_of(compare("w", "test/a/acc", "test/b/acc", margin=0.1)),
                           studies(constant_frame([0.001, -0.001, 0.002, -0.002])))
    assert wobble.test.diff == pytest.approx(0, abs=1e-12)
    assert (wobble.status, wobble.reason) == (INVALIDATED, "95% CI of the difference inside ±0.1000: no meaningful effect")


def test_an_interval_past_the_margin_at_either_end_is_not_inside_it():
    for d in (np.array([0.01, 0.05, 0.03, 0.02]), -np.array([0.01, 0.05, 0.03, 0.02])):
        lo, hi = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
        edge = max(abs(lo), abs(hi))  # the end farther from 0 decides
        for margin, inside in ((edge + 1e-4, True), (edge - 1e-4, False)):
            (r,) = check_claims(claims_of(compare("m", "test/a/acc", "test/b/acc", margin=float(margin))),
                                studies(constant_frame(d)))
            assert ("inside ±" in r.reason) is inside and (r.status == INVALIDATED or not inside)


def test_fewer_than_two_seeds_is_inconclusive():
    one, = check_claims(claims_of(compare("o", "test/a/acc", "test/b/acc")), studies(constant_frame([0.1])))
    assert (one.status, one.reason, one.p_holm) == (INCONCLUSIVE, "n=1: a test needs at least 2 seeds", None)
    assert one.evidence == ("test/a/acc = 0.6000 vs test/b/acc = 0.5000 (n=1 paired); Δ = +0.1000; t-test n/a (n=1: no test); "
                            "P(A>B) = 1.00 → n=1: a test needs at least 2 seeds")


def test_two_seeds_are_enough_to_decide():
    steady, flat = (check_claims(claims_of(compare(c, "test/a/acc", "test/b/acc", margin=m)), studies(constant_frame(d)))[0]
                    for c, m, d in (("s", 0.0, [0.25, 0.25]), ("f", 0.5, [0.25, 0.25])))
    assert (steady.status, steady.test.n) == (VALIDATED, 2)  # the same non-zero difference in both: p = 0
    assert (flat.status, flat.reason) == (INVALIDATED, "95% CI of the difference inside ±0.5000: no meaningful effect")


def test_untested_claims_say_why():
    frame = tidy_frame([(s, {}, {"test/a/acc": 0.6} if s < 2 else {"test/b/acc": 0.5}) for s in range(4)])
    entries = [compare("apart", "test/a/acc", "test/b/acc"), compare("one missing", "test/a/acc", "test/zz/acc"),
               compare("both missing", "test/yy/acc", "test/zz/acc", spec={"where": {"lr": 0.1}}),
               {"claim": "no perf", "study": "h", "threshold": {"metric": "perf/zz_ms", "below": 1}}]
    results = check_claims(claims_of(*entries), studies(frame))
    assert [r.evidence for r in results] == [
        "no trials pair up (same seed) across the two sides", "no values of test/zz/acc",
        "no values of test/yy/acc [lr=0.1], test/zz/acc [lr=0.1]", "no values of perf/zz_ms"]
    assert all(r.status == INCONCLUSIVE and r.reason == r.evidence and r.test is None for r in results)


def test_evidence_of_a_compare_claim_with_six_seeds():
    (r,) = check_claims(claims_of(GOOD), studies())
    good, d = BASE + GAIN, GAIN
    lo, hi = stats.t.interval(0.95, 5, loc=d.mean(), scale=stats.sem(d))
    p, w = stats.ttest_rel(good, BASE).pvalue, stats.wilcoxon(good - BASE).pvalue
    assert r.evidence == (f"test/good/acc = {good.mean():.4f} vs test/base/acc = {BASE.mean():.4f} (n=6 paired); "
                          f"Δ = {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]; t-test {p_text(p)}, Holm {p_text(p)}; "
                          f"Wilcoxon {p_text(w)}; d_z = {d.mean() / d.std(ddof=1):.2f}; P(A>B) = 1.00 "
                          "→ significant (Holm p < 0.05) in the claimed direction")


def test_evidence_leaves_out_wilcoxon_below_six_seeds_and_p_a_gt_b_for_thresholds():
    frame = tidy_frame([(s, {}, {"test/a/acc": BASE[s] + GAIN[s], "test/b/acc": BASE[s], "perf/x_ms": PERF[s]})
                        for s in range(5)])
    pair, thr = check_claims(claims_of(compare("c", "test/a/acc", "test/b/acc"),
                                       {"claim": "t", "study": "h", "threshold": {"metric": "perf/x_ms", "below": 0.5}}),
                             studies(frame))
    assert "Wilcoxon" not in pair.evidence and "P(A>B) = 1.00" in pair.evidence
    x = PERF[:5]
    d = x - 0.5
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    p = stats.ttest_1samp(x, 0.5).pvalue
    p_adj = holm([stats.ttest_rel(BASE[:5] + GAIN[:5], BASE[:5]).pvalue, p])[1]
    assert thr.evidence == (f"perf/x_ms = {x.mean():.4f} (mean of n=5), claimed below 0.5000; "
                            f"Δ = {d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]; t-test {p_text(p)}, Holm {p_text(p_adj)}; "
                            f"d_z = {d.mean() / d.std(ddof=1):.2f} → significant (Holm p < 0.05) in the claimed direction")
    (above,) = check_claims(claims_of({"claim": "t", "study": "h", "threshold": {"metric": "perf/x_ms", "above": 0.5}}),
                            studies(frame))
    assert above.evidence.startswith(f"perf/x_ms = {x.mean():.4f} (mean of n=5), claimed above 0.5000; ")
    assert above.status == INVALIDATED


def test_evidence_of_identical_and_constant_differences():
    (same,) = check_claims(claims_of(compare("s", "test/same/acc", "test/base/acc")), studies())
    (steady,) = check_claims(claims_of(compare("c", "test/a/acc", "test/b/acc")), studies(constant_frame([0.25] * 3)))
    assert same.evidence == (f"test/same/acc = {BASE.mean():.4f} vs test/base/acc = {BASE.mean():.4f} (n=6 paired); "
                             "Δ = +0.0000 [+0.0000, +0.0000]; t-test n/a (identical in every seed); Wilcoxon p = n/a; P(A>B) = 0.50 "
                             "→ identical in every seed")
    assert steady.evidence == ("test/a/acc = 0.7500 vs test/b/acc = 0.5000 (n=3 paired); Δ = +0.2500 [+0.2500, +0.2500]; "
                               "t-test p < 0.0001, Holm p < 0.0001 (same difference in every seed (sd = 0)); P(A>B) = 1.00 "
                               "→ significant (Holm p < 0.05) in the claimed direction")


def test_drop_claim_tests_the_drops_and_says_so():
    frame, acc = noise_frame()
    (r,) = check_claims(claims_of(compare("d", "test/good/acc", "test/base/acc", study="noise", spec={"better": "lower"},
                                          drop={"param": "noise", "from": 0.0, "to": 0.3})), {"noise": (frame, ["noise"])})
    good = np.subtract(acc["good", 0.0][:3], acc["good", 0.3])
    base = np.subtract(acc["base", 0.0][:3], acc["base", 0.3])
    assert r.test.n == 3 and r.test.p_t == pytest.approx(stats.ttest_rel(good, base).pvalue, rel=1e-9)
    assert r.evidence.startswith(f"drop 0.0→0.3 of test/good/acc = {good.mean():.4f} vs test/base/acc = {base.mean():.4f} "
                                 "(n=3 paired); ")
    assert r.status == (INVALIDATED if stats.ttest_rel(good, base).pvalue < 0.05 else INCONCLUSIVE)


def test_inconclusive_claims_get_the_seeds_their_holm_place_needs():
    entries = [GOOD, compare("noisy", "test/noisy/acc", "test/base/acc"),
               compare("noisy margin", "test/noisy/acc", "test/base/acc", margin=0.01),
               compare("elsewhere", "test/good/acc", "test/base/acc", study="ab")]
    results = check_claims(claims_of(*entries), studies())
    d = NOISE
    p_noisy = stats.ttest_rel(BASE + NOISE, BASE).pvalue
    # Holm's order of the three tested p-values: good first, then the two noisy ones (equal p); level alpha / (m - rank)
    assert results[0].seeds is None
    levels = sorted([results[1].seeds.alpha, results[2].seeds.alpha])
    assert levels == pytest.approx([0.05 / 2, 0.05 / 1])
    assert results[3].seeds.alpha == pytest.approx(0.05 / 4) and results[3].seeds.n is None  # untested: the strictest level
    noisy, margin = results[1].seeds, results[2].seeds
    assert (noisy.basis, noisy.effect, noisy.n_now) == ("observed difference", pytest.approx(abs(d.mean())), 6)
    assert (margin.basis, margin.effect, margin.n_now) == ("margin", 0.01, 6)
    power = TTestPower()
    assert margin.n == math.ceil(power.solve_power(effect_size=0.01 / d.std(ddof=1), alpha=margin.alpha, power=0.8))
    # the difference seen is tiny: statsmodels asks more seeds than the planner names (10000)
    assert noisy.n is None and power.solve_power(effect_size=noisy.effect / d.std(ddof=1), alpha=noisy.alpha, power=0.8) > 1e4
    assert p_noisy > 0.05


def test_an_untested_claim_alone_plans_for_alpha():
    (r,) = check_claims(claims_of(compare("x", "test/a/acc", "test/b/acc", study="ab")), studies())
    assert r.seeds.alpha == 0.05 and r.seeds.n is None


def test_records_carry_every_number():
    good, thr, nan, none = check_claims(claims_of(
        GOOD, {"claim": "t", "study": "h", "threshold": {"metric": "perf/x_ms", "below": 0.5}},
        {"claim": "n", "study": "h", "threshold": {"metric": "perf/nan_ms", "below": 0.5}},
        compare("x", "test/a/acc", "test/b/acc", study="ab", margin=0.5)),
        studies(headline_frame({"perf/nan_ms": math.nan})))  # a timing every trial failed to take
    d = GAIN
    lo, hi = stats.t.interval(0.95, 5, loc=d.mean(), scale=stats.sem(d))
    rec = good.record()
    assert rec == {
        "claim": "ok", "study": "h", "status": VALIDATED, "reason": good.reason, "a": "test/good/acc", "b": "test/base/acc",
        "threshold": None, "drop": None, "margin": 0.0, "n": 6, "mean_a": pytest.approx((BASE + GAIN).mean()),
        "mean_b": pytest.approx(BASE.mean()), "diff": pytest.approx(d.mean()), "diff_ci": pytest.approx([lo, hi]),
        "p_t": pytest.approx(stats.ttest_rel(BASE + GAIN, BASE).pvalue), "p_holm": good.p_holm,
        "p_wilcoxon": pytest.approx(stats.wilcoxon(d).pvalue), "d_z": pytest.approx(d.mean() / d.std(ddof=1)),
        "p_a_gt_b": 1.0, "seeds_needed": None}
    assert isinstance(rec["diff_ci"], list)
    rec = thr.record()
    assert (rec["a"], rec["b"], rec["threshold"], rec["n"]) == ("perf/x_ms", None, 0.5, 6)
    rec = nan.record()  # every value NaN: a test of nothing, no NaN in the record
    assert nan.status == INCONCLUSIVE and nan.reason == "n=0: a test needs at least 2 seeds"
    assert (rec["n"], rec["mean_a"], rec["diff"], rec["diff_ci"], rec["p_t"], rec["p_holm"]) == (0, None, None, None, None, None)
    assert nan.evidence.startswith("perf/nan_ms = n/a (mean of n=0), claimed below 0.5000; Δ = n/a; t-test n/a (no paired seeds)")
    rec = none.record()
    assert {k: rec[k] for k in ("n", "mean_a", "mean_b", "diff", "diff_ci", "p_t", "p_wilcoxon", "d_z", "p_a_gt_b",
                                "margin", "drop")} == {
        "n": 0, "mean_a": None, "mean_b": None, "diff": None, "diff_ci": None, "p_t": None, "p_wilcoxon": None,
        "d_z": None, "p_a_gt_b": None, "margin": 0.5, "drop": None}
    assert rec["seeds_needed"] is None and rec["alpha"] == pytest.approx(0.05 / 4) and rec["basis"] == "margin"
    assert rec["effect"] == 0.5 and rec["n_now"] == 0


def test_claim_is_a_plain_dataclass_with_defaults():
    c = Claim("t", "h", Side.of("test/a/acc"))
    assert (c.b, c.better, c.threshold, c.drop, c.margin) == (None, "higher", None, None, 0.0)
