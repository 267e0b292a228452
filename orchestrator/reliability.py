"""Reliability diagrams' data: the per-bin artifacts of a study's trials, averaged over seeds.

Each trial of a family that reports ECE writes ``artifacts/reliability.json``
(``trainables.common.lifecycle.Trial.reliability``; the runner logs the trial's ``artifacts/``
folder into its MLflow run)::

    {"bins": 15, "splits": {"test": {"<method[:axis:value...]>":
        {"count": [...], "confidence": [...], "accuracy": [...], "ece": 0.031}}}}

:func:`diagrams` reads those of the given runs and returns, per method, the mean over seeds of
each bin's accuracy and confidence, a 95% t-band of the accuracy across seeds (clipped to
[0, 1]), the mean bin counts, and the ECE over seeds. The ECE recomputed from the bins is
compared with the ECE the run logged as a metric; a run where they differ is named.
:func:`pairs` picks the before/after pairs of eval axes that change calibration (TTA views,
temperature, MC samples: any method logged with axis variants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from orchestrator.report_data import Interval, order_key
from orchestrator.study_record import read_json_artifact
from trainables.common.metrics import ece_from_bins, parse_metric_key

ARTIFACT = "artifacts/reliability.json"
ECE_TOLERANCE = 1e-9  # JSON and MLflow both keep float64: the two ECEs agree to rounding


@dataclass
class Diagram:
    """One method's reliability diagram over the seeds of one cell."""

    method: str  # the method part of the metric key, axes included ("attn_knn:tta_views:5")
    bins: int
    runs: int
    confidence: list[float | None]  # per bin: mean over the seeds where the bin is not empty
    accuracy: list[float | None]
    accuracy_low: list[float | None]  # 95% t-band across seeds (None below 2 seeds)
    accuracy_high: list[float | None]
    count: list[float]  # mean count per bin
    ece: Interval  # of the ECE each run's bins give
    mismatched: list[str] = field(default_factory=list)  # "seed S: bins X, logged Y"

    @property
    def base(self) -> str:
        return self.method.split(":")[0]

    @property
    def axes(self) -> dict[str, str]:
        parsed = parse_metric_key(f"test/{self.method}/ece")
        return parsed["axes"] if parsed else {}


def read_artifacts(tracking_uri: str, run_ids: list[str]) -> dict[str, dict]:
    """run id -> its reliability.json, for the runs that logged one."""
    client = MlflowClient(tracking_uri)
    found = {run_id: read_json_artifact(client, run_id, ARTIFACT) for run_id in run_ids}
    return {run_id: doc for run_id, doc in found.items() if doc is not None}


def diagrams(artifacts: dict[str, dict], logged_ece: dict[tuple[str, str], float], seeds: dict[str, str],
             split: str = "test") -> list[Diagram]:
    """Per method of ``split``, the diagram over the runs in ``artifacts``. ``logged_ece`` maps
    (run id, metric key) to the ECE the run logged; ``seeds`` maps a run id to its seed."""
    per_method: dict[str, list[tuple[str, dict]]] = {}
    bins = None
    for run_id, doc in artifacts.items():
        bins = bins or int(doc.get("bins", 0))
        for method, entry in (doc.get("splits") or {}).get(split, {}).items():
            per_method.setdefault(method, []).append((run_id, entry))
    out = []
    for method in sorted(per_method, key=_method_order):
        entries = per_method[method]
        n_bins = len(entries[0][1]["count"])
        conf, acc, low, high, count = [], [], [], [], []
        for b in range(n_bins):
            filled = [e for _, e in entries if e["count"][b]]
            conf.append(_mean([e["confidence"][b] for e in filled]))
            band = Interval.of([e["accuracy"][b] for e in filled], f"{split}/{method}/acc")
            acc.append(band.mean if band.n else None)
            low.append(None if math.isnan(band.low) else band.low)
            high.append(None if math.isnan(band.high) else band.high)
            count.append(sum(e["count"][b] for _, e in entries) / len(entries))
        eces = [ece_from_bins(e) for _, e in entries]
        mismatched = []
        for (run_id, entry), ece in zip(entries, eces):
            logged = logged_ece.get((run_id, f"{split}/{method}/ece"))
            for what, value in (("its own 'ece'", entry.get("ece")), ("the logged metric", logged)):
                if value is not None and abs(value - ece) > ECE_TOLERANCE:
                    mismatched.append(f"seed {seeds.get(run_id, '?')}: bins give {ece:.6f}, {what} {value:.6f}")
        out.append(Diagram(method, bins or n_bins, len(entries), conf, acc, low, high, count,
                           Interval.of(eces, f"{split}/{method}/ece"), mismatched))
    return out


def pairs(found: list[Diagram]) -> list[tuple[str, Diagram, Diagram]]:
    """(axis, before, after) for every method logged with variants of an eval axis: the
    smallest and the largest value of the axis, every other axis of the method held at the
    value it takes in the smallest variant."""
    out = []
    by_base: dict[str, list[Diagram]] = {}
    for d in found:
        by_base.setdefault(d.base, []).append(d)
    for base, group in by_base.items():
        names = sorted({a for d in group for a in d.axes})
        for axis in names:
            having = sorted((d for d in group if axis in d.axes), key=lambda d: order_key(d.axes[axis]))
            if len(having) < 2:
                continue
            first = having[0]
            rest = {k: v for k, v in first.axes.items() if k != axis}
            same = [d for d in having if {k: v for k, v in d.axes.items() if k != axis} == rest]
            if len(same) >= 2 and same[-1].axes[axis] != first.axes[axis]:
                out.append((axis, first, same[-1]))
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _method_order(method: str) -> tuple:
    """Plain methods first, then their axis variants in value order."""
    base, *rest = method.split(":")
    return base, len(rest), tuple(rest[::2]), tuple(order_key(v) for v in rest[1::2])
