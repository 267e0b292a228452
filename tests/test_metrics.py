"""trainables.common.metrics against scikit-learn and hand computations."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss, top_k_accuracy_score

from trainables.common.metrics import (
    brier_score,
    classification_metrics,
    expected_calibration_error,
    metric_key,
    parse_metric_key,
    prefixed,
    top_k_accuracy,
)


def random_probs(n, c, seed, sharpness=3.0):
    rng = np.random.default_rng(seed)
    logits = sharpness * rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # labels agree with the argmax about 60% of the time, so accuracy and calibration are non-trivial
    labels = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, c, n))
    return probs, labels


def hand_ece(probs, labels, bins=15):
    """Bin b holds confidences in (b/bins, (b+1)/bins]; ECE = sum_b |B|/N |acc(B) - conf(B)|."""
    members = [[] for _ in range(bins)]
    for p, y in zip(probs, labels):
        conf = max(p)
        b = next(b for b in range(bins) if conf <= (b + 1) / bins)
        members[b].append((conf, float(np.argmax(p) == y)))
    total = 0.0
    for m in members:
        if m:
            confs, hits = zip(*m)
            total += len(m) / len(probs) * abs(sum(hits) / len(m) - sum(confs) / len(m))
    return total


def hand_brier(probs, labels):
    return sum(sum((p[c] - (c == y)) ** 2 for c in range(len(p))) for p, y in zip(probs, labels)) / len(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_against_references(seed):
    probs, labels = random_probs(400, 10, seed)
    m = classification_metrics(probs, labels)
    classes = np.arange(10)
    assert m["acc"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(labels, probs, k=5, labels=classes))
    assert m["nll"] == pytest.approx(log_loss(labels, probs, labels=classes))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert m["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert m["ece"] == pytest.approx(hand_ece(probs, labels))
    assert m["brier"] == pytest.approx(hand_brier(probs, labels))
    assert 0 < m["ece"] < 1 and m["acc"] < m["top5"]


def test_top_k_with_fewer_classes_than_k():
    probs, labels = random_probs(50, 3, 0)
    assert top_k_accuracy(probs, labels, 5) == 1.0
    assert top_k_accuracy(probs, labels, 2) == pytest.approx(top_k_accuracy_score(labels, probs, k=2))


def test_ece_edges():
    labels = np.array([0, 1, 0, 1])
    perfect = np.eye(2)[labels]  # confident and right -> 0
    assert expected_calibration_error(perfect, labels) == 0.0
    wrong = np.eye(2)[1 - labels]  # confident and wrong -> 1
    assert expected_calibration_error(wrong, labels) == pytest.approx(1.0)
    # confidence exactly on a bin edge (8/15) shares the bin (7/15, 8/15] with 0.5: one bin,
    # acc 1/2 against mean confidence (8/15 + 0.5) / 2; in separate bins ECE would be ~0.48
    edge = np.array([[8 / 15, 7 / 15], [0.5, 0.5]])
    assert expected_calibration_error(edge, np.array([0, 1])) == pytest.approx((8 / 15 + 0.5) / 2 - 0.5)
    assert brier_score(perfect, labels) == 0.0 and brier_score(wrong, labels) == pytest.approx(2.0)


def test_metric_key_round_trip():
    key = metric_key("test", "attn_knn", "acc", k=20, tta_views=5)
    assert key == "test/attn_knn:k:20:tta_views:5/acc"
    assert parse_metric_key(key) == {"split": "test", "method": "attn_knn", "metric": "acc", "axes": {"k": "20", "tta_views": "5"}}
    assert metric_key("val", "m", "ece", alpha=0.05) == "val/m:alpha:0.05/ece"
    assert metric_key("val", "m", "ece", alpha=20.0) == metric_key("val", "m", "ece", alpha=20)
    assert parse_metric_key("val/cnn/nll") == {"split": "val", "method": "cnn", "metric": "nll", "axes": {}}
    for outside in ("perf/search_ms", "epoch", "test/a:k/acc", "dev/cnn/acc"):
        assert parse_metric_key(outside) is None
    assert prefixed("test", "cnn", {"acc": 0.5, "nll": 1.0}, k=3) == {"test/cnn:k:3/acc": 0.5, "test/cnn:k:3/nll": 1.0}


@pytest.mark.parametrize("seed", range(8))
def test_confusion_metrics_equal_sklearn_with_missing_and_unpredicted_classes(seed):
    import warnings

    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 12))
    labels = rng.integers(0, max(1, n_classes - int(rng.integers(0, 3))), int(rng.integers(5, 200)))
    probs = rng.dirichlet(np.ones(n_classes) * 0.3, len(labels))
    m = classification_metrics(probs, labels)
    pred = probs.argmax(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a predicted class never occurs in labels
        assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12)
        assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0), abs=1e-12)


# What `python bench/mutation.py --module trainables/common/metrics.py` found unpinned (issue 16):
# the direction and bounds table, reliability bins, the NLL clip, ties in top-k, keys outside the contract.

def test_metric_directions_and_bounds_are_what_the_metrics_reach():
    from trainables.common.metrics import METRICS, metric_info

    labels = np.array([0, 1, 2, 1])
    right, wrong = np.eye(3)[labels], np.eye(3)[(labels + 1) % 3]
    best, worst = classification_metrics(right, labels), classification_metrics(wrong, labels)
    for name in ("acc", "top5", "balanced_acc", "macro_f1", "ece", "brier"):
        info = METRICS[name]
        good, bad = (info.high, info.low) if info.better == "higher" else (info.low, info.high)
        assert best[name] == pytest.approx(good) and (name == "top5" or worst[name] == pytest.approx(bad)), name
    assert METRICS["nll"].better == "lower" and best["nll"] == pytest.approx(METRICS["nll"].low, abs=1e-9)
    assert METRICS["nll"].high is None and METRICS["loss"] == METRICS["loss"].__class__("Loss", "lower", None, None)
    assert [m.label for m in METRICS.values()] == ["Accuracy", "Top-5", "Balanced acc", "Macro-F1", "ECE", "NLL",
                                                   "Brier", "Loss"]
    assert metric_info("test/attn_knn:k:20/ece") is METRICS["ece"] and metric_info("acc") is METRICS["acc"]
    assert metric_info("perf/search_ms") == METRICS["acc"].__class__("search_ms", "lower", 0.0, None)
    assert metric_info("perf/a/b").label == "a/b" and metric_info("test/m/unknown") is None


def test_reliability_bins_by_hand_and_their_ece():
    from trainables.common.metrics import ece_from_bins, reliability_bins

    probs, labels = random_probs(300, 4, 5, sharpness=1.5)
    entry = reliability_bins(probs, labels, bins=10)
    conf, hit = probs.max(1), probs.argmax(1) == labels
    for b in range(10):
        members = (conf > b / 10) & (conf <= (b + 1) / 10)
        assert entry["count"][b] == members.sum()
        if members.any():
            assert entry["confidence"][b] == pytest.approx(conf[members].mean())
            assert entry["accuracy"][b] == pytest.approx(hit[members].mean())
        else:
            assert entry["confidence"][b] is None and entry["accuracy"][b] is None
    assert None in entry["confidence"]  # 4 classes: no confidence below 1/4, the low bins are empty
    assert entry["ece"] == pytest.approx(hand_ece(probs, labels, bins=10))
    assert ece_from_bins(entry) == pytest.approx(entry["ece"]) == pytest.approx(expected_calibration_error(probs, labels, 10))
    assert len(reliability_bins(probs, labels)["count"]) == 15
    zero = reliability_bins(np.zeros((2, 3)), np.array([0, 1]), bins=5)  # confidence 0 goes to the first bin
    assert zero["count"] == [2, 0, 0, 0, 0] and zero["accuracy"][0] == 0.5


def test_nll_clip_top_k_ties_and_keys_outside_the_contract():
    from trainables.common.metrics import negative_log_likelihood

    probs = np.array([[0.0, 1.0], [0.5, 0.5]])
    labels = np.array([0, 0])
    assert negative_log_likelihood(probs, labels) == pytest.approx((-np.log(1e-12) - np.log(0.5)) / 2)
    assert negative_log_likelihood(probs, labels, eps=1e-3) == pytest.approx((-np.log(1e-3) - np.log(0.5)) / 2)
    tied = np.full((3, 4), 0.25)  # every class ties with the label: found at any k
    assert top_k_accuracy(tied, np.array([0, 2, 3]), 1) == 1.0
    one_above = np.array([[0.4, 0.3, 0.3], [0.2, 0.5, 0.3]])  # labels 1 and 2: one class strictly above each
    assert top_k_accuracy(one_above, np.array([1, 2]), 1) == 0.0 and top_k_accuracy(one_above, np.array([1, 2]), 2) == 1.0
    assert classification_metrics(one_above, np.array([0, 1]))["acc"] == 1.0
    assert parse_metric_key("train/cnn/loss")["split"] == "train"
    assert parse_metric_key("test/cnn/acc/extra") is None and parse_metric_key("test/cnn") is None
    assert parse_metric_key("test/a:k:1:b/acc") is None
    assert metric_key("test", "m", "acc", name="x", k=1.5) == "test/m:name:x:k:1.5/acc"


def test_float32_input_is_computed_in_float64_and_edge_cases_of_f1_and_bins():
    from trainables.common.metrics import reliability_bins

    probs, labels = random_probs(200, 10, 9)
    p32 = probs.astype(np.float32)  # what a family's torch softmax hands over
    assert classification_metrics(p32, labels) == classification_metrics(p32.astype(np.float64), labels)
    assert reliability_bins(p32, labels) == reliability_bins(p32.astype(np.float64), labels)
    assert top_k_accuracy(probs, labels) == pytest.approx(top_k_accuracy_score(labels, probs, k=5))  # default k = 5
    # class 2 never occurs but is predicted exactly once: macro-F1 counts it (F1 0), as scikit-learn does
    labels4, pred4 = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    m = classification_metrics(np.eye(3)[pred4], labels4)
    assert m["macro_f1"] == pytest.approx(f1_score(labels4, pred4, average="macro", zero_division=0))
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # a confidence a rounding step above 1 (float32 softmax) stays in the last bin
    assert reliability_bins(np.array([[1.0 + 1e-9, 0.0]]), np.array([0]), bins=5)["count"] == [0, 0, 0, 0, 1]
