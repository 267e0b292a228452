"""The report's data model (orchestrator/report_data.py) on small synthetic inputs: metric keys,
the tidy frame MLflow runs become (a file-backed MLflow store, ~0.1 s), which sweep and which
params a study is reported from, and mean ± 95% t-intervals per cell against scipy, clipped to
the bounds in trainables.common.metrics.METRICS. These are the fast tests bench/mutation.py runs
against report_data.py; the report built from a real SQLite store is tests/test_report.py's job."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrator.report_data import (CLIPPED_TEXT, NO_INTERVAL, Interval, StudyRuns, StudyStats, axis_items,
                                      chosen_sweeps, load_runs, number_or_none, order_key, select_studies, split_key,
                                      typed)
from trainables.common.metrics import METRICS


def scipy_interval(values):
    """(mean, low, high) of the two-sided 95% Student-t interval, unclipped."""
    mean = float(np.mean(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return mean, float(low), float(high)


def frame_of(runs: list[dict]) -> pd.DataFrame:
    """What load_runs returns for these runs (checked against a real store in
    test_load_runs_reads_a_real_store_into_the_synthetic_shape): one row per (run, metric key),
    params as strings in ``param.<name>`` columns, "" where a run lacks one, one row with key ""
    for a run without metrics."""
    rows = []
    for r in runs:
        params = {"seed": str(r["seed"]), **{k: str(v) for k, v in r.get("params", {}).items()}}
        base = {"run_id": r["id"], "sweep_id": r.get("sweep", "w1"), "study": r.get("study", "s"),
                "status": r.get("status", "finished"), "seed": str(r["seed"]), "dataset": "digits",
                "start_time": r.get("start", 0), **{f"param.{k}": v for k, v in params.items()}}
        metrics = r.get("metrics", {})
        for key, value in metrics.items():
            split, method, axes, metric = split_key(key)
            rows.append({**base, "key": key, "split": split, "method": method, "axes": axes, "metric": metric,
                         "value": value})
        if not metrics:
            rows.append({**base, "key": "", "split": "", "method": "", "axes": "", "metric": "", "value": math.nan})
    frame = pd.DataFrame(rows)
    params = [c for c in frame.columns if c.startswith("param.")]
    frame[params] = frame[params].fillna("")
    return frame


def study_of(runs: list[dict], doc: dict | None = None, name: str = "s") -> StudyRuns:
    frame = frame_of(runs)
    doc = doc or {"family": "fam", "studies": {name: {}}}
    return select_studies(frame, doc, chosen_sweeps(frame))[0]


# ---------------------------------------------------------------- metric keys and values


def test_split_key_parts_of_contract_keys_and_prefixed_keys():
    assert split_key("test/attn_knn/acc") == ("test", "attn_knn", "", "acc")
    # axes in logged order, as name=value pairs (what tables and plots group by)
    assert split_key("val/attn_knn:k:20:tta_views:5/ece") == ("val", "attn_knn", "k=20,tta_views=5", "ece")
    assert split_key("perf/epoch_s") == ("perf", "", "", "epoch_s")
    assert split_key("info/n_train") == ("info", "", "", "n_train")
    assert split_key("info/bank/size") == ("info", "", "", "bank/size")  # only the first slash splits
    for bookkeeping in ("epoch", "diverged", "perf/", "perf", "other/thing", "test/m:k/acc", "extra/a/b"):
        assert split_key(bookkeeping) is None, bookkeeping


def test_typed_turns_numeric_param_strings_into_numbers_of_the_right_kind():
    assert typed("20") == 20 and type(typed("20")) is int
    assert typed("-3") == -3 and type(typed("-3")) is int
    # a value logged with a point or an exponent stays a float: 20.0 and 2e1 were floats in the config
    for text, number in (("20.0", 20.0), ("0.05", 0.05), ("1e-3", 1e-3), ("2e1", 20.0), ("2E1", 20.0)):
        assert typed(text) == number and type(typed(text)) is float, text
    assert typed("resnet18") == "resnet18" and typed("True") == "True"
    assert typed(None) is None and typed(["a"]) == ["a"]
    assert typed(7) == 7 and type(typed(7)) is int
    assert math.isinf(typed("inf")) and math.isnan(typed("nan"))


def test_order_key_puts_numbers_in_numeric_order_before_strings():
    values = ["b", "10", "9", "a", "0.5", "-1", "B"]
    assert sorted(values, key=order_key) == ["-1", "0.5", "9", "10", "B", "a", "b"]
    assert order_key("2") == order_key("2.0") == order_key(2)  # one value however it was typed


def test_axis_items_are_name_value_pairs_in_order():
    assert axis_items("k=20,tta_views=5") == [("k", "20"), ("tta_views", "5")]
    assert axis_items("") == []
    assert axis_items("mode=a=b") == [("mode", "a=b")]  # a value may hold "="; the name may not


def test_number_or_none_maps_missing_to_none_and_keeps_numbers():
    assert number_or_none(None) is None and number_or_none(math.nan) is None
    assert number_or_none(np.float64("nan")) is None
    assert number_or_none(0.0) == 0.0 and number_or_none(3) == 3 and number_or_none(-0.5) == -0.5


# ---------------------------------------------------------------- intervals


@pytest.mark.parametrize("values", [[0.80, 0.82, 0.81], [0.50, 0.52], [0.1, 0.4, 0.35, 0.2, 0.3]])
def test_interval_equals_scipy_t_interval_inside_the_bounds(values):
    iv = Interval.of(values, "test/m/acc")
    mean, low, high = scipy_interval(values)
    assert (iv.n, iv.clipped) == (len(values), False)
    assert iv.mean == pytest.approx(mean, abs=1e-12)
    assert iv.low == pytest.approx(low, abs=1e-12) and iv.high == pytest.approx(high, abs=1e-12)
    assert iv.half == pytest.approx((high - low) / 2, abs=1e-12)
    assert iv.text() == f"{mean:.4f} ± {(high - low) / 2:.4f} (n={len(values)})"


def test_interval_is_clipped_to_each_metrics_bounds_and_says_so():
    acc = [0.99, 1.0, 0.97]  # the t-interval reaches past 1
    mean, low, high = scipy_interval(acc)
    iv = Interval.of(acc, "test/m:k:5/acc")
    assert high > 1 and iv.clipped and iv.high == METRICS["acc"].high and iv.low == pytest.approx(low)
    assert iv.half == pytest.approx(mean - low)  # a clipped interval's half-width is its larger side
    assert iv.text() == f"{mean:.4f} [{low:.4f}, 1.0000] (n=3)" and CLIPPED_TEXT.match(iv.text())
    ece = [0.001, 0.02, 0.003]  # ... and below 0
    mean, low, high = scipy_interval(ece)
    iv = Interval.of(ece, "test/m/ece")
    assert low < 0 and iv.clipped and iv.low == 0.0 and iv.high == pytest.approx(high)
    assert iv.half == pytest.approx(high - mean)
    wide = Interval.of([0.0, 1.0, 0.5], "val/m/balanced_acc")  # past both bounds
    assert wide.clipped and (wide.low, wide.high) == (0.0, 1.0)
    brier = [0.1, 1.9, 1.95]  # Brier's upper bound is 2, not 1
    _, low, high = scipy_interval(brier)
    iv = Interval.of(brier, "test/m/brier")
    assert iv.clipped and (iv.low, iv.high) == (0.0, 2.0) and low < 0 < 2 < high
    inside = Interval.of([1.4, 1.5, 1.6], "test/m/brier")  # above 1 but inside Brier's [0, 2]
    assert not inside.clipped and inside.high == pytest.approx(scipy_interval([1.4, 1.5, 1.6])[2])


def test_one_sided_and_unbounded_metrics_are_clipped_only_where_bounded():
    values = [0.01, 0.9, 0.02]  # the t-interval goes below 0 and past 1
    mean, low, high = scipy_interval(values)
    nll = Interval.of(values, "test/m/nll")  # NLL: >= 0, no upper bound
    assert nll.clipped and nll.low == 0.0 and nll.high == pytest.approx(high) and high > 1
    timing = Interval.of(values, "perf/epoch_s")  # timings: >= 0
    assert timing.clipped and timing.low == 0.0 and timing.high == pytest.approx(high)
    for key in ("train/m/loss", "test/m/unknown_metric", "info/n_train"):  # no bounds at all
        iv = Interval.of(values, key)
        assert not iv.clipped and iv.low == pytest.approx(low) and iv.high == pytest.approx(high), key
        assert math.isclose(iv.high - iv.mean, iv.mean - iv.low)


def test_values_on_a_bound_are_not_clipped():
    for values, key, text in (([1.0, 1.0, 1.0], "test/m/acc", "1.000 ± 0.000 (n=3)"),
                              ([0.0, 0.0], "test/m/ece", "0.0000 ± 0.0000 (n=2)"),
                              ([0.0, 0.0, 0.0], "perf/x_s", "0.0000 ± 0.0000 (n=3)")):
        iv = Interval.of(values, key)
        assert (iv.mean, iv.low, iv.high, iv.half, iv.clipped) == (values[0], values[0], values[0], 0.0, False), key
        assert iv.text() == text


def test_fewer_than_two_values_have_no_interval():
    one = Interval.of([0.7], "test/m/acc")
    assert (one.mean, one.n, one.clipped) == (0.7, 1, False) and math.isnan(one.low) and math.isnan(one.high)
    assert math.isnan(one.half) and one.text() == "0.7000 (n=1, no interval)"
    none = Interval.of([], "test/m/acc")
    assert none.n == 0 and math.isnan(none.mean) and none.text() == "—" == NO_INTERVAL.text()
    assert NO_INTERVAL.n == 0 and not NO_INTERVAL.clipped
    nan_dropped = Interval.of([0.6, math.nan, None], "test/m/acc")  # a missing value is no seed
    assert nan_dropped.n == 1 and nan_dropped.mean == 0.6


def test_clipped_text_uses_the_decimals_of_the_mean():
    values = [150.0, 160.0, 1.0]  # a timing in seconds: one decimal at >= 100
    mean, low, high = scipy_interval(values)
    iv = Interval.of(values, "perf/epoch_s")
    assert mean >= 100 and low < 0 and iv.text() == f"{mean:.1f} [0.0, {high:.1f}] (n=3)"
    assert CLIPPED_TEXT.match(iv.text()) and not CLIPPED_TEXT.match(Interval.of([0.50, 0.52], "test/m/acc").text())


# ---------------------------------------------------------------- a study's runs

RUNS = [  # study s, grid over k with lr derived from it, three seeds; one failed trial
    {"id": f"r{k}{seed}", "seed": seed, "params": {"k": k, "lr": 0.1 * k, "C": 0.05, "dataset": "digits"},
     "metrics": {"test/m/acc": acc, "test/m/ece": 0.01 * k + 0.001 * seed}}
    for k, accs in ((1, [0.80, 0.82, 0.81]), (10, [0.90, 0.91, 0.95]), (2, [0.85, 0.86, 0.84]))
    for seed, acc in enumerate(accs)
] + [{"id": "bad", "seed": 3, "status": "failed", "params": {"k": 10, "lr": 1.0, "C": 0.05, "dataset": "digits"}}]
DOC = {"family": "fam", "defaults": {"k": 5, "lr": 0.1, "C": 1.0, "dataset": "digits"},
       "studies": {"s": {"grid": {"k": [1, 2, 10]}, "derive": {"lr": {"rule": "linear"}}}}}


def test_study_axes_derived_params_cells_and_labels():
    study = study_of(RUNS, DOC)
    assert (study.name, study.axes, study.derived, study.cell_params) == ("s", ["k"], ["lr"], ["k", "lr"])
    # cells in numeric order (1, 2, 10), not string order; one per combination, not per run
    assert study.cells() == [("1", "0.1"), ("2", "0.2"), ("10", "1.0")]
    assert study.cell_dict(("2", "0.2")) == {"k": "2", "lr": "0.2"}
    assert study.label(("2", "0.2")) == "k=2 (lr=0.2)" and study.label(()) == "all trials"
    assert study.counts == {"finished": 9, "failed": 1}  # per run, not per metric row
    assert study.failed == ["k=10 (lr=1.0) seed 3: failed"]
    assert set(study.frame["status"]) == {"finished"} and study.frame["run_id"].nunique() == 9
    assert study.changed == {"C": "0.05"}  # dataset is the default; k and lr are cell params
    assert not study.is_search and study.spec == DOC["studies"]["s"]
    assert study.source == "fam.yaml as it is now" and study.record is None


def test_study_labels_with_axes_only_derived_only_and_several_axes():
    runs = [{"id": f"r{a}{b}{s}", "seed": s, "params": {"a": a, "b": b}, "metrics": {"test/m/acc": 0.5}}
            for a in (1, 2) for b in ("x", "y") for s in (0, 1)]
    study = study_of(runs, {"studies": {"s": {"grid": {"b": ["x", "y"], "a": [1, 2]}}}})
    assert study.axes == ["b", "a"] and study.derived == []  # YAML grid order, not column order
    assert study.cells() == [("x", "1"), ("x", "2"), ("y", "1"), ("y", "2")]
    assert study.label(("x", "2")) == "b=x, a=2"
    study.axes, study.derived = [], ["b", "a"]
    assert study.label(("x", "2")) == "b=x, a=2"
    assert study.source == "the family.yaml as it is now"  # a doc without a family name


def test_params_that_vary_but_are_not_declared_become_axes_after_the_declared_ones():
    runs = [{"id": f"r{k}{z}{y}", "seed": 0, "params": {"k": k, "z": z, "y": y}, "metrics": {"test/m/acc": 0.5}}
            for k in (1, 2) for z in (1, 2) for y in ("p", "q")]
    study = study_of(runs, {"studies": {"s": {"space": {"z": {"choice": [1, 2]}}}}})
    assert study.axes == ["z", "k", "y"] and study.is_search  # the space's params first, then the rest by name
    study = study_of(runs, {"studies": {"s": {"grid": {"z": [1, 2]}, "space": {"y": {"choice": ["p", "q"]}}}}})
    assert study.axes == ["z", "y", "k"]
    # only finished trials decide what varies: a param that differs in a failed trial alone is no axis
    runs = [{"id": f"r{s}", "seed": s, "params": {"k": 1}, "metrics": {"test/m/acc": 0.5}} for s in (0, 1)]
    runs.append({"id": "bad", "seed": 2, "status": "diverged", "params": {"k": 2}})
    study = study_of(runs)
    assert study.axes == [] and study.cells() == [()] and study.label(()) == "all trials"
    assert study.failed == ["seed 2: diverged"] and study.counts == {"finished": 2, "diverged": 1}


def test_changed_lists_only_shared_params_that_differ_from_the_defaults():
    runs = [{"id": f"r{s}", "seed": s, "params": {"lr": "0.10", "C": "0.05", "flag": "True", "mode": "b",
                                                  "width": 64, "var": s, "absent": ""},
             "metrics": {"test/m/acc": 0.5}} for s in (0, 1)]
    # the skipped ones first: each skip moves on to the next default
    defaults = {"var": 0, "unlogged": 1, "absent": 3, "lr": 0.1, "C": 1.0, "flag": True, "mode": "a", "width": 64,
                "nan": math.nan}
    runs[0]["params"]["nan"] = runs[1]["params"]["nan"] = "nan"
    study = study_of(runs, {"defaults": defaults, "studies": {"s": {}}})
    # lr 0.10 == 0.1, flag "True" == True, width "64" == 64, nan is logged as the default's text;
    # var differs between trials (an axis, not a setting); absent/unlogged: never logged
    assert study.changed == {"C": "0.05", "mode": "b"}
    assert study.axes == ["var"]
    one = study_of([{"id": "r0", "seed": 0, "params": {"C": "0.05"}, "metrics": {"test/m/acc": 0.5}}],
                   {"defaults": {"C": 1.0}, "studies": {"s": {}}})
    assert one.changed == {"C": "0.05"}  # a single-seed study has settings too


def test_chosen_sweeps_take_the_latest_sweep_with_a_finished_trial():
    frame = frame_of([
        {"id": "a1", "seed": 0, "sweep": "old", "start": 100, "metrics": {"test/m/acc": 0.1}},
        {"id": "a2", "seed": 1, "sweep": "old", "start": 400, "metrics": {"test/m/acc": 0.1}},  # a late resume
        {"id": "b1", "seed": 0, "sweep": "new", "start": 200, "metrics": {"test/m/acc": 0.2}},
        {"id": "c1", "seed": 0, "sweep": "crashed", "start": 300, "status": "failed"},
        {"id": "d1", "seed": 0, "study": "t", "sweep": "t1", "start": 50, "status": "failed"},
        {"id": "d2", "seed": 0, "study": "t", "sweep": "t2", "start": 60, "status": "running"},
    ])
    # sweeps ordered by their first trial's start; "crashed" started last but finished nothing
    assert chosen_sweeps(frame) == {"s": (["new"], ["old", "crashed"]), "t": (["t2"], ["t1"])}
    assert chosen_sweeps(frame, "old") == {"s": (["old"], ["new", "crashed"]), "t": (["old"], ["t1", "t2"])}


def test_select_studies_keeps_the_chosen_sweeps_in_yaml_order_with_their_saved_settings():
    runs = [{"id": f"{st}{sw}{s}", "seed": s, "study": st, "sweep": f"{st}-{sw}", "start": 10 * sw + s,
             "params": {"k": 1 + sw}, "metrics": {"test/m/acc": 0.5 + 0.1 * sw}}
            for st in ("zeta", "beta", "extra2", "extra1") for sw in (1, 2) for s in (0, 1)]
    frame = frame_of(runs)
    doc = {"family": "fam", "defaults": {"k": 1}, "studies": {"zeta": {}, "beta": {"seeds": 2}}}
    saved = {"family": "fam", "defaults": {"k": 3}, "studies": {"beta": {"seeds": 9}}}
    records = {"beta-2": {"sweep_id": "beta-2", "family_doc": saved}, "zeta-1": {"sweep_id": "zeta-1", "family_doc": {}}}
    studies = select_studies(frame, doc, chosen_sweeps(frame), records)
    # YAML order first; studies the YAML no longer has after them, by name
    assert [s.name for s in studies] == ["zeta", "beta", "extra1", "extra2"]
    zeta, beta, extra1, _ = studies
    assert set(beta.frame["sweep_id"]) == {"beta-2"} and beta.sweeps == ["beta-2"] and beta.ignored == ["beta-1"]
    assert beta.record is records["beta-2"] and beta.doc is saved and beta.spec == {"seeds": 9}
    assert beta.source == "study.json of sweep beta-2"
    assert beta.changed == {}  # against the saved defaults (k 3), not the YAML's (k 1)
    assert zeta.record is None and zeta.doc is doc and zeta.changed == {"k": "3"}  # zeta-1 was not chosen
    assert extra1.spec == {} and extra1.changed == {"k": "3"}
    assert select_studies(frame, {"studies": None}, chosen_sweeps(frame))[0].spec == {}


# ---------------------------------------------------------------- statistics per cell


def test_study_stats_per_cell_and_key_against_scipy_and_numpy():
    study = study_of(RUNS, DOC)
    st = StudyStats(study)
    for k, lr, accs in (("1", "0.1", [0.80, 0.82, 0.81]), ("10", "1.0", [0.90, 0.91, 0.95])):
        iv = st.get((k, lr), "test/m/acc")
        mean, low, high = scipy_interval(accs)
        assert (iv.n, iv.clipped) == (3, False) and iv.mean == pytest.approx(mean)
        assert iv.low == pytest.approx(low) and iv.high == pytest.approx(high)
        assert st.sd[((k, lr), "test/m/acc")] == pytest.approx(np.std(accs, ddof=1))
        assert st.text((k, lr), "test/m/acc") == iv.text()
    assert len(st.table) == 6  # 3 cells x 2 keys; the failed trial's row has no key
    assert st.get(("5", "0.5"), "test/m/acc") is NO_INTERVAL and st.text(("1", "0.1"), "test/m/nll") == "—"


def test_study_stats_without_cell_params_drop_missing_values_and_unlogged_runs():
    runs = [{"id": f"r{s}", "seed": s, "metrics": {"test/m/acc": v, "perf/epoch_s": 2.0 + s}}
            for s, v in enumerate([0.7, 0.75, math.nan, 0.8])]
    runs.append({"id": "quiet", "seed": 9})  # finished, logged no metric
    st = StudyStats(study_of(runs))
    acc = st.get((), "test/m/acc")
    mean, low, high = scipy_interval([0.7, 0.75, 0.8])
    assert acc.n == 3 and acc.mean == pytest.approx(mean) and acc.low == pytest.approx(low)
    assert st.sd[((), "test/m/acc")] == pytest.approx(np.std([0.7, 0.75, 0.8], ddof=1))
    assert set(st.table) == {((), "test/m/acc"), ((), "perf/epoch_s")}
    single = StudyStats(study_of([{"id": "r0", "seed": 0, "metrics": {"test/m/acc": 0.6}}]))
    assert math.isnan(single.sd[((), "test/m/acc")]) and single.get((), "test/m/acc").n == 1
    two = StudyStats(study_of([{"id": f"r{s}", "seed": s, "metrics": {"test/m/acc": v}} for s, v in enumerate([0.6, 0.7])]))
    assert two.sd[((), "test/m/acc")] == pytest.approx(np.std([0.6, 0.7], ddof=1))


def test_study_stats_records_carry_every_field_a_csv_row_needs():
    runs = [{"id": f"r{k}{s}", "seed": s, "params": {"k": k}, "metrics": {"test/m:t:2/acc": v, "test/m/ece": e}}
            for k, vals in ((1, [(0.99, 0.001), (1.0, 0.02), (0.97, 0.003)]), (2, [(0.5, 0.1)]))
            for s, (v, e) in enumerate(vals)]
    study = study_of(runs, {"studies": {"s": {"grid": {"k": [1, 2]}}}})
    study.sweeps = ["w1", "w2"]
    records = {(r["cell"], r["key"]): r for r in StudyStats(study).records("fam")}
    assert len(records) == 4
    acc = records[("k=1", "test/m:t:2/acc")]
    mean, low, _ = scipy_interval([0.99, 1.0, 0.97])
    assert {k: acc[k] for k in ("family", "study", "sweep", "split", "method", "axes", "metric", "n", "ci_clipped")} == {
        "family": "fam", "study": "s", "sweep": "w1,w2", "split": "test", "method": "m", "axes": "t=2",
        "metric": "acc", "n": 3, "ci_clipped": True}
    assert acc["mean"] == pytest.approx(mean) and acc["ci_low"] == pytest.approx(low) and acc["ci_high"] == 1.0
    assert acc["sd"] == pytest.approx(np.std([0.99, 1.0, 0.97], ddof=1))
    one = records[("k=2", "test/m/ece")]
    assert (one["n"], one["mean"], one["sd"], one["ci_low"], one["ci_high"], one["ci_clipped"]) == (
        1, 0.1, None, None, None, False)


# ---------------------------------------------------------------- load_runs on a real (file-backed) MLflow store


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A file-backed store (~0.1 s; a new SQLite store runs its migrations for seconds)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    return uri, MlflowClient(uri)


def make_run(client, exp, tags, params, metrics, status="FINISHED", start=None):
    run = client.create_run(exp, tags=tags, start_time=start)
    for k, v in params.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in metrics.items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_load_runs_reads_a_real_store_into_the_synthetic_shape(store):
    uri, client = store
    exp = client.create_experiment("fam")
    trial = {"role": "trial", "study": "s", "sweep_id": "w1", "dataset": "digits"}
    ids = [make_run(client, exp, {**trial, "status": "finished"}, {"seed": str(s), "k": "5"},
                   {"test/m:k:5/acc": 0.8 + 0.01 * s, "perf/epoch_s": 1.5, "epoch": 3}, start=1000 + s) for s in (0, 1)]
    ids.append(make_run(client, exp, {**trial, "status": "finished"}, {"seed": "2"}, {}, start=1002))  # no metrics
    make_run(client, exp, {"role": "sweep", "study": "s", "sweep_id": "w1"}, {}, {"test/m/acc": 0.0})  # the parent
    other = client.create_experiment("other")
    make_run(client, other, {**trial, "status": "finished"}, {"seed": "0"}, {"test/m/acc": 0.0})
    got = load_runs(uri, "fam")
    want = frame_of([{"id": ids[s], "seed": s, "start": 1000 + s, "params": {"k": "5"},
                      "metrics": {"test/m:k:5/acc": 0.8 + 0.01 * s, "perf/epoch_s": 1.5}} for s in (0, 1)]
                    + [{"id": ids[2], "seed": 2, "start": 1002}])
    order = ["run_id", "key"]
    got = got.sort_values(order).reset_index(drop=True)
    want = want.sort_values(order).reset_index(drop=True)
    assert sorted(got.columns) == sorted(want.columns)
    pd.testing.assert_frame_equal(got[want.columns], want, check_dtype=False)


def test_load_runs_filters_by_study_and_sweep_and_reads_status_and_seed_fallbacks(store):
    uri, client = store
    exp = client.create_experiment("fam")
    base = {"role": "trial", "dataset": "digits"}
    run = {}
    run["tagged"] = make_run(client, exp, {**base, "study": "s", "sweep_id": "w1", "status": "diverged"},
                             {"seed": "0"}, {"test/m/acc": 0.1, "diverged": 1.0})  # only bookkeeping beside acc
    run["finished"] = make_run(client, exp, {**base, "study": "s", "sweep_id": "w2", "seed": "7"}, {}, {"epoch": 1})
    run["failed"] = make_run(client, exp, {**base, "study": "t", "sweep_id": "w2"}, {"seed": "1"}, {}, status="FAILED")
    make_run(client, exp, {"role": "sweep", "study": "s", "sweep_id": "w2"}, {}, {"test/m/acc": 0.0})  # a parent run
    run["bare"] = make_run(client, exp, {"role": "trial"}, {}, {"test/m/acc": 0.3})  # logged by hand: no tags
    frame = load_runs(uri, "fam")
    by_run = frame.drop_duplicates("run_id").set_index("run_id")
    assert by_run.loc[run["tagged"], "status"] == "diverged"  # the runner's status tag wins
    assert by_run.loc[run["finished"], "status"] == "finished"  # no tag: MLflow's FINISHED
    assert by_run.loc[run["failed"], "status"] == "failed"  # no tag: MLflow's status, lower case
    assert by_run.loc[run["finished"], "seed"] == "7"  # no seed param: the seed tag
    assert by_run.loc[run["tagged"], "dataset"] == "digits"
    # a run whose metrics are all bookkeeping still has its row, with no key
    assert frame.loc[frame["run_id"] == run["finished"], "key"].tolist() == [""]
    assert frame.loc[frame["run_id"] == run["tagged"], "key"].tolist() == ["test/m/acc"]
    assert frame["run_id"].nunique() == 4  # trials only: never the sweep's parent run
    bare = by_run.loc[run["bare"]]
    assert (bare["sweep_id"], bare["study"], bare["seed"], bare["dataset"]) == ("", "", "", "")  # text, never None
    assert set(load_runs(uri, "fam", study="s")["run_id"]) == {run["tagged"], run["finished"]}
    assert set(load_runs(uri, "fam", sweep_id="w2")["run_id"]) == {run["finished"], run["failed"]}
    assert set(load_runs(uri, "fam", study="s", sweep_id="w2")["run_id"]) == {run["finished"]}
    assert frame.loc[frame["run_id"] == run["finished"], "param.seed"].tolist() == [""]  # a param it never logged


def test_load_runs_reads_every_page_of_a_family_with_more_runs_than_one_request_returns(store, monkeypatch):
    """MLflow returns at most max_results runs per request; a family with more trial runs than
    that is read page by page, none dropped (pages of 2 here, for 1,000 in use)."""
    import orchestrator.tracking as tracking

    uri, client = store
    exp = client.create_experiment("fam")
    ids = {make_run(client, exp, {"role": "trial", "study": "s"}, {"seed": str(s)}, {"test/m/acc": s / 10}) for s in range(5)}
    monkeypatch.setattr(tracking, "RUNS_PER_PAGE", 2)
    frame = load_runs(uri, "fam")
    assert set(frame["run_id"]) == ids and len(frame) == 5
    assert sorted(frame["value"]) == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_load_runs_of_a_family_without_trials_is_an_empty_frame_with_the_columns(store):
    uri, client = store
    columns = ["run_id", "sweep_id", "study", "status", "seed", "dataset", "start_time", "key", "split", "method",
               "axes", "metric", "value"]
    missing = load_runs(uri, "nobody")
    assert missing.empty and list(missing.columns) == columns
    exp = client.create_experiment("fam")
    make_run(client, exp, {"role": "sweep"}, {}, {})
    empty = load_runs(uri, "fam")
    assert empty.empty and list(empty.columns) == columns
    assert load_runs(uri, "fam", study="none").empty
