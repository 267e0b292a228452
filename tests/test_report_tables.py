"""orchestrator/report_tables.py on small in-memory studies (frames shaped like report_data's, no
MLflow store): each table's layout (rows, columns, order, titles, notes) and every number in it
against scipy / statsmodels / a hand computation here. These are the module's own tests for
bench/mutation.py (the report end to end, from a real store, is test_report.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from orchestrator.report_config import ReportConfig
from orchestrator.report_data import StudyRuns, StudyStats
from orchestrator.stats import paired_test
from orchestrator.report_tables import (RANKED_TRIALS, _verdict, ab_table, baseline_table, best_configuration, column, drop_table,
                                        eval_signatures, eval_tables, grid_tables, headline_table, methods_of, metrics_of,
                                        perf_table, ranking_table)
from report_frames import holm, tidy_frame

CFG = dict(objective={"metric": "val/good/acc", "mode": "max"}, baseline="base", headline_metrics=["acc", "ece", "nll"],
           labels={"good": "Good"}, focus=["good"], reference={"ab": {"batch_size": 128}}, drops={"w": "width"})


def cfg(**changes):
    return ReportConfig(**{**CFG, **changes})


def study_of(frame, name="s", axes=(), derived=(), spec=None, changed=None):
    return StudyRuns(name, frame, list(axes), list(derived), [f"{name}-1"], [], {"finished": frame["run_id"].nunique()},
                     [], {"studies": {name: spec or {}}}, changed=changed or {})


def interval(values):
    """``mean ± half (n=N)`` of a 95% Student-t interval, computed here (values below 1: 4 decimals)."""
    x = np.asarray(values, dtype=float)
    if len(x) == 1:
        return f"{x[0]:.4f} (n=1, no interval)"
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return f"{x.mean():.4f} ± {(hi - lo) / 2:.4f} (n={len(x)})"


def diff_text(d):
    d = np.asarray(d, dtype=float)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    return f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"


def p4(p):
    return "< 0.0001" if p < 1e-4 else f"{p:.4f}"


# ---------------------------------------------------------------- a study without swept params, 3 seeds

BASE = np.array([0.80, 0.82, 0.81])
GAIN = np.array([0.050, 0.040, 0.060])
BASE_ECE = np.array([0.10, 0.12, 0.11])
ECE_CUT = np.array([0.020, 0.030, 0.025])
FIT_MS, EVAL_MS = np.array([0.50, 0.55, 0.60]), np.array([0.20, 0.22, 0.21])
K_SHIFT = {1: -0.03, 2: -0.02, 5: 0.0, 10: -0.005, 20: -0.01, 50: -0.04}


def headline_frame():
    trials = []
    for s in range(3):
        base, good = BASE[s], BASE[s] + GAIN[s]
        metrics = {"test/base/acc": base, "test/good/acc": good, "test/same/acc": base, "test/base/ece": BASE_ECE[s],
                   "test/good/ece": BASE_ECE[s] - ECE_CUT[s], "test/same/ece": BASE_ECE[s],
                   "test/other/top5": 0.9, "val/valonly/acc": 0.7, "val/good/acc": good - 0.01,
                   "val/valonly:k:1/acc": 0.6, "val/valonly:k:5/acc": 0.65,  # eval axes of another split
                   "test/solo:views:2/acc": 0.5, "perf/fit_ms": FIT_MS[s], "perf/eval_ms": EVAL_MS[s]}
        for k, shift in K_SHIFT.items():
            metrics |= {f"test/good:k:{k}/acc": good + shift, f"test/base:k:{k}/acc": base + shift / 2}
        trials.append((s, {"lr": 0.1}, metrics))
    return tidy_frame(trials, study="h")


@pytest.fixture(scope="module")
def head():
    study = study_of(headline_frame(), "h")
    return study, StudyStats(study)


def test_methods_and_metrics_of_a_split(head):
    study, _ = head
    assert methods_of(study, cfg(), "test") == ["base", "good", "other", "same"]  # baseline first, then sorted
    assert methods_of(study, cfg(baseline="same"), "test") == ["same", "base", "good", "other"]
    assert methods_of(study, cfg(baseline="absent"), "test") == ["base", "good", "other", "same"]
    assert methods_of(study, cfg(), "val") == ["good", "valonly"]
    # the YAML's methods, in its order, where the split has them (an eval-axis spec counts)
    assert methods_of(study, cfg(methods=["same", "good:k:5", "missing", "valonly"]), "test") == ["same", "good:k:5"]
    assert metrics_of(study, cfg(), "test") == ["acc", "ece"]  # the YAML's order; nll is not reported
    assert metrics_of(study, cfg(headline_metrics=["ece", "top5", "acc"]), "test") == ["ece", "top5", "acc"]
    assert metrics_of(study, cfg(), "val") == ["acc"]


def test_headline_table_cells_are_t_intervals_over_seeds(head):
    study, st = head
    table = headline_table(study, st, cfg())
    assert table.title == "test metrics, mean ± 95% t-interval over seeds (n)"
    assert list(table.frame.columns) == ["Method", "Accuracy", "ECE"]
    assert table.frame["Method"].tolist() == ["base", "Good", "same"]  # "other" has no headline metric: no row
    rows = table.frame.set_index("Method")
    assert rows.loc["base", "Accuracy"] == interval(BASE) and rows.loc["same", "ECE"] == interval(BASE_ECE)
    assert rows.loc["Good", "Accuracy"] == interval(BASE + GAIN)
    assert rows.loc["Good", "ECE"] == interval(BASE_ECE - ECE_CUT)
    only_ece = headline_table(study, st, cfg(headline_metrics=["top5", "ece"])).frame.set_index("Method")
    assert only_ece.loc["other", "Top-5"] == "0.9000 ± 0.0000 (n=3)" and only_ece.loc["other", "ECE"] == "—"
    val = headline_table(study, st, cfg(split="val"))
    assert val.title.startswith("val metrics") and val.frame["Method"].tolist() == ["Good", "valonly"]


def test_eval_table_rows_are_axis_values_in_numeric_order(head):
    study, st = head
    # views takes one value: no table; valonly's axes are on val, not this split
    assert eval_signatures(study, cfg()) == {("k",): ["base", "good"]}
    (table,) = eval_tables(study, st, cfg())  # ECE has no eval-axis values: no table
    assert table.title == "test Accuracy vs k"
    assert list(table.frame.columns) == ["k", "base", "Good"]
    assert table.frame["k"].tolist() == ["1", "2", "5", "10", "20", "50"]
    for _, row in table.frame.iterrows():
        shift = K_SHIFT[int(row["k"])]
        assert row["Good"] == interval(BASE + GAIN + shift) and row["base"] == interval(BASE + shift / 2)
    # the YAML's methods choose and order the columns
    assert eval_signatures(study, cfg(methods=["good:k:5", "base"])) == {("k",): ["good", "base"]}
    assert eval_signatures(study, cfg(methods=["good"])) == {("k",): ["good"]}
    assert list(eval_tables(study, st, cfg(methods=["good"]))[0].frame.columns) == ["k", "Good"]


def test_eval_table_over_two_axes_orders_rows_by_both():
    acc = {(k, v): 0.5 + k / 100 + v / 1000 for k in (1, 5, 20) for v in (2, 10)}
    frame = tidy_frame([(s, {}, {f"test/m:k:{k}:views:{v}/acc": a + s / 100 for (k, v), a in acc.items()}) for s in range(2)])
    study = study_of(frame)
    (table,) = eval_tables(study, StudyStats(study), cfg())
    assert table.title == "test Accuracy vs k, views"
    assert list(table.frame.columns) == ["k", "views", "m"]
    assert table.frame[["k", "views"]].values.tolist() == [[str(k), str(v)] for k, v in sorted(acc)]
    assert table.frame["m"].tolist() == [interval([a, a + 0.01]) for _, a in sorted(acc.items())]


def test_perf_table_has_every_timing_in_key_order(head):
    study, st = head
    table = perf_table(study, st)
    assert table.title == "timings (perf/, ms), mean ± 95% t-interval over seeds (n)"
    assert list(table.frame.columns) == ["perf/eval_ms", "perf/fit_ms"]
    assert table.frame.iloc[0].tolist() == [interval(EVAL_MS), interval(FIT_MS)] and len(table.frame) == 1
    no_perf = study_of(tidy_frame([(0, {}, {"test/a/acc": 0.5})]))
    assert perf_table(no_perf, StudyStats(no_perf)) is None


def test_baseline_table_pairs_by_seed_and_holm_corrects_the_table(head):
    study, _ = head
    table = baseline_table(study, cfg())
    assert table.title == "paired comparisons against the baseline base (test)"
    assert list(table.frame.columns) == ["Method", "Metric", "A − B [95% CI]", "t-test p (Holm)", "d_z", "P(A>B)", "n"]
    assert table.frame[["Method", "Metric"]].values.tolist() == [["Good", "Accuracy"], ["Good", "ECE"],
                                                                 ["same", "Accuracy"], ["same", "ECE"]]  # other: no acc/ece
    rows = table.frame.set_index(["Method", "Metric"])
    good, ece = BASE + GAIN, BASE_ECE - ECE_CUT
    raw = [stats.ttest_rel(good, BASE).pvalue, stats.ttest_rel(ece, BASE_ECE).pvalue]
    adjusted = holm(raw)  # the identical "same" rows have no test and do not count
    for (metric, d), p, p_adj in zip((("Accuracy", GAIN), ("ECE", -ECE_CUT)), raw, adjusted):
        row = rows.loc["Good", metric]
        assert row["A − B [95% CI]"] == diff_text(d)
        assert row["t-test p (Holm)"] == f"{p4(p)} ({p4(p_adj)})"
        assert row["d_z"] == f"{d.mean() / d.std(ddof=1):.2f}" and row["n"] == 3
    assert (rows.loc[("Good", "Accuracy"), "P(A>B)"], rows.loc[("Good", "ECE"), "P(A>B)"]) == ("1.00", "0.00")
    same = rows.loc["same", "Accuracy"]
    assert same.tolist() == ["+0.0000 [+0.0000, +0.0000]", "n/a (identical in every seed)",
                             "n/a (identical in every seed)", "0.50", 3]
    assert table.notes == ["A = the method, B = base in the same cell, paired by seed; p-values two-sided, Holm-adjusted "
                           "over the 4 comparisons of this table (raw p first, adjusted in parentheses); d_z = mean/sd of "
                           "the paired differences; P(A>B) = share of seeds with A > B (ties count 1/2)."]
    first = table.records[0]
    assert {k: first[k] for k in ("cell", "method", "baseline", "metric", "n", "note")} == {
        "cell": "all trials", "method": "good", "baseline": "base", "metric": "acc", "n": 3, "note": ""}
    assert (first["mean_a"], first["mean_b"], first["diff"]) == pytest.approx((good.mean(), BASE.mean(), GAIN.mean()))
    lo, hi = stats.t.interval(0.95, 2, loc=GAIN.mean(), scale=stats.sem(GAIN))
    assert first["diff_ci"] == pytest.approx([lo, hi]) and isinstance(first["diff_ci"], list)
    assert (first["p_t"], first["p_t_holm"]) == pytest.approx((raw[0], adjusted[0]))
    assert first["p_wilcoxon"] == pytest.approx(stats.wilcoxon(GAIN).pvalue)
    assert first["p_wilcoxon_holm"] == pytest.approx(holm(
        [stats.wilcoxon(GAIN).pvalue, stats.wilcoxon(-ECE_CUT).pvalue])[0])
    assert (first["d_z"], first["p_a_gt_b"]) == pytest.approx((GAIN.mean() / GAIN.std(ddof=1), 1.0))
    same_record = table.records[2]
    assert (same_record["p_t"], same_record["p_t_holm"], same_record["d_z"], same_record["note"]) == (
        None, None, None, "identical in every seed")


def test_baseline_table_skips_only_the_metrics_a_method_lacks():
    frame = tidy_frame([(s, {}, {"test/base/acc": 0.8 + s / 100, "test/base/ece": 0.1, "test/a/ece": 0.05 + s / 100})
                        for s in range(3)])
    table = baseline_table(study_of(frame), cfg())
    assert table.frame[["Method", "Metric"]].values.tolist() == [["a", "ECE"]]


def test_no_baseline_table_without_a_baseline_or_its_values(head):
    study, _ = head
    assert baseline_table(study, cfg(baseline=None)) is None
    assert baseline_table(study, cfg(baseline="absent")) is None


# ---------------------------------------------------------------- six seeds: the Wilcoxon column


def six_seed_frame():
    """good: 6 paired seeds; late: only seeds 3-5 (3 paired); apart: only seeds the baseline lacks;
    once: one paired seed."""
    base = [0.80, 0.82, 0.81, 0.79, 0.83, 0.80]
    trials = [(s, {}, {"test/base/acc": base[s], "test/good/acc": base[s] + 0.01 * (s + 1),
                       **({"test/late/acc": base[s] + 0.02 + 0.001 * s} if s >= 3 else {}),
                       **({"test/once/acc": base[s] + 0.05} if s == 0 else {})}) for s in range(6)]
    trials.append((9, {}, {"test/apart/acc": 0.5}))
    return tidy_frame(trials), base


def test_wilcoxon_column_where_some_comparison_has_six_seeds():
    frame, base = six_seed_frame()
    table = baseline_table(study_of(frame), cfg(headline_metrics=["acc"]))
    assert list(table.frame.columns) == ["Method", "Metric", "A − B [95% CI]", "t-test p (Holm)", "Wilcoxon p (Holm)",
                                         "d_z", "P(A>B)", "n"]
    rows = table.frame.set_index("Method")
    d_good, d_late = 0.01 * np.arange(1, 7), 0.02 + 0.001 * np.arange(3, 6)
    p_w = holm([stats.wilcoxon(d_good).pvalue, stats.wilcoxon(d_late).pvalue])
    assert rows.loc["Good", "Wilcoxon p (Holm)"] == f"{p4(stats.wilcoxon(d_good).pvalue)} ({p4(p_w[0])})"
    assert rows.loc["late", "Wilcoxon p (Holm)"] == "— (too few seeds)" and rows.loc["late", "n"] == 3
    p_t = holm([stats.ttest_1samp(d_good, 0).pvalue, stats.ttest_1samp(d_late, 0).pvalue])
    assert rows.loc["late", "t-test p (Holm)"] == f"{p4(stats.ttest_1samp(d_late, 0).pvalue)} ({p4(p_t[1])})"
    # no paired seed, one paired seed: said, not computed
    assert rows.loc["apart"].tolist() == ["Accuracy", "n/a (no paired seeds)", "n/a", "— (too few seeds)",
                                          "n/a", "n/a", 0]
    assert rows.loc["once"].tolist() == ["Accuracy", "+0.0500 (n=1, no interval)", "n/a (n=1: no test)",
                                         "— (too few seeds)", "n/a (n=1: no test)", "1.00", 1]
    assert table.records[0]["n"] == 0 and table.records[0]["method"] == "apart"


# ---------------------------------------------------------------- swept params


def grid_frame():
    trials = [(s, {"lr": lr}, {"test/base/acc": 0.7 + lr / 2 + s / 100, "test/good/acc": 0.65 + lr + s / 50,
                               "test/good:k:1/acc": 0.6 + lr, "test/good:k:5/acc": 0.65 + lr})
              for lr in (0.1, 0.2) for s in range(3)]
    return tidy_frame(trials, study="g")


def test_grid_tables_one_per_metric_rows_are_cells():
    frame = grid_frame()
    study = study_of(frame, "g", axes=["lr"], spec={"grid": {"lr": [0.1, 0.2]}})
    (table,) = grid_tables(study, StudyStats(study), cfg())
    assert table.title == "test Accuracy vs lr"
    assert list(table.frame.columns) == ["lr", "base", "Good"] and table.frame["lr"].tolist() == ["0.1", "0.2"]
    for _, row in table.frame.iterrows():
        lr = float(row["lr"])
        assert row["base"] == interval([0.7 + lr / 2 + s / 100 for s in range(3)])
        assert row["Good"] == interval([0.65 + lr + s / 50 for s in range(3)])
    head = headline_table(study, StudyStats(study), cfg()).frame
    assert list(head.columns) == ["lr", "Method", "Accuracy"] and head[["lr", "Method"]].values.tolist() == [
        ["0.1", "base"], ["0.1", "Good"], ["0.2", "base"], ["0.2", "Good"]]


def test_a_swept_study_shows_only_the_eval_axes_its_entry_declares():
    frame = grid_frame()
    declared = study_of(frame, "g", axes=["lr"], spec={"grid": {"lr": [0.1, 0.2]}, "eval": {"k": [1, 5]}})
    assert eval_signatures(declared, cfg()) == {("k",): ["good"]}
    (table,) = eval_tables(declared, StudyStats(declared), cfg())
    assert list(table.frame.columns) == ["lr", "k", "Good"]
    assert table.frame[["lr", "k"]].values.tolist() == [["0.1", "1"], ["0.1", "5"], ["0.2", "1"], ["0.2", "5"]]
    assert table.frame["Good"].tolist() == ["0.7000 ± 0.0000 (n=3)", "0.7500 ± 0.0000 (n=3)",
                                            "0.8000 ± 0.0000 (n=3)", "0.8500 ± 0.0000 (n=3)"]
    undeclared = study_of(frame, "g", axes=["lr"], spec={"grid": {"lr": [0.1, 0.2]}})
    assert eval_signatures(undeclared, cfg()) == {} and eval_tables(undeclared, StudyStats(undeclared), cfg()) == []


def test_baseline_table_pairs_within_each_cell():
    study = study_of(grid_frame(), "g", axes=["lr"])
    table = baseline_table(study, cfg(headline_metrics=["acc"]))
    assert table.frame[["lr", "Method", "Metric"]].values.tolist() == [["0.1", "Good", "Accuracy"], ["0.2", "Good", "Accuracy"]]
    for (_, row), lr in zip(table.frame.iterrows(), (0.1, 0.2)):
        d = np.array([0.65 + lr + s / 50 - (0.7 + lr / 2 + s / 100) for s in range(3)])
        assert row["A − B [95% CI]"] == diff_text(d)
    assert [r["cell"] for r in table.records] == ["lr=0.1", "lr=0.2"]


def wm_study():
    """The method comes from the trial: attention=True reports "attention", False "base"."""
    values = {("a", True): [0.70, 0.72], ("a", False): [0.60, 0.63], ("b", True): [0.80, 0.83], ("b", False): [0.75, 0.76]}
    frame = tidy_frame([(s, {"scenario": sc, "attention": att}, {f"test/{'attention' if att else 'base'}/acc": v[s]})
                        for (sc, att), v in values.items() for s in range(2)])
    return study_of(frame, "wm", axes=["scenario", "attention"]), values


def test_a_method_named_like_a_param_gets_its_own_column():
    study, values = wm_study()
    assert column(cfg(), "attention", ["scenario", "attention"]) == "attention (method)"
    assert column(cfg(), "good", ["scenario", "good"]) == "Good"  # the label is what is shown, so it decides
    assert column(cfg(), "good", ["Good"]) == "Good (method)"
    (table,) = grid_tables(study, StudyStats(study), cfg(headline_metrics=["acc"]))
    assert list(table.frame.columns) == ["scenario", "attention", "base", "attention (method)"]
    assert table.title == "test Accuracy vs scenario, attention"
    row = table.frame[(table.frame["scenario"] == "a") & (table.frame["attention"] == "True")].iloc[0]
    assert row["attention (method)"] == interval(values["a", True]) and row["base"] == "—"


def test_methods_from_different_trials_are_compared_on_shared_params():
    study, values = wm_study()
    table = baseline_table(study, cfg(headline_metrics=["acc"]))
    assert table.frame[["scenario", "attention", "Method"]].values.tolist() == [["a", "True", "attention"],
                                                                                ["b", "True", "attention"]]
    for (_, row), sc in zip(table.frame.iterrows(), "ab"):
        assert row["A − B [95% CI]"] == diff_text(np.subtract(values[sc, True], values[sc, False]))


# ---------------------------------------------------------------- A/B against a reference cell

AB_SEED = np.array([0.0, 0.004, -0.003, 0.002, -0.001, 0.003])
AB_ACC = {64: np.array([-0.020, -0.022, -0.019, -0.021, -0.020, -0.018]), 128: np.zeros(6),
          256: np.array([0.001, -0.002, 0.0015, -0.0005, 0.0, 0.0005])}
AB_ECE = {64: -0.010 - 0.001 * np.arange(6), 128: np.zeros(6), 256: np.array([0.001, -0.001, 0.0, 0.002, -0.002, 0.0005])}


def ab_study(seeds=6, cells=(64, 128, 256)):
    trials = [(s, {"batch_size": b, "lr": 0.1 * b / 128}, {"test/good/acc": 0.9 + AB_SEED[s] + AB_ACC[b][s],
                                                             "test/good/ece": 0.05 + AB_SEED[s] / 10 + AB_ECE[b][s]})
              for b in cells for s in range(seeds)]
    return study_of(tidy_frame(trials, study="ab"), "ab", axes=["batch_size"], derived=["lr"],
                    spec={"grid": {"batch_size": list(cells)}})


def test_ab_table_every_cell_against_the_reference():
    study = ab_study()
    table = ab_table(study, StudyStats(study), cfg())
    ref = "batch_size=128 (lr=0.1)"
    assert table.title == f"A/B: every cell against the reference {ref} (test)"
    assert list(table.frame.columns) == ["Cell", "Method", "Accuracy", "Δ Accuracy", "p Accuracy t/W (Holm)", "ECE",
                                         "Δ ECE", "p ECE t/W (Holm)"]
    assert table.frame["Cell"].tolist() == [f"{ref} (reference)", "batch_size=64 (lr=0.05)", "batch_size=256 (lr=0.2)"]
    assert set(table.frame["Method"]) == {"Good"}
    rows = table.frame.set_index("Cell")
    acc = {b: 0.9 + AB_SEED + AB_ACC[b] for b in AB_ACC}
    ece = {b: 0.05 + AB_SEED / 10 + AB_ECE[b] for b in AB_ECE}
    assert rows.loc[f"{ref} (reference)"].tolist() == ["Good", interval(acc[128]), "—", "—", interval(ece[128]), "—", "—"]
    cells = {64: "batch_size=64 (lr=0.05)", 256: "batch_size=256 (lr=0.2)"}
    raw_t = {m: [stats.ttest_rel(v[b], v[128]).pvalue for b in cells] for m, v in (("acc", acc), ("ece", ece))}
    raw_w = {m: [stats.wilcoxon(v[b] - v[128]).pvalue for b in cells] for m, v in (("acc", acc), ("ece", ece))}
    adj_t, adj_w = {m: holm(p) for m, p in raw_t.items()}, {m: holm(p) for m, p in raw_w.items()}
    for m, name, values in (("acc", "Accuracy", acc), ("ece", "ECE", ece)):
        for i, (b, label) in enumerate(cells.items()):
            assert rows.loc[label, name] == interval(values[b])
            assert rows.loc[label, f"Δ {name}"] == diff_text(values[b] - values[128])
            assert rows.loc[label, f"p {name} t/W (Holm)"] == f"{p4(adj_t[m][i])} / {p4(adj_w[m][i])}"
    d, de = acc[64] - acc[128], ece[64] - ece[128]
    p_word = lambda p: "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}"  # noqa: E731
    assert table.notes[0] == (f"**{cells[64]}** vs reference (Good): Accuracy lower (worse), "
                              f"Δ = {d.mean():+.4f}, {p_word(adj_t['acc'][0])} after Holm; "
                              f"ECE lower (better), Δ = {de.mean():+.4f}, {p_word(adj_t['ece'][0])} after Holm")
    # 256: no verdict; the seeds for 80% power at its place in Holm's order (alpha / (m - rank))
    d256 = acc[256] - acc[128]
    level = 0.05 / (1 if raw_t["acc"][1] > raw_t["acc"][0] else 2)
    n = math.ceil(TTestPower().solve_power(effect_size=abs(d256.mean()) / d256.std(ddof=1), alpha=level, power=0.8))
    acc_verdict = (f"Accuracy: no significant difference (Δ = {d256.mean():+.4f}, p = {adj_t['acc'][1]:.4f} after Holm); "
                   f"seeds for 80% power: {n} ({n - 6} more)")
    assert table.notes[1].startswith(f"**{cells[256]}** vs reference (Good): {acc_verdict}; ECE: ")
    assert table.notes[-1] == ("Δ = cell − reference over the same seeds; t = paired t-test, W = Wilcoxon signed-rank; "
                               "p-values Holm-adjusted over the 2 cells for each method and metric; significant at p < 0.05.")
    assert len(table.notes) == 3
    assert [(r["cell"], r["reference"], r["method"], r["metric"]) for r in table.records] == [
        (cells[64], ref, "good", "acc"), (cells[64], ref, "good", "ece"),
        (cells[256], ref, "good", "acc"), (cells[256], ref, "good", "ece")]
    first = table.records[0]
    assert (first["p_t_holm"], first["p_wilcoxon_holm"], first["n"]) == (pytest.approx(adj_t["acc"][0]),
                                                                        pytest.approx(adj_w["acc"][0]), 6)


def test_ab_table_with_few_seeds_names_only_the_t_test():
    study = ab_study(seeds=3)
    table = ab_table(study, StudyStats(study), cfg(headline_metrics=["acc"]))
    assert list(table.frame.columns) == ["Cell", "Method", "Accuracy", "Δ Accuracy", "p Accuracy t (Holm)"]
    acc = {b: 0.9 + AB_SEED[:3] + AB_ACC[b][:3] for b in AB_ACC}
    adj = holm([stats.ttest_rel(acc[b], acc[128]).pvalue for b in (64, 256)])
    assert table.frame["p Accuracy t (Holm)"].tolist() == ["—", p4(adj[0]), p4(adj[1])]
    assert table.notes[-1] == ("Δ = cell − reference over the same seeds; t = paired t-test; p-values Holm-adjusted "
                               "over the 2 cells for each method and metric; significant at p < 0.05.")


def test_ab_verdicts_without_a_test():
    """A cell sharing no seed with the reference, one sharing one, one identical to it."""
    trials = [(s, {"batch_size": 128}, {"test/good/acc": 0.9 + AB_SEED[s]}) for s in range(3)]
    trials += [(7, {"batch_size": 64}, {"test/good/acc": 0.5}), (0, {"batch_size": 256}, {"test/good/acc": 0.95})]
    trials += [(s, {"batch_size": 512}, {"test/good/acc": 0.9 + AB_SEED[s]}) for s in range(3)]
    study = study_of(tidy_frame(trials, study="ab"), "ab", axes=["batch_size"])
    table = ab_table(study, StudyStats(study), cfg(headline_metrics=["acc"]))
    needs = "; seeds for 80% power: n/a (n={n}: no sd of the differences yet, run at least 2 seeds)"
    assert table.notes[:3] == [
        "**batch_size=64** vs reference (Good): Accuracy: n/a (no paired seeds)" + needs.format(n=0),
        "**batch_size=256** vs reference (Good): Accuracy: n/a (n=1: no test)" + needs.format(n=1),
        "**batch_size=512** vs reference (Good): Accuracy: no difference (identical in every seed)"]
    rows = table.frame.set_index("Cell")
    assert table.records[0] == {"cell": "batch_size=64", "reference": "batch_size=128", "method": "good", "metric": "acc",
                                "n": 0, "p_t_holm": None, "p_wilcoxon_holm": None}
    assert rows.loc["batch_size=64", "Δ Accuracy"] == "n/a (no paired seeds)"
    assert rows.loc["batch_size=256", "Δ Accuracy"] == "+0.0500 (n=1, no interval)"
    assert rows.loc["batch_size=512", "p Accuracy t (Holm)"] == "n/a"


def test_two_seeds_get_a_verdict():
    study = ab_study(seeds=2)
    table = ab_table(study, StudyStats(study), cfg(headline_metrics=["acc"]))
    acc = {b: 0.9 + AB_SEED[:2] + AB_ACC[b][:2] for b in AB_ACC}
    d, p = acc[64] - acc[128], holm([stats.ttest_rel(acc[b], acc[128]).pvalue for b in (64, 256)])[0]
    assert p >= 0.05
    assert table.notes[0].startswith("**batch_size=64 (lr=0.05)** vs reference (Good): Accuracy: no significant difference "
                                     f"(Δ = {d.mean():+.4f}, p = {p:.4f} after Holm); seeds for 80% power: ")


def test_verdict_words_follow_the_metric_direction_and_alpha_is_strict():
    up, down = paired_test([0.62, 0.64, 0.63], [0.60, 0.61, 0.62]), paired_test([0.60, 0.61, 0.62], [0.62, 0.64, 0.63])
    assert _verdict("acc", up, 0.01, 0.05) == f"Accuracy higher (better), Δ = {up.diff:+.4f}, p = 0.0100 after Holm"
    assert _verdict("ece", up, 0.01, 0.05) == f"ECE higher (worse), Δ = {up.diff:+.4f}, p = 0.0100 after Holm"
    assert _verdict("acc", down, 0.01, 0.05) == f"Accuracy lower (worse), Δ = {down.diff:+.4f}, p = 0.0100 after Holm"
    assert _verdict("perf/fit_ms", down, 1e-5, 0.05) == (f"perf/fit_ms lower (better), Δ = {down.diff:+.4f}, "
                                                        "p < 0.0001 after Holm")
    assert up.diff > 0 > down.diff and f"{up.diff:+.4f}".startswith("+")
    at_alpha = _verdict("acc", up, 0.05, 0.05)  # significant means p < alpha
    assert at_alpha.startswith(f"Accuracy: no significant difference (Δ = {up.diff:+.4f}, p = 0.0500 after Holm); "
                               "seeds for 80% power: ")


def test_ab_table_without_or_with_a_missing_reference():
    study = ab_study(seeds=2, cells=(64, 256))
    assert ab_table(study, StudyStats(study), cfg(reference={})) is None
    table = ab_table(study, StudyStats(study), cfg())
    assert table.title == "A/B against the reference cell"
    assert table.frame.to_dict("records") == [{"reference": "{'batch_size': 128}", "cells": "not in the data"}]
    assert table.notes == ["the reference cell {'batch_size': 128} has no finished trials in this sweep"]
    study = ab_study(seeds=2)
    assert ab_table(study, StudyStats(study), cfg(focus=["absent"])) is None  # no focus method in the data: no rows


def test_ab_reference_matches_yaml_values_to_logged_strings():
    study = ab_study(seeds=2)
    for wanted in ({"batch_size": 128.0}, {"batch_size": 128, "lr": 0.1}):
        table = ab_table(study, StudyStats(study), cfg(reference={"ab": wanted}, headline_metrics=["acc"]))
        assert table.frame["Cell"].iloc[0] == "batch_size=128 (lr=0.1) (reference)"
    table = ab_table(study, StudyStats(study), cfg(reference={"ab": {"batch_size": 128, "lr": 0.3}}))
    assert table.title == "A/B against the reference cell"


# ---------------------------------------------------------------- drops


WIDTH_ACC = {("base", 8): [0.80, 0.82, 0.81], ("base", 16): [0.78, 0.81, 0.795], ("base", 64): [0.70, 0.73, 0.72],
             ("good", 8): [0.85, 0.86, 0.84], ("good", 16): [0.85, 0.855, 0.835], ("good", 64): [0.80, 0.84, 0.815]}


def width_study():
    trials = [(s, {"width": w}, {f"test/{m}/acc": WIDTH_ACC[m, w][s] for m in ("base", "good")})
              for w in (8, 16, 64) for s in range(3)]
    return study_of(tidy_frame(trials, study="w"), "w", axes=["width"], spec={"grid": {"width": [8, 16, 64]}})


def test_drop_table_from_the_first_value_in_numeric_order():
    table = drop_table(width_study(), cfg())
    assert table.title == "test Accuracy drop from width=8 (mean ± 95% t-interval over seeds, n)"
    assert list(table.frame.columns) == ["Method", "width=16", "width=64"]  # 8 < 16 < 64, not "16" < "64" < "8"
    rows = table.frame.set_index("Method")
    assert list(rows.index) == ["base", "Good"]
    for m, label in (("base", "base"), ("good", "Good")):
        for w in (16, 64):
            assert rows.loc[label, f"width={w}"] == interval(np.subtract(WIDTH_ACC[m, 8], WIDTH_ACC[m, w]))
    assert table.notes == ["drop = Accuracy at width=8 minus at the column's value, per seed (same seed in both cells); "
                           "positive = the metric fell."]


def test_no_drop_table_without_its_param_or_metrics():
    study = width_study()
    assert drop_table(study, cfg(drops={})) is None
    assert drop_table(study, cfg(drops={"w": "depth"})) is None  # not one of the study's axes
    assert drop_table(study, cfg(headline_metrics=["nll"])) is None


# ---------------------------------------------------------------- search studies and the best configuration


def tune_study(n=12, **kw):
    trials = [(0, {"lr": round(0.01 * (i + 1), 2)}, {"val/good/acc": 0.5 + 0.037 * ((i * 5) % n) / n,
                                                      **({"test/good/acc": 0.4 + i / 100} if i % 2 else {})})
              for i in range(n)]
    return study_of(tidy_frame(trials, study="t"), "t", axes=["lr"], spec={"space": {"lr": {"loguniform": [0.001, 1]}}}), trials


def test_ranking_table_lists_the_best_trials_by_the_objective():
    study, trials = tune_study()
    table = ranking_table(study, cfg(headline_metrics=["acc", "ece"]))
    ranked = sorted(trials, key=lambda t: -t[2]["val/good/acc"])[:RANKED_TRIALS]
    assert RANKED_TRIALS == 10 and len(table.frame) == 10
    assert table.title == "best 10 of 12 trials by val/good/acc (max); single runs, n = 1 each"
    assert list(table.frame.columns) == ["seed", "lr", "val/good/acc", "test Accuracy"]  # no trial has ECE
    assert table.frame["lr"].tolist() == [str(t[1]["lr"]) for t in ranked]
    assert table.frame["val/good/acc"].tolist() == [f"{t[2]['val/good/acc']:.4f}" for t in ranked]
    assert table.frame["test Accuracy"].tolist() == [f"{t[2]['test/good/acc']:.4f}" if "test/good/acc" in t[2] else "—"
                                                     for t in ranked]
    assert table.frame["seed"].tolist() == ["0"] * 10
    low = ranking_table(study, cfg(objective={"metric": "val/good/acc", "mode": "min"}, headline_metrics=["acc"]))
    assert low.frame["lr"].tolist() == [str(t[1]["lr"]) for t in sorted(trials, key=lambda t: t[2]["val/good/acc"])[:10]]
    assert low.title.startswith("best 10 of 12 trials by val/good/acc (min)")
    small, _ = tune_study(n=3)
    assert ranking_table(small, cfg()).title.startswith("best 3 of 3 trials")
    assert ranking_table(small, cfg(objective={"metric": "val/zz/acc"})) is None


def test_ranking_defaults_to_max():
    study, trials = tune_study()
    table = ranking_table(study, cfg(objective={"metric": "val/good/acc"}))
    best = max(trials, key=lambda t: t[2]["val/good/acc"])
    assert table.frame["lr"].iloc[0] == str(best[1]["lr"]) and "(max)" in table.title


def best_studies(dataset="digits"):
    """h: no swept params, objective mean 0.70; g: lr 0.1 -> 0.72, lr 0.2 -> 0.68 (3 seeds each)."""
    h = tidy_frame([(s, {}, {"val/good/acc": 0.70 + d, "test/good/acc": 0.6 + d}) for s, d in enumerate((-0.01, 0, 0.01))],
                   study="h", dataset=dataset)
    g = tidy_frame([(s, {"lr": lr}, {"val/good/acc": mean + d, "test/good/ece": 0.1 + d})
                    for lr, mean in ((0.1, 0.72), (0.2, 0.68)) for s, d in enumerate((-0.02, 0, 0.02))],
                   study="g", dataset=dataset)
    return StudyStats(study_of(h, "h", changed={"epochs": "2"})), StudyStats(study_of(g, "g", axes=["lr"]))


def test_best_configuration_is_the_best_mean_across_studies():
    h, g = best_studies()
    best = best_configuration([h, g], cfg())
    assert best == {"Study": "g", "Configuration": "lr=0.1", "Dataset": "digits",
                    "val/good/acc (max)": interval([0.70, 0.72, 0.74]), "test ECE": interval([0.08, 0.10, 0.12])}
    worst = best_configuration([h, g], cfg(objective={"metric": "val/good/acc", "mode": "min"}))
    assert (worst["Study"], worst["Configuration"]) == ("g", "lr=0.2")
    assert list(worst) == ["Study", "Configuration", "Dataset", "val/good/acc (min)", "test ECE"]
    only_h = best_configuration([h], cfg())
    assert only_h == {"Study": "h", "Configuration": "epochs=2", "Dataset": "digits",
                      "val/good/acc (max)": interval([0.69, 0.70, 0.71]), "test Accuracy": interval([0.59, 0.60, 0.61])}
    assert best_configuration([h, g], cfg(objective={"metric": "val/zz/acc", "mode": "max"})) is None


def test_best_configuration_tie_goes_to_the_first_in_order():
    first, second = (StudyStats(study_of(tidy_frame([(0, {}, {"val/good/acc": 0.7})], study=n), n)) for n in ("p", "q"))
    for mode in ("max", "min"):
        assert best_configuration([first, second], cfg(objective={"metric": "val/good/acc", "mode": mode}))["Study"] == "p"


def test_best_configuration_names_defaults_and_an_unknown_dataset():
    h, _ = best_studies(dataset="")
    plain = StudyStats(study_of(h.study.frame, "h"))
    best = best_configuration([plain], cfg(objective={"metric": "val/good/acc"}))
    assert (best["Configuration"], best["Dataset"]) == ("defaults", "?")
    assert "val/good/acc (max)" in best
    changed = StudyStats(study_of(best_studies()[1].study.frame, "g", axes=["lr"], changed={"epochs": "2", "noise": "0.1"}))
    row = best_configuration([changed], cfg())
    assert row["Configuration"] == "lr=0.1; epochs=2, noise=0.1"
    mixed = pd.concat([tidy_frame([(0, {}, {"val/good/acc": 0.7})], sweep=sweep, dataset=dataset)
                       for sweep, dataset in (("a", "digits"), ("b", "cifar10"), ("c", ""))], ignore_index=True)
    mixed = StudyStats(study_of(mixed, "m"))
    assert best_configuration([mixed], cfg())["Dataset"] == "cifar10, digits"
