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
