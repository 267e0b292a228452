"""Classification metrics on predicted probabilities, and the metric-name contract.

Names are ``<split>/<method>/<metric>``; eval-axis values ride on the method as
``<method>:<axis>:<value>`` pairs, e.g. ``test/attn_knn:k:20/acc`` or
``test/attn_knn:k:20:tta_views:5/ece``. (DESIGN.md wrote ``attn_knn@k=20``; MLflow rejects '@'
and '=' in metric names, so the contract uses colons, which it accepts.)
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score

ECE_BINS = 15


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
    # bin b holds conf in (b/bins, (b+1)/bins]; conf == 0 goes to the first bin
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


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
        "balanced_acc": float(balanced_accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }


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
