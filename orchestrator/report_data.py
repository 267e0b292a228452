"""A family's trial runs in MLflow -> one tidy frame -> studies (what varies) -> per-cell statistics.

The data model of a report: :func:`load_runs` reads one row per (trial run, final metric),
:func:`select_studies` picks each study's sweep and its finished trials, :class:`StudyStats`
holds mean ± 95% Student-t half-width with n of every metric key in every cell, and
:class:`ReportConfig` is the ``report:`` key of the family YAML. Nothing here formats a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.claims import same_value
from orchestrator.errors import UsageError
from orchestrator.stats import format_interval, t_interval
from trainables.common.metrics import parse_metric_key

METRIC_LABELS = {"acc": "Accuracy", "top5": "Top-5", "ece": "ECE", "nll": "NLL", "brier": "Brier",
                 "balanced_acc": "Balanced acc", "macro_f1": "Macro-F1", "loss": "Loss"}
DEFAULT_HEADLINE = ["acc", "ece", "nll"]
REPORT_KEYS = {"baseline", "headline_study", "headline_metrics", "methods", "labels", "focus", "reference", "drops", "split"}
RUN_COLUMNS = ["run_id", "sweep_id", "study", "status", "seed", "dataset", "start_time"]
KEY_COLUMNS = ["key", "split", "method", "axes", "metric", "value"]


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


# ---------------------------------------------------------------- the tidy frame


def split_key(key: str) -> tuple[str, str, str, str] | None:
    """(split, method, axes, metric) of a metric key; ``perf/...`` and ``info/...`` keys become
    (prefix, "", "", rest); bookkeeping (``epoch``, ``diverged``) is None."""
    parsed = parse_metric_key(key)
    if parsed is not None:
        axes = ",".join(f"{k}={v}" for k, v in parsed["axes"].items())
        return parsed["split"], parsed["method"], axes, parsed["metric"]
    head, sep, rest = key.partition("/")
    if sep and head in ("perf", "info") and rest:
        return head, "", "", rest
    return None


def load_runs(tracking_uri: str, family: str, study: str | None = None, sweep_id: str | None = None) -> pd.DataFrame:
    """One row per (trial run, final metric): run_id, sweep_id, study, status, seed, dataset,
    start_time, key, split, method, axes ("k=20,tta_views=5"), metric, value, and the run's
    params as ``param.<name>`` columns (strings, as MLflow keeps them; "" where a run lacks one)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    if exp is None:
        return pd.DataFrame(columns=RUN_COLUMNS + KEY_COLUMNS)
    query = "tags.role = 'trial'"
    if study:
        query += f" and tags.study = '{study}'"
    if sweep_id:
        query += f" and tags.sweep_id = '{sweep_id}'"
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=50000):
        tags, params = run.data.tags, run.data.params
        status = tags.get("status") or ("finished" if run.info.status == "FINISHED" else run.info.status.lower())
        base = {"run_id": run.info.run_id, "sweep_id": tags.get("sweep_id", ""), "study": tags.get("study", ""),
                "status": status, "seed": params.get("seed", tags.get("seed", "")), "dataset": tags.get("dataset", ""),
                "start_time": run.info.start_time or 0}
        base.update({f"param.{k}": v for k, v in params.items()})
        for key, value in run.data.metrics.items():
            parts = split_key(key)
            if parts is not None:
                rows.append({**base, "key": key, **dict(zip(KEY_COLUMNS[1:5], parts)), "value": value})
        if not run.data.metrics or all(split_key(k) is None for k in run.data.metrics):
            rows.append({**base, "key": "", "split": "", "method": "", "axes": "", "metric": "", "value": math.nan})
    frame = pd.DataFrame(rows, columns=None if rows else RUN_COLUMNS + KEY_COLUMNS)
    params = [c for c in frame.columns if c.startswith("param.")]
    frame[params] = frame[params].fillna("")
    return frame


def typed(value):
    """A logged param string as a number when it is one (for ordering and plotting)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value
    return int(number) if number.is_integer() and "." not in str(value) and "e" not in str(value).lower() else number


def order_key(value) -> tuple:
    v = typed(value)
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def axis_items(axes: str) -> list[tuple[str, str]]:
    return [tuple(part.split("=", 1)) for part in axes.split(",")] if axes else []


# ---------------------------------------------------------------- per-family settings


@dataclass
class ReportConfig:
    """The ``report:`` key of a family YAML (every field optional)."""

    objective: dict
    baseline: str | None = None
    headline_study: str | None = None
    headline_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_HEADLINE))
    methods: list[str] = field(default_factory=list)  # method specs ("attn_knn", "attn_knn:tta_views:5"), in order
    labels: dict[str, str] = field(default_factory=dict)
    focus: list[str] = field(default_factory=list)  # methods of A/B tables and 2-D grid plots
    reference: dict[str, dict] = field(default_factory=dict)  # study -> reference cell {param: value}
    drops: dict[str, str] = field(default_factory=dict)  # study -> param: metric drop from its first value
    split: str = "test"

    @classmethod
    def from_doc(cls, doc: dict, family: str) -> "ReportConfig":
        raw = doc.get("report") or {}
        where = f"{family}.yaml report"
        if not isinstance(raw, dict) or set(raw) - REPORT_KEYS:
            raise UsageError(f"{where}: expected a mapping with keys among {sorted(REPORT_KEYS)}")
        cfg = cls(objective=dict(doc.get("objective") or {}), headline_study=doc.get("default_study"))
        for key in ("baseline", "headline_study", "split"):
            if key in raw:
                if not isinstance(raw[key], str):
                    raise UsageError(f"{where}.{key}: expected a string")
                setattr(cfg, key, raw[key])
        for key in ("headline_metrics", "methods", "focus"):
            if key in raw:
                if not isinstance(raw[key], list) or not all(isinstance(v, str) for v in raw[key]):
                    raise UsageError(f"{where}.{key}: expected a list of strings")
                setattr(cfg, key, list(raw[key]))
        for key in ("labels", "reference", "drops"):
            if key in raw:
                if not isinstance(raw[key], dict):
                    raise UsageError(f"{where}.{key}: expected a mapping")
                setattr(cfg, key, dict(raw[key]))
        for study, param in cfg.drops.items():
            if study not in (doc.get("studies") or {}) or not isinstance(param, str):
                raise UsageError(f"{where}.drops.{study}: expected a known study mapped to a swept param")
        for study, cell in cfg.reference.items():
            if study not in (doc.get("studies") or {}) or not isinstance(cell, dict):
                raise UsageError(f"{where}.reference.{study}: expected a known study mapped to {{param: value}}")
        if cfg.headline_study not in (doc.get("studies") or {}):
            raise UsageError(f"{where}.headline_study: unknown study {cfg.headline_study!r}")
        return cfg

    def label(self, spec: str) -> str:
        return self.labels.get(spec, spec)

    @property
    def objective_method(self) -> str | None:
        parsed = parse_metric_key(self.objective.get("metric", ""))
        return parsed["method"] if parsed else None

    @property
    def focus_methods(self) -> list[str]:
        return self.focus or ([self.objective_method] if self.objective_method else [])


# ---------------------------------------------------------------- a study's trials


@dataclass
class StudyRuns:
    """The finished trials of one study (one row per run and metric) and what varies across them."""

    name: str
    frame: pd.DataFrame
    axes: list[str]  # swept params that are set independently (grid/space order)
    derived: list[str]  # swept params that follow from the axes (derive rules, e.g. lr from batch size)
    sweeps: list[str]
    ignored: list[str]
    counts: dict[str, int]
    failed: list[str]
    spec: dict  # the study's YAML entry ({} when the YAML no longer has it)
    changed: dict = field(default_factory=dict)  # params every trial shares that differ from the YAML defaults

    @property
    def cell_params(self) -> list[str]:
        return self.axes + self.derived

    @property
    def is_search(self) -> bool:
        return bool(self.spec.get("space"))

    def cells(self) -> list[tuple]:
        cols = [f"param.{p}" for p in self.cell_params]
        if not cols:
            return [()]
        combos = self.frame.drop_duplicates("run_id")[cols].drop_duplicates().itertuples(index=False, name=None)
        return sorted(combos, key=lambda c: tuple(order_key(v) for v in c))

    def cell_dict(self, cell: tuple) -> dict:
        return dict(zip(self.cell_params, cell))

    def label(self, cell: tuple) -> str:
        if not cell:
            return "all trials"
        axes = ", ".join(f"{p}={v}" for p, v in zip(self.axes, cell))
        derived = ", ".join(f"{p}={v}" for p, v in zip(self.derived, cell[len(self.axes):]))
        return f"{axes} ({derived})" if derived and axes else axes or derived


def select_studies(frame: pd.DataFrame, doc: dict, sweep_id: str | None = None) -> list[StudyRuns]:
    """Split a family's runs by study; keep the chosen sweep (default: the latest sweep with a
    finished trial) of each; work out which params vary, in YAML order."""
    specs = doc.get("studies") or {}
    names = sorted(set(frame["study"]), key=lambda s: (list(specs).index(s) if s in specs else len(specs), s))
    out = []
    for name in names:
        rows = frame[frame["study"] == name]
        started = rows.groupby("sweep_id")["start_time"].min().sort_values()
        with_finished = set(rows.loc[rows["status"] == "finished", "sweep_id"])
        candidates = [s for s in started.index if s in with_finished] or list(started.index)
        chosen = [sweep_id] if sweep_id else candidates[-1:]
        rows = rows[rows["sweep_id"].isin(chosen)]
        per_run = rows.drop_duplicates("run_id")
        counts = per_run["status"].value_counts().to_dict()
        done = rows[rows["status"] == "finished"]
        spec = specs.get(name) or {}
        varying = [c[len("param."):] for c in done.columns
                   if c.startswith("param.") and c != "param.seed" and done.drop_duplicates("run_id")[c].nunique() > 1]
        declared = list(spec.get("grid") or {}) + list(spec.get("space") or {})
        derived = [p for p in varying if p in (spec.get("derive") or {})]
        axes = [p for p in declared if p in varying] + sorted(p for p in varying if p not in declared and p not in derived)
        study = StudyRuns(name, done, axes, derived, chosen, [s for s in started.index if s not in chosen],
                          counts, [], spec)
        study.failed = [f"{study.label(tuple(r[f'param.{p}'] for p in study.cell_params)) + ' ' if study.cell_params else ''}"
                        f"seed {r['seed']}: {r['status']}" for _, r in per_run[per_run["status"] != "finished"].iterrows()]
        study.changed = _changed(done, doc.get("defaults") or {}, study.cell_params)
        out.append(study)
    return out


def _changed(done: pd.DataFrame, defaults: dict, cell_params: list[str]) -> dict:
    """Params shared by every trial that differ from the YAML defaults: the study's ``set`` and
    any ``--set`` given to the sweep."""
    runs = done.drop_duplicates("run_id")
    out = {}
    for key, default in defaults.items():
        column = f"param.{key}"
        if key in cell_params or column not in runs or runs[column].nunique() != 1:
            continue
        value = runs[column].iloc[0]
        if not same_value(value, default) and str(value) != str(default):
            out[key] = value
    return out


class StudyStats:
    """mean ± half-width (n) of every metric key in every cell of a study."""

    def __init__(self, study: StudyRuns):
        self.study = study
        by = [f"param.{p}" for p in study.cell_params] + ["key"]
        self.table: dict[tuple, tuple[float, float, int]] = {}
        self.sd: dict[tuple, float] = {}
        frame = study.frame[study.frame["key"] != ""]
        for keys, values in frame.groupby(by, sort=False)["value"]:
            keys = keys if isinstance(keys, tuple) else (keys,)
            index = (tuple(keys[:-1]), keys[-1])
            values = values.dropna()
            self.table[index] = t_interval(values.tolist())
            self.sd[index] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    def get(self, cell: tuple, key: str) -> tuple[float, float, int]:
        return self.table.get((cell, key), (math.nan, math.nan, 0))

    def text(self, cell: tuple, key: str) -> str:
        return format_interval(*self.get(cell, key))

    def records(self, family: str) -> list[dict]:
        out = []
        for (cell, key), (mean, half, n) in self.table.items():
            split, method, axes, metric = split_key(key)
            has_ci = n >= 2 and not math.isnan(half)
            out.append({"family": family, "study": self.study.name, "sweep": ",".join(self.study.sweeps),
                        "cell": self.study.label(cell), "key": key, "split": split, "method": method, "axes": axes,
                        "metric": metric, "n": n, "mean": mean, "sd": number_or_none(self.sd[(cell, key)]),
                        "ci_low": mean - half if has_ci else None, "ci_high": mean + half if has_ci else None})
        return out


def number_or_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
