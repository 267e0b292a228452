"""A family's trial runs in MLflow -> one tidy frame -> studies (what varies) -> per-cell statistics.

The data model of a report: :func:`load_runs` reads one row per (trial run, final metric),
:func:`select_studies` picks each study's sweep and its finished trials, :class:`StudyStats`
holds mean and 95% Student-t interval with n of every metric key in every cell, clipped to
the metric's bounds (:data:`trainables.common.metrics.METRICS`). Nothing here builds a table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.claims import same_value
from orchestrator.stats import decimals, format_interval, t_interval
from orchestrator.tracking import every_run
from trainables.common.metrics import metric_info, parse_metric_key

RUN_COLUMNS = ["run_id", "sweep_id", "study", "status", "seed", "dataset", "start_time"]
KEY_COLUMNS = ["key", "split", "method", "axes", "metric", "value"]


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
    for run in every_run(client, exp.experiment_id, query):
        tags, params = run.data.tags, run.data.params
        status = tags.get("status") or run.info.status.lower()  # the runner's tag, else MLflow's, lower case
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
    doc: dict  # the family YAML this study's settings come from: as its sweep saved it, else as it is now
    record: dict | None = None  # the compiled study its sweep saved (orchestrator.study_record), if any
    changed: dict = field(default_factory=dict)  # params every trial shares that differ from the YAML defaults

    @property
    def spec(self) -> dict:
        """The study's YAML entry ({} when the YAML no longer has it)."""
        return (self.doc.get("studies") or {}).get(self.name) or {}

    @property
    def source(self) -> str:
        """Where the study's settings come from, for error messages and the report's header."""
        if self.record:
            return f"study.json of sweep {self.record['sweep_id']}"
        return f"{self.doc.get('family', 'the family')}.yaml as it is now"

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


def chosen_sweeps(frame: pd.DataFrame, sweep_id: str | None = None) -> dict[str, tuple[list[str], list[str]]]:
    """study -> (the sweeps it is reported from, the older sweeps left out): ``sweep_id`` when
    given, else the latest sweep with a finished trial (the latest sweep when none has one)."""
    out = {}
    for name, rows in frame.groupby("study", sort=False):
        started = rows.groupby("sweep_id")["start_time"].min().sort_values()
        with_finished = set(rows.loc[rows["status"] == "finished", "sweep_id"])
        candidates = [s for s in started.index if s in with_finished] or list(started.index)
        chosen = [sweep_id] if sweep_id else candidates[-1:]
        out[name] = (chosen, [s for s in started.index if s not in chosen])
    return out


def select_studies(frame: pd.DataFrame, doc: dict, chosen: dict[str, tuple[list[str], list[str]]],
                   records: dict[str, dict] | None = None) -> list[StudyRuns]:
    """Split a family's runs by study, keeping the ``chosen`` sweeps (:func:`chosen_sweeps`) of
    each; a study whose sweep saved its compiled study (``records``: sweep id -> record) takes
    its settings from there, the others from ``doc``; work out which params vary, in YAML order."""
    records = records or {}
    specs = doc.get("studies") or {}
    names = sorted(chosen, key=lambda s: (list(specs).index(s) if s in specs else len(specs), s))
    out = []
    for name in names:
        sweeps, ignored = chosen[name]
        rows = frame[(frame["study"] == name) & frame["sweep_id"].isin(sweeps)]
        per_run = rows.drop_duplicates("run_id")
        counts = per_run["status"].value_counts().to_dict()
        done = rows[rows["status"] == "finished"]
        record = next((records[s] for s in sweeps if s in records), None)
        study = StudyRuns(name, done, [], [], sweeps, ignored, counts, [], record["family_doc"] if record else doc, record)
        spec = study.spec
        varying = [c[len("param."):] for c in done.columns
                   if c.startswith("param.") and c != "param.seed" and done.drop_duplicates("run_id")[c].nunique() > 1]
        declared = list(spec.get("grid") or {}) + list(spec.get("space") or {})
        study.derived = [p for p in varying if p in (spec.get("derive") or {})]
        study.axes = [p for p in declared if p in varying] + sorted(p for p in varying
                                                                   if p not in declared and p not in study.derived)
        study.failed = [f"{study.label(tuple(r[f'param.{p}'] for p in study.cell_params)) + ' ' if study.cell_params else ''}"
                        f"seed {r['seed']}: {r['status']}" for _, r in per_run[per_run["status"] != "finished"].iterrows()]
        study.changed = _changed(done, study.doc.get("defaults") or {}, study.cell_params)
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
        if value == "":  # the runs never logged this param (a family or test that does not use it)
            continue
        if not same_value(value, default) and str(value) != str(default):
            out[key] = value
    return out


# ---------------------------------------------------------------- statistics per cell


@dataclass(frozen=True)
class Interval:
    """mean and 95% t-interval [low, high] over n seeds, clipped to the metric's bounds
    (``clipped`` says it was); low/high are NaN without an interval (n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    clipped: bool = False

    @classmethod
    def of(cls, values, key: str) -> "Interval":
        mean, half, n = t_interval(values)
        if n < 2 or math.isnan(half):
            return cls(mean, math.nan, math.nan, n)
        info = metric_info(key)
        low, high = mean - half, mean + half
        lo_bound = info.low if info and info.low is not None else -math.inf
        hi_bound = info.high if info and info.high is not None else math.inf
        clipped = low < lo_bound or high > hi_bound
        return cls(mean, max(low, lo_bound), min(high, hi_bound), n, clipped)

    @property
    def half(self) -> float:
        """The half-width (NaN without an interval); of a clipped interval, its larger side."""
        return math.nan if math.isnan(self.low) else max(self.mean - self.low, self.high - self.mean)

    def text(self) -> str:
        """``0.9153 ± 0.0021 (n=3)``; clipped: ``0.9950 [0.9830, 1.0000] (n=3)``; see :data:`CLIPPED_NOTE`."""
        if not self.clipped:
            return format_interval(self.mean, self.half, self.n)
        d = decimals(self.mean)
        return f"{self.mean:.{d}f} [{self.low:.{d}f}, {self.high:.{d}f}] (n={self.n})"


NO_INTERVAL = Interval(math.nan, math.nan, math.nan, 0)
CLIPPED_TEXT = re.compile(r"^\S+ \[\S+, \S+\] \(n=\d+\)$")
CLIPPED_NOTE = ("mean [low, high] (n): the 95% t-interval reached past the metric's bounds (accuracy-like metrics and "
                "ECE in [0, 1], NLL and timings >= 0) and is clipped to them.")


class StudyStats:
    """mean ± 95% t-interval (n) of every metric key in every cell of a study."""

    def __init__(self, study: StudyRuns):
        self.study = study
        by = [f"param.{p}" for p in study.cell_params] + ["key"]
        self.table: dict[tuple, Interval] = {}
        self.sd: dict[tuple, float] = {}
        frame = study.frame[study.frame["key"] != ""]
        for keys, values in frame.groupby(by, sort=False)["value"]:  # a list grouper: tuple keys (pandas >= 2)
            index = (tuple(keys[:-1]), keys[-1])
            values = values.dropna()
            self.table[index] = Interval.of(values.tolist(), keys[-1])
            self.sd[index] = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan

    def get(self, cell: tuple, key: str) -> Interval:
        return self.table.get((cell, key), NO_INTERVAL)

    def text(self, cell: tuple, key: str) -> str:
        return self.get(cell, key).text()

    def records(self, family: str) -> list[dict]:
        out = []
        for (cell, key), iv in self.table.items():
            split, method, axes, metric = split_key(key)
            out.append({"family": family, "study": self.study.name, "sweep": ",".join(self.study.sweeps),
                        "cell": self.study.label(cell), "key": key, "split": split, "method": method, "axes": axes,
                        "metric": metric, "n": iv.n, "mean": iv.mean, "sd": number_or_none(self.sd[(cell, key)]),
                        "ci_low": number_or_none(iv.low), "ci_high": number_or_none(iv.high), "ci_clipped": iv.clipped})
        return out


def number_or_none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
