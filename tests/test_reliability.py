"""Reliability diagrams' data (orchestrator/reliability.py) on small synthetic artifacts: per-bin
means over seeds and the 95% t-band of the accuracy against numpy and scipy, bins empty in
some or every seed, the ECE the bins give against a direct computation from the probabilities,
runs whose logged ECE disagrees with their bins, method order, the before/after pairs of eval
axes, and reading the artifacts back from a (file-backed) MLflow store. These are the fast tests
bench/mutation.py runs against reliability.py; tests/test_reliability_report.py is the end-to-end
check through a real SQLite store, the report and a Ray sweep."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrator.reliability import ARTIFACT, Diagram, diagrams, pairs, read_artifacts
from orchestrator.report_data import Interval
from trainables.common.metrics import ECE_BINS, expected_calibration_error, reliability_bins

SEEDS = ["0", "1", "2"]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def predictions(seed: int, n: int = 200, classes: int = 4, temperature: float = 1.0):
    """A classifier's probabilities that are right more often than chance, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) * 1.5 + 2.0 * np.eye(classes)[labels]
    return softmax(logits / temperature), labels


def numpy_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS):
    """Per-bin count, mean confidence and accuracy with numpy's digitize (bin b: (b/bins, (b+1)/bins])."""
    conf, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    idx = np.clip(np.digitize(conf, np.linspace(0, 1, bins + 1), right=True) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore"):
        return count, np.bincount(idx, conf, bins) / count, np.bincount(idx, correct, bins) / count


def numpy_ece(probs: np.ndarray, labels: np.ndarray) -> float:
    count, conf, acc = numpy_bins(probs, labels)
    filled = count > 0
    return float(np.sum(count[filled] / count.sum() * np.abs(acc[filled] - conf[filled])))


def entry(count, confidence, accuracy, ece=None) -> dict:
    """A hand-made reliability.json entry; its own 'ece' is the one its bins give unless told."""
    if ece is None:
        ece = sum(c / sum(count) * abs(a - f) for c, a, f in zip(count, accuracy, confidence) if c)
    return {"count": count, "confidence": confidence, "accuracy": accuracy, "ece": ece}


def artifact(methods: dict, split: str = "test", bins: int | None = 3) -> dict:
    doc = {"splits": {split: methods}}
    return doc if bins is None else {"bins": bins, **doc}


def scipy_band(values):
    mean = float(np.mean(values))
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    return max(float(low), 0.0), min(float(high), 1.0)


def test_a_diagram_is_the_mean_over_seeds_with_a_t_band_against_numpy_and_scipy():
    raw = {f"run{s}": predictions(s) for s in range(3)}
    artifacts = {run: {"bins": ECE_BINS, "splits": {"test": {"m": reliability_bins(p, y)}}} for run, (p, y) in raw.items()}
    logged = {(run, "test/m/ece"): expected_calibration_error(p, y) for run, (p, y) in raw.items()}
    (d,) = diagrams(artifacts, logged, {f"run{s}": str(s) for s in range(3)})
    assert (d.method, d.bins, d.runs, d.mismatched) == ("m", ECE_BINS, 3, [])
    per_seed = [numpy_bins(p, y) for p, y in raw.values()]
    bands = 0
    for b in range(ECE_BINS):
        filled = [(conf[b], acc[b]) for count, conf, acc in per_seed if count[b]]
        assert d.count[b] == pytest.approx(np.mean([count[b] for count, _, _ in per_seed]))  # empty seeds count 0
        if not filled:
            assert d.confidence[b] is d.accuracy[b] is d.accuracy_low[b] is d.accuracy_high[b] is None
            continue
        conf, acc = np.array(filled).T
        assert d.confidence[b] == pytest.approx(conf.mean()) and d.accuracy[b] == pytest.approx(acc.mean())
        if len(acc) < 2:
            assert d.accuracy_low[b] is None and d.accuracy_high[b] is None
        elif np.ptp(acc) > 0:
            bands += 1
            assert (d.accuracy_low[b], d.accuracy_high[b]) == pytest.approx(scipy_band(acc))
    assert bands >= 3  # the data exercise the band, not only its edge cases
    eces = [numpy_ece(p, y) for p, y in raw.values()]
    mean = np.mean(eces)
    low, high = stats.t.interval(0.95, 2, loc=mean, scale=stats.sem(eces))
    assert (d.ece.n, d.ece.mean) == (3, pytest.approx(mean))
    assert d.ece.low == pytest.approx(max(low, 0.0)) and d.ece.high == pytest.approx(min(high, 1.0))


def test_bins_empty_in_every_seed_or_filled_in_one_and_a_band_clipped_at_one():
    artifacts = {
        "a": artifact({"m": entry([0, 4, 0, 10], [None, 0.5, None, 0.95], [None, 0.25, None, 1.0])}, bins=4),
        "b": artifact({"m": entry([0, 2, 2, 10], [None, 0.4, 0.7, 0.9], [None, 0.5, 1.0, 0.9])}, bins=4),
        "c": artifact({"m": entry([0, 0, 0, 4], [None, None, None, 0.98], [None, None, None, 1.0])}, bins=4),
    }
    (d,) = diagrams(artifacts, {}, {})
    assert d.count == pytest.approx([0.0, 2.0, 2 / 3, 8.0])
    assert d.confidence[0] is d.accuracy[0] is d.accuracy_low[0] is d.accuracy_high[0] is None
    # bin 1: two seeds; bin 2: only seed b, a mean without a band
    assert d.confidence[1] == pytest.approx(0.45) and d.accuracy[1] == pytest.approx(0.375)
    assert (d.accuracy_low[1], d.accuracy_high[1]) == pytest.approx(scipy_band([0.25, 0.5]))
    assert (d.confidence[2], d.accuracy[2], d.accuracy_low[2], d.accuracy_high[2]) == (0.7, 1.0, None, None)
    # bin 3: accuracy 1.0, 0.9, 1.0: the t-band reaches past 1 and is clipped there
    low, high = stats.t.interval(0.95, 2, loc=np.mean([1.0, 0.9, 1.0]), scale=stats.sem([1.0, 0.9, 1.0]))
    assert high > 1 and d.accuracy_high[3] == 1.0 and d.accuracy_low[3] == pytest.approx(low)
    assert d.accuracy[3] == pytest.approx(2.9 / 3) and d.confidence[3] == pytest.approx((0.95 + 0.9 + 0.98) / 3)
    # each seed's ECE by hand from its bins
    eces = [(4 * 0.25 + 10 * 0.05) / 14, (2 * 0.1 + 2 * 0.3 + 0) / 14, 0.02]
    assert d.ece.n == 3 and d.ece.mean == pytest.approx(np.mean(eces))
    same = diagrams({"a": artifacts["a"], "b": artifact({"m": entry([0, 4, 0, 10], [None, 0.5, None, 0.95],
                                                                    [None, 0.25, None, 1.0])}, bins=4)}, {}, {})[0]
    assert same.accuracy_low[1] == same.accuracy_high[1] == 0.25  # equal seeds: a band of width 0


def test_runs_whose_logged_ece_differs_from_their_bins_are_named():
    good = entry([3, 1], [0.6, 0.9], [2 / 3, 1.0])  # ECE (3 * 1/15 + 0.1) / 4 = 0.075
    artifacts = {"r0": artifact({"m": good}), "r1": artifact({"m": dict(good, ece=0.2)}),
                 "r2": artifact({"m": good}), "r3": artifact({"m": {k: v for k, v in good.items() if k != "ece"}})}
    logged = {("r0", "test/m/ece"): 0.075 + 1e-12,  # rounding: agrees
              ("r2", "test/m/ece"): 0.085, ("r2", "val/m/ece"): 0.075,
              ("r1", "test/m/acc"): 0.5}
    (d,) = diagrams(artifacts, logged, {"r0": "0", "r1": "1"})
    assert d.mismatched == ["seed 1: bins give 0.075000, its own 'ece' 0.200000",
                            "seed ?: bins give 0.075000, the logged metric 0.085000"]
    assert d.ece.mean == pytest.approx(0.075) and d.ece.n == 4
    both = diagrams({"r1": artifact({"m": dict(good, ece=0.2)})}, {("r1", "test/m/ece"): 0.1}, {"r1": "1"})[0]
    assert both.mismatched == ["seed 1: bins give 0.075000, its own 'ece' 0.200000",
                               "seed 1: bins give 0.075000, the logged metric 0.100000"]
    assert diagrams({"r": artifact({"m": dict(good, ece=0.075 + 5e-10)})}, {}, {})[0].mismatched == []
    assert diagrams({"r": artifact({"m": dict(good, ece=0.075 + 2e-9)})}, {}, {})[0].mismatched != []


def test_methods_come_plain_first_then_their_axis_variants_in_value_order():
    e = entry([1, 1], [0.5, 0.9], [0.0, 1.0])
    names = ["b", "a:t:10", "a:mode:x", "a:t:2", "a", "a:k:1:t:10", "a:k:10:t:1", "a:k:1:t:2", "a:k:2:t:1",
             "a:k:1:t:1", "a:t:0.5", "a:mode:10"]
    found = diagrams({"r": artifact({name: e for name in names})}, {}, {})
    # with two axes: by their names, then by each value in numeric order
    assert [d.method for d in found] == ["a", "a:mode:10", "a:mode:x", "a:t:0.5", "a:t:2", "a:t:10", "a:k:1:t:1",
                                         "a:k:1:t:2", "a:k:1:t:10", "a:k:2:t:1", "a:k:10:t:1", "b"]


def test_one_split_is_read_and_only_runs_that_logged_a_method_count_for_it():
    e = entry([2, 2], [0.5, 0.8], [0.5, 1.0])
    val_only = entry([1, 3], [0.4, 0.9], [0.0, 1.0])
    artifacts = {"r0": {"bins": 2, "splits": {"test": {"m": e, "n": e}, "val": {"m": val_only}}},
                 "r1": {"bins": 2, "splits": {"test": {"m": e}}},
                 "r2": {"bins": 2},  # no splits at all
                 "r3": {"bins": 2, "splits": {"val": {"m": val_only}}}}
    test = {d.method: d for d in diagrams(artifacts, {}, {})}
    assert sorted(test) == ["m", "n"] and (test["m"].runs, test["n"].runs) == (2, 1)
    val = diagrams(artifacts, {("r0", "val/m/ece"): 0.5, ("r0", "test/m/ece"): 0.1}, {"r0": "0"}, split="val")
    assert [(d.method, d.runs, d.count) for d in val] == [("m", 2, [1.0, 3.0])]
    assert val[0].mismatched == [f"seed 0: bins give {(1 * 0.4 + 3 * 0.1) / 4:.6f}, the logged metric 0.500000"]
    assert diagrams(artifacts, {}, {}, split="train") == []


def test_the_bin_count_comes_from_the_artifact_or_else_from_the_bins():
    e = entry([1, 0, 1], [0.4, None, 0.9], [0.0, None, 1.0])
    assert diagrams({"r": artifact({"m": e}, bins=7)}, {}, {})[0].bins == 7
    assert diagrams({"r": artifact({"m": e}, bins=None)}, {}, {})[0].bins == 3
    # the first run that states it
    assert diagrams({"r": artifact({"m": e}, bins=None), "s": artifact({"m": e}, bins=5)}, {}, {})[0].bins == 5


def diagram(method: str) -> Diagram:
    return Diagram(method, 3, 1, [], [], [], [], [], Interval(0.1, math.nan, math.nan, 1))


def test_a_diagram_names_its_method_and_axes():
    assert diagram("attn_knn:k:20:tta_views:5").base == "attn_knn"
    assert diagram("attn_knn:k:20:tta_views:5").axes == {"k": "20", "tta_views": "5"}
    assert diagram("attn_knn").axes == {} and diagram("attn_knn").base == "attn_knn"
    assert diagram("attn_knn:k").axes == {}  # not a key of the contract


def test_pairs_are_the_smallest_and_largest_value_of_each_axis_with_the_others_held():
    found = [diagram(m) for m in ("m", "m:t:2", "m:t:10", "m:t:0.5", "other:t:1")]
    assert [(axis, a.method, b.method) for axis, a, b in pairs(found)] == [("t", "m:t:0.5", "m:t:10")]
    grid = [diagram(m) for m in ("m:k:5:t:1", "m:k:1:t:2", "m:k:1:t:1", "m:k:5:t:2", "m:k:1:t:3")]
    # k: from 1 to 5 at t=2, the t of the first k=1 variant; t: from 1 to 2 at k=5, the k of the
    # first t=1 variant (t=3 exists only at k=1)
    assert [(axis, a.method, b.method) for axis, a, b in pairs(grid)] == [("k", "m:k:1:t:2", "m:k:5:t:2"),
                                                                         ("t", "m:k:5:t:1", "m:k:5:t:2")]


def test_no_pair_without_two_values_of_an_axis_in_one_method():
    two = [diagram("m:t:1"), diagram("m:t:2")]
    assert [(axis, a.method, b.method) for axis, a, b in pairs(two)] == [("t", "m:t:1", "m:t:2")]
    assert pairs([diagram("m"), diagram("m:t:1")]) == []
    # an axis with one variant does not stop the next axis from pairing
    one_then_two = [diagram("m:a:1"), diagram("m:t:1"), diagram("m:t:2")]
    assert [(axis, a.method, b.method) for axis, a, b in pairs(one_then_two)] == [("t", "m:t:1", "m:t:2")]
    assert pairs([diagram("a:t:1"), diagram("b:t:2")]) == []  # different methods are no before/after
    # two values of k, but never with the other axis held
    assert [p[0] for p in pairs([diagram("m:k:1:t:1"), diagram("m:k:2:t:2")])] == []
    assert pairs([]) == []
    # the same axes in another order are one value, not a before/after (a pair needs two values)
    assert pairs([diagram("m:k:1:t:1"), diagram("m:t:1:k:1")]) == []
    reordered = [diagram("m:k:1:t:1"), diagram("m:t:1:k:1"), diagram("m:k:1:t:2")]
    assert [(axis, a.method, b.method) for axis, a, b in pairs(reordered)] == [("t", "m:k:1:t:1", "m:k:1:t:2")]


def test_read_artifacts_returns_the_runs_that_logged_reliability_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file-backed store: no SQLite migrations
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    exp = client.create_experiment("rel")
    doc = artifact({"m": entry([1, 1], [0.5, 0.9], [0.0, 1.0])})
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "reliability.json").write_text(json.dumps(doc))
    (folder / "other.json").write_text("{}")
    with_bins, without, elsewhere = (client.create_run(exp).info.run_id for _ in range(3))
    client.log_artifact(with_bins, str(folder / "reliability.json"), "artifacts")
    client.log_artifact(without, str(folder / "other.json"), "artifacts")
    client.log_artifact(elsewhere, str(folder / "reliability.json"), "plots")
    assert ARTIFACT == "artifacts/reliability.json"
    assert read_artifacts(uri, [with_bins, without, elsewhere]) == {with_bins: doc}
    assert read_artifacts(uri, []) == {}
