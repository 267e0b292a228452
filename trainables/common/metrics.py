"""Classification metrics on predicted probabilities, and the metric-name contract.

Names are ``<split>/<method>/<metric>``; eval-axis values ride on the method as
``<method>:<axis>:<value>`` pairs, e.g. ``test/attn_knn:k:20/acc`` or
``test/attn_knn:k:20:tta_views:5/ece``. (DESIGN.md wrote ``attn_knn@k=20``; MLflow rejects '@'
and '=' in metric names, so the contract uses colons, which it accepts.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15


@dataclass(frozen=True)
class MetricInfo:
    """What a metric name means to a reader: its label, which way is better, and its bounds
    (None: unbounded on that side). Reports and claims read directions and bounds from here."""

    label: str
    better: str  # "higher" | "lower"
    low: float | None = None
    high: float | None = None


# The metric part of ``<split>/<method>/<metric>``: one table for every family and the engine.
METRICS: dict[str, MetricInfo] = {
    "acc": MetricInfo("Accuracy", "higher", 0.0, 1.0),
    "top5": MetricInfo("Top-5", "higher", 0.0, 1.0),
    "balanced_acc": MetricInfo("Balanced acc", "higher", 0.0, 1.0),
    "macro_f1": MetricInfo("Macro-F1", "higher", 0.0, 1.0),
    "ece": MetricInfo("ECE", "lower", 0.0, 1.0),
    "nll": MetricInfo("NLL", "lower", 0.0, None),
    "brier": MetricInfo("Brier", "lower", 0.0, 2.0),
    "loss": MetricInfo("Loss", "lower", None, None),
}


def metric_info(key: str) -> MetricInfo | None:
    """The :data:`METRICS` entry of a full key (``test/attn_knn:k:20/ece``) or a bare metric
    name; timings (``perf/...``) are lower-is-better and non-negative; None when unknown."""
    if key.startswith("perf/"):
        return MetricInfo(key.split("/", 1)[1], "lower", 0.0, None)
    return METRICS.get(key.rsplit("/", 1)[-1])


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(1) == labels))


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    k = min(k, probs.shape[1])
    # a label counts as found if fewer than k classes score strictly higher (ties favour the label)
    true_score = probs[np.arange(len(labels)), labels]
    higher = (probs > true_score[:, None]).sum(1)
    return float(np.mean(higher < k))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """L1 ECE over ``bins`` equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == labels).astype(np.float64)
    idx = _bin_index(conf, bins)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def _bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    # bin b holds conf in (b/bins, (b+1)/bins]; conf == 0 goes to the first bin
    return np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The data of a reliability diagram, on the same bins as :func:`expected_calibration_error`:
    per bin the count, mean confidence and accuracy (None for an empty bin), and the ECE."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == np.asarray(labels)).astype(np.float64)
    idx = _bin_index(conf, bins)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    nonempty = count > 0
    return {
        "count": [int(c) for c in count],
        "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count)],
        "ece": float(np.sum(count[nonempty] / count.sum() * np.abs(acc_sum[nonempty] / count[nonempty]
                                                                    - conf_sum[nonempty] / count[nonempty]))),
    }


def ece_from_bins(entry: dict) -> float:
    """ECE recomputed from a :func:`reliability_bins` entry (what a report reads back)."""
    total = sum(entry["count"])
    return float(sum(c / total * abs(a - f) for c, a, f in zip(entry["count"], entry["accuracy"], entry["confidence"]) if c))


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], eps, None))))


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - y_c)^2."""
    onehot = np.zeros_like(probs, dtype=np.float64)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of the contract that a probability matrix defines."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    pred = probs.argmax(1)
    return {
        "acc": accuracy(probs, labels),
        "top5": top_k_accuracy(probs, labels, 5),
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
        **_confusion_metrics(labels, pred, probs.shape[1]),
    }


def _confusion_metrics(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """scikit-learn's ``balanced_accuracy_score`` and ``f1_score(average="macro", zero_division=0)``
    from one bincount confusion matrix (scikit-learn's input validation cost ~30 ms a call, which
    an eval-axes grid of ~80 (method, k, views) cells per split paid twice)."""
    cm = np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp, true, predicted = np.diag(cm).astype(np.float64), cm.sum(1), cm.sum(0)
    present = true > 0
    seen = present | (predicted > 0)  # f1's classes: those in labels or predictions
    denominator = true + predicted
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"balanced_acc": float(np.mean(tp[present] / true[present])), "macro_f1": float(np.mean(f1[seen]))}


def metric_key(split: str, method: str, metric: str, **axes) -> str:
    """``metric_key("test", "attn_knn", "acc", k=20)`` -> ``"test/attn_knn:k:20/acc"``."""
    suffix = "".join(f":{name}:{_fmt(value)}" for name, value in axes.items())
    return f"{split}/{method}{suffix}/{metric}"


def parse_metric_key(key: str) -> dict | None:
    """Inverse of :func:`metric_key`: ``{"split", "method", "metric", "axes": {name: str}}``,
    or None for keys outside the contract (``perf/...``, bookkeeping)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] not in ("train", "val", "test"):
        return None
    method, *axis_parts = parts[1].split(":")
    if len(axis_parts) % 2:
        return None
    axes = dict(zip(axis_parts[::2], axis_parts[1::2]))
    return {"split": parts[0], "method": method, "metric": parts[2], "axes": axes}


def prefixed(split: str, method: str, metrics: dict[str, float], **axes) -> dict[str, float]:
    return {metric_key(split, method, name, **axes): value for name, value in metrics.items()}


def _fmt(value) -> str:
    """Axis values print the same however they were typed: 20, 20.0 -> "20"; 0.05 -> "0.05"."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
