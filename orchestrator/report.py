"""Consolidated reports: MLflow runs -> one tidy frame -> tables, claims, plots -> markdown, CSV, JSON.

Nothing here knows a family: tables are built from metric names (``<split>/<method>/<metric>``,
eval axes riding on the method) and from the params that vary across a study's trials, with a
few per-family choices read from the ``report:`` key of the family YAML (baseline method,
headline metrics, method order and labels, reference cells of A/B studies) and claims from its
``claims:`` key (see ``search_spaces/README.md``).

Per study the report uses the latest sweep that has finished trials (``--sweep`` picks one);
only trials with status ``finished`` enter the statistics, the others are counted and named.
Every number over seeds is mean ± 95% Student-t half-width with n; comparisons are paired by
seed (paired t-test, Wilcoxon signed-rank), Holm-corrected within each table.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.claims import (ALPHA, Side, cell_sides, check_claims, lower_is_better, paired_values, parse_claims,
                                 rows_of, same_value)
from orchestrator.errors import UsageError
from orchestrator.stats import fmt, format_interval, format_p, holm, p_is, paired_test, t_interval
from trainables.common.metrics import metric_key, parse_metric_key

METRIC_LABELS = {"acc": "Accuracy", "top5": "Top-5", "ece": "ECE", "nll": "NLL", "brier": "Brier",
                 "balanced_acc": "Balanced acc", "macro_f1": "Macro-F1", "loss": "Loss"}
DEFAULT_HEADLINE = ["acc", "ece", "nll"]
REPORT_KEYS = {"baseline", "headline_study", "headline_metrics", "methods", "labels", "focus", "reference", "drops", "split"}
RUN_COLUMNS = ["run_id", "sweep_id", "study", "status", "seed", "dataset", "start_time"]
KEY_COLUMNS = ["key", "split", "method", "axes", "metric", "value"]
RANKED_TRIALS = 10
NO_RELIABILITY = ("Reliability diagrams: skipped. The runs log ECE (15 equal-width bins) but not the per-bin "
                  "accuracy and confidence a reliability diagram needs, and MLflow holds no such data.")


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


def _order(value) -> tuple:
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
        return sorted(combos, key=lambda c: tuple(_order(v) for v in c))

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
                        "metric": metric, "n": n, "mean": mean, "sd": _none(self.sd[(cell, key)]),
                        "ci_low": mean - half if has_ci else None, "ci_high": mean + half if has_ci else None})
        return out


def _none(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


# ---------------------------------------------------------------- report structure


@dataclass
class Table:
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    records: list[dict] | None = None  # numbers for JSON (default: the formatted cells)


@dataclass
class Section:
    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, Path]] = field(default_factory=list)


@dataclass
class Report:
    tracking_uri: str
    sections: list[Section]
    stats: pd.DataFrame
    link_base: Path | None = None

    def markdown(self) -> str:
        out = []
        for section in self.sections:
            out += ["#" * section.level + " " + section.title, ""]
            for i, line in enumerate(section.text):
                tight = i and line.startswith("- ") and section.text[i - 1].startswith("- ")
                out += [line] if tight or not out[-1] else ["", line] if i else [line]
            out += [""] if section.text else []
            for table in section.tables:
                if table.title:
                    out += [f"**{table.title}**", ""]
                out += [to_markdown(table.frame) if not table.frame.empty else "_no finished trials with these metrics_", ""]
                out += [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
            for title, path in section.plots:
                out += [f"![{title}]({self._link(path)})", ""]
        return "\n".join(out).rstrip() + "\n"

    def _link(self, path: Path) -> str:
        base = self.link_base or Path.cwd()
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()

    def json(self) -> str:
        sections = [{"title": s.title, "level": s.level, "text": s.text,
                     "tables": [{"title": t.title, "columns": [str(c) for c in t.frame.columns],
                                 "rows": t.frame.astype(str).values.tolist(), "records": t.records} for t in s.tables],
                     "plots": [{"title": title, "path": self._link(p)} for title, p in s.plots]} for s in self.sections]
        doc = {"tracking_uri": self.tracking_uri, "generated": _now(), "sections": sections,
               "stats": self.stats.astype(object).where(self.stats.notna(), None).to_dict("records")}
        return json.dumps(_finite(doc), indent=1, allow_nan=False)

    def csv(self) -> str:
        return self.stats.to_csv(index=False)

    def render(self, fmt_name: str) -> str:
        return {"markdown": self.markdown, "json": self.json, "csv": self.csv}[fmt_name]()


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def _now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table: header, separator, one line per row; '|' inside a cell is escaped."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    sep = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *rows])


# ---------------------------------------------------------------- tables


def methods_of(study: StudyRuns, cfg: ReportConfig, split: str) -> list[str]:
    """Method specs with plain metrics in this study: the YAML's ``methods`` (in order) when
    given, else every method that reports plain ``<split>/<method>/<metric>`` names."""
    keys = set(study.frame["key"])
    if cfg.methods:
        return [m for m in cfg.methods if any(k.startswith(f"{split}/{m}/") for k in keys)]
    rows = study.frame[(study.frame["split"] == split) & (study.frame["axes"] == "")]
    present = sorted(set(rows["method"]))
    return ([cfg.baseline] if cfg.baseline in present else []) + [m for m in present if m != cfg.baseline]


def metrics_of(study: StudyRuns, cfg: ReportConfig, split: str) -> list[str]:
    present = set(study.frame.loc[study.frame["split"] == split, "metric"])
    return [m for m in cfg.headline_metrics if m in present]


def column(cfg: ReportConfig, method: str, taken: list[str]) -> str:
    """A method's column name, kept apart from param columns of the same name (wm_attention's
    ``attention`` is both a swept param and a method)."""
    label = cfg.label(method)
    return f"{label} (method)" if label in taken else label


def metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric)


def headline_table(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> Table:
    """Method x metric (each cell mean ± 95% t-interval over seeds, n shown), per swept cell."""
    split, metrics = cfg.split, metrics_of(study, cfg, cfg.split)
    rows = []
    for cell in study.cells():
        for spec in methods_of(study, cfg, split):
            values = [stats.text(cell, f"{split}/{spec}/{m}") for m in metrics]
            if any(v != "—" for v in values):
                rows.append({**study.cell_dict(cell), "Method": cfg.label(spec),
                             **{metric_label(m): v for m, v in zip(metrics, values)}})
    return Table(f"{split} metrics, mean ± 95% t-interval over seeds (n)", pd.DataFrame(rows))


def grid_tables(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> list[Table]:
    """One table per headline metric: rows = swept cells, columns = methods."""
    split, tables = cfg.split, []
    methods = methods_of(study, cfg, split)
    for metric in metrics_of(study, cfg, split):
        rows = [{**study.cell_dict(cell),
                 **{column(cfg, m, study.cell_params): stats.text(cell, f"{split}/{m}/{metric}") for m in methods}}
                for cell in study.cells()]
        tables.append(Table(f"{split} {metric_label(metric)} vs {', '.join(study.axes)}", pd.DataFrame(rows)))
    return tables


def eval_signatures(study: StudyRuns, cfg: ReportConfig) -> dict[tuple, list[str]]:
    """Eval-axis signatures worth a table -> the methods reporting them. A study without swept
    params gets every axis that takes more than one value; a study with swept params only the
    axes its YAML entry declares (the family defaults would repeat the same table everywhere)."""
    rows = study.frame[(study.frame["split"] == cfg.split) & (study.frame["axes"] != "")]
    allowed = {m.split(":")[0] for m in cfg.methods} if cfg.methods else None
    values: dict[str, set] = {}
    for axes in set(rows["axes"]):
        for name, value in axis_items(axes):
            values.setdefault(name, set()).add(value)
    varying = {a for a, v in values.items() if len(v) > 1}
    interest = varying if not study.cell_params else varying & set(study.spec.get("eval") or {})
    order = [m.split(":")[0] for m in cfg.methods] + sorted(set(rows["method"]))
    out: dict[tuple, set[str]] = {}
    for (method, axes), _ in rows.groupby(["method", "axes"]):
        signature = tuple(name for name, _ in axis_items(axes))
        if set(signature) & interest and (allowed is None or method in allowed):
            out.setdefault(signature, set()).add(method)
    return {sig: sorted(methods, key=order.index) for sig, methods in out.items()}


def axis_combos(study: StudyRuns, signature: tuple, methods: list[str], split: str) -> list[str]:
    rows = study.frame[(study.frame["split"] == split) & study.frame["method"].isin(methods)]
    combos = {a for a in set(rows["axes"]) if tuple(n for n, _ in axis_items(a)) == signature}
    return sorted(combos, key=lambda a: tuple(_order(v) for _, v in axis_items(a)))


def eval_tables(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> list[Table]:
    """Metric vs eval-axis value (rows), per method (columns), per swept cell."""
    split, tables = cfg.split, []
    for signature, methods in eval_signatures(study, cfg).items():
        combos = axis_combos(study, signature, methods, split)
        for metric in metrics_of(study, cfg, split):
            rows = []
            for cell in study.cells():
                for axes in combos:
                    items = axis_items(axes)
                    taken = [*study.cell_params, *signature]
                    values = {column(cfg, m, taken): stats.text(cell, metric_key(split, m, metric, **dict(items)))
                              for m in methods}
                    if any(v != "—" for v in values.values()):
                        rows.append({**study.cell_dict(cell), **dict(items), **values})
            if rows:
                tables.append(Table(f"{split} {metric_label(metric)} vs {', '.join(signature)}", pd.DataFrame(rows)))
    return tables


def perf_table(study: StudyRuns, stats: StudyStats) -> Table | None:
    keys = sorted(k for k in set(study.frame["key"]) if k.startswith("perf/"))
    if not keys:
        return None
    rows = [{**study.cell_dict(cell), **{k: stats.text(cell, k) for k in keys}} for cell in study.cells()]
    return Table("timings (perf/, ms), mean ± 95% t-interval over seeds (n)", pd.DataFrame(rows))


def _pvals(tests: list, attr: str) -> list[float | None]:
    return holm([getattr(t, attr) if t is not None else None for t in tests])


def baseline_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """Every method against the family's baseline, per cell and headline metric, paired by seed."""
    split, baseline = cfg.split, cfg.baseline
    if not baseline:
        return None
    frame = study.frame
    entries = []
    for cell in study.cells():
        for spec in methods_of(study, cfg, split):
            if spec == baseline:
                continue
            for metric in metrics_of(study, cfg, split):
                key_a, key_b = f"{split}/{spec}/{metric}", f"{split}/{baseline}/{metric}"
                a, b = cell_sides(frame, study.cell_dict(cell), key_a, key_b)
                if rows_of(frame, a).empty or rows_of(frame, b).empty:
                    continue
                pairs = paired_values(frame, study.cell_params, a, b)
                entries.append((cell, spec, metric, paired_test(pairs["a"], pairs["b"]) if not pairs.empty else None))
    if not entries:
        return None
    tests = [e[3] for e in entries]
    p_t, p_w = _pvals(tests, "p_t"), _pvals(tests, "p_wilcoxon")
    rows, records = [], []
    for (cell, spec, metric, t), pt, pw in zip(entries, p_t, p_w):
        rows.append({**study.cell_dict(cell), "Method": cfg.label(spec), "Metric": metric_label(metric),
                     "A − B [95% CI]": _diff_text(t), "t-test p (Holm)": _p_pair(t, "p_t", pt),
                     "Wilcoxon p (Holm)": _p_pair(t, "p_wilcoxon", pw), "d_z": _dz(t),
                     "P(A>B)": "n/a" if t is None or t.p_a_gt_b is None else f"{t.p_a_gt_b:.2f}",
                     "n": t.n if t else 0})
        records.append({"cell": study.label(cell), "method": spec, "baseline": baseline, "metric": metric,
                        **_test_record(t), "p_t_holm": pt, "p_wilcoxon_holm": pw})
    notes = [f"A = the method, B = {cfg.label(baseline)} in the same cell, paired by seed; p-values two-sided, "
             f"Holm-adjusted over the {len(entries)} comparisons of this table (raw p first, adjusted in parentheses); "
             "d_z = mean/sd of the paired differences; P(A>B) = share of seeds with A > B (ties count 1/2)."]
    title = f"paired comparisons against the baseline {cfg.label(baseline)} ({split})"
    return Table(title, pd.DataFrame(rows), notes, records)


def _test_record(t) -> dict:
    if t is None:
        return {"n": 0}
    return {"n": t.n, "mean_a": _none(t.mean_a), "mean_b": _none(t.mean_b), "diff": _none(t.diff),
            "diff_ci": list(t.diff_ci) if t.diff_ci else None, "p_t": t.p_t, "p_wilcoxon": t.p_wilcoxon,
            "d_z": t.d_z, "p_a_gt_b": t.p_a_gt_b, "note": t.note}


def _diff_text(t) -> str:
    if t is None or t.n == 0:
        return "n/a (no paired seeds)"
    ci = t.diff_ci
    if ci is None:
        return f"{fmt(t.diff, signed=True)} (n={t.n}, no interval)"
    return f"{fmt(t.diff, signed=True)} [{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]"


def _p_pair(t, attr: str, adjusted) -> str:
    if t is None:
        return "n/a"
    raw = getattr(t, attr)
    if raw is None:
        return f"n/a ({t.note or 'no non-zero difference'})"
    return f"{format_p(raw)} ({format_p(adjusted)})"


def _dz(t) -> str:
    if t is None or t.d_z is None:
        return "n/a" + (f" ({t.note})" if t is not None and t.note else "")
    return f"{t.d_z:.2f}"


def find_reference(study: StudyRuns, wanted: dict) -> tuple | None:
    for cell in study.cells():
        values = study.cell_dict(cell)
        if all(p in values and same_value(values[p], v) for p, v in wanted.items()):
            return cell
    return None


def _against_reference(study: StudyRuns, key: str, ref: tuple, cells: list[tuple]) -> list[tuple]:
    """(test, Holm p t-test, Holm p Wilcoxon) of ``key`` in each cell vs the reference cell."""
    tests = []
    for cell in cells:
        pairs = paired_values(study.frame, study.cell_params, Side.of(key, study.cell_dict(cell)),
                              Side.of(key, study.cell_dict(ref)))
        tests.append(paired_test(pairs["a"], pairs["b"]) if not pairs.empty else None)
    return list(zip(tests, _pvals(tests, "p_t"), _pvals(tests, "p_wilcoxon")))


def ab_table(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> Table | None:
    """Each cell of an A/B study against its reference cell (same seeds): mean ± CI per metric,
    the paired difference and its Holm-adjusted p-values (over the cells, per method and metric),
    and one verdict line per cell."""
    wanted = cfg.reference.get(study.name)
    if not wanted:
        return None
    ref = find_reference(study, wanted)
    if ref is None:
        return Table("A/B against the reference cell", pd.DataFrame([{"reference": str(wanted), "cells": "not in the data"}]),
                     [f"the reference cell {wanted} has no finished trials in this sweep"])
    split, metrics = cfg.split, metrics_of(study, cfg, cfg.split)
    others = [c for c in study.cells() if c != ref]
    keys = set(study.frame["key"])
    rows, notes, records = [], [], []
    for method in [m for m in cfg.focus_methods if any(k.startswith(f"{split}/{m}/") for k in keys)]:
        results = {m: _against_reference(study, f"{split}/{method}/{m}", ref, others) for m in metrics}
        row = {"Cell": study.label(ref) + " (reference)", "Method": cfg.label(method)}
        for m in metrics:
            row.update({metric_label(m): stats.text(ref, f"{split}/{method}/{m}"), f"Δ {metric_label(m)}": "—",
                        f"p {metric_label(m)} t/W (Holm)": "—"})
        rows.append(row)
        for i, cell in enumerate(others):
            row, verdict = {"Cell": study.label(cell), "Method": cfg.label(method)}, []
            for m in metrics:
                t, p_t, p_w = results[m][i]
                row.update({metric_label(m): stats.text(cell, f"{split}/{method}/{m}"), f"Δ {metric_label(m)}": _diff_text(t),
                            f"p {metric_label(m)} t/W (Holm)": f"{format_p(p_t)} / {format_p(p_w)}"})
                verdict.append(_verdict(m, t, p_t))
                records.append({"cell": study.label(cell), "reference": study.label(ref), "method": method, "metric": m,
                                **_test_record(t), "p_t_holm": p_t, "p_wilcoxon_holm": p_w})
            rows.append(row)
            notes.append(f"**{study.label(cell)}** vs reference ({cfg.label(method)}): " + "; ".join(verdict))
    if not rows:
        return None
    notes.append(f"Δ = cell − reference over the same seeds; t = paired t-test, W = Wilcoxon signed-rank; p-values "
                 f"Holm-adjusted over the {len(others)} cells for each method and metric; significant at p < {ALPHA}.")
    return Table(f"A/B: every cell against the reference {study.label(ref)} ({split})", pd.DataFrame(rows), notes, records)


def drop_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """The seed's robustness shape: per method, how much the first headline metric falls from
    the param's first value to each other value, paired by seed (drop = value(first) - value(v))."""
    param, split = cfg.drops.get(study.name), cfg.split
    metrics = metrics_of(study, cfg, split)
    if not param or param not in study.axes or not metrics:
        return None
    metric = metrics[0]
    values = sorted({study.cell_dict(c)[param] for c in study.cells()}, key=_order)
    rows = []
    for method in methods_of(study, cfg, split):
        side = Side.of(f"{split}/{method}/{metric}")
        row = {"Method": cfg.label(method)}
        for value in values[1:]:
            drops = paired_values(study.frame, study.cell_params, side, side, {"param": param, "from": values[0], "to": value})
            row[f"{param}={value}"] = format_interval(*t_interval(drops["a"].tolist()))
        rows.append(row)
    return Table(f"{split} {metric_label(metric)} drop from {param}={values[0]} (mean ± 95% t-interval over seeds, n)",
                 pd.DataFrame(rows), [f"drop = {metric_label(metric)} at {param}={values[0]} minus at the column's value, "
                                      "per seed (same seed in both cells); positive = the metric fell."])


def _verdict(metric: str, t, p_adj: float | None) -> str:
    name = metric_label(metric)
    if t is None or t.n < 2:
        return f"{name}: n/a ({'no paired seeds' if t is None or t.n == 0 else t.note})"
    if p_adj is None:
        return f"{name}: no difference ({t.note})"
    if p_adj >= ALPHA:
        return f"{name}: no significant difference (Δ = {fmt(t.diff, signed=True)}, {p_is(p_adj)} after Holm)"
    better = (t.diff < 0) == lower_is_better(metric)
    word = ("higher" if t.diff > 0 else "lower") + (" (better)" if better else " (worse)")
    return f"{name} {word}, Δ = {fmt(t.diff, signed=True)}, {p_is(p_adj)} after Holm"


def ranking_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """Search studies (sampled configs, one run each): the best trials by the objective."""
    objective, mode = cfg.objective.get("metric"), cfg.objective.get("mode", "max")
    frame = study.frame
    per_run = frame[frame["key"] == objective].set_index("run_id")["value"]
    if per_run.empty:
        return None
    best = per_run.sort_values(ascending=mode == "min").head(RANKED_TRIALS)
    method, rows = cfg.objective_method, []
    for run_id, value in best.items():
        run = frame[frame["run_id"] == run_id]
        first = run.iloc[0]
        row = {"seed": first["seed"], **{p: first[f"param.{p}"] for p in study.cell_params}, objective: fmt(value)}
        for metric in metrics_of(study, cfg, cfg.split):
            hit = run.loc[run["key"] == f"{cfg.split}/{method}/{metric}", "value"]
            row[f"{cfg.split} {metric_label(metric)}"] = fmt(float(hit.iloc[0])) if len(hit) else "—"
        rows.append(row)
    return Table(f"best {len(rows)} of {per_run.size} trials by {objective} ({mode}); single runs, n = 1 each",
                 pd.DataFrame(rows))


def best_configuration(study_stats: list[StudyStats], cfg: ReportConfig) -> dict | None:
    """The cell with the best mean objective over seeds, across the studies given."""
    objective, mode = cfg.objective.get("metric"), cfg.objective.get("mode", "max")
    best = None
    for st in study_stats:
        for cell in st.study.cells():
            mean, half, n = st.get(cell, objective)
            if n and (best is None or (mean > best[0] if mode == "max" else mean < best[0])):
                best = (mean, st, cell)
    if best is None:
        return None
    _, st, cell = best
    study = st.study
    changed = ", ".join(f"{k}={v}" for k, v in study.changed.items())
    config = "; ".join(x for x in (study.label(cell) if cell else "", changed) if x) or "defaults"
    row = {"Study": study.name, "Configuration": config,
           "Dataset": ", ".join(sorted(set(study.frame["dataset"]) - {""})) or "?",
           f"{objective} ({mode})": st.text(cell, objective)}
    for metric in cfg.headline_metrics:
        key = f"{cfg.split}/{cfg.objective_method}/{metric}"
        if st.get(cell, key)[2]:
            row[f"{cfg.split} {metric_label(metric)}"] = st.text(cell, key)
    return row


# ---------------------------------------------------------------- assembling a report


def claims_section(claims: list, studies: list[StudyRuns]) -> Section:
    results = check_claims(claims, {s.name: (s.frame, s.cell_params) for s in studies})
    table = pd.DataFrame([{"Claim": r.claim.text, "Study": r.claim.study, "Status": r.status, "Evidence": r.evidence}
                          for r in results])
    note = (f"Status from a paired t-test over seeds, Holm-adjusted across the claims of this report ({len(claims)}) "
            f"(alpha {ALPHA}); VALIDATED: significant in the claimed direction; INVALIDATED: significant against it, "
            "or the 95% CI of the difference inside the claim's margin; INCONCLUSIVE: otherwise (or n < 2).")
    return Section("Claims", 2, tables=[Table("", table, [note], [r.record() for r in results])])


def fill_study_section(sec: Section, family: str, study: StudyRuns, stats: StudyStats, cfg: ReportConfig,
                       is_headline: bool, plots_dir: Path | None) -> None:
    """A study's tables (the headline study's own table is already in ``sec``) and plots."""
    if study.changed:
        sec.text.append("Every trial differs from the YAML defaults in: "
                        + ", ".join(f"{k}={v}" for k, v in study.changed.items()))
    if study.failed:
        sec.text.append("Not counted: " + "; ".join(study.failed))
    if study.is_search:
        sec.tables += [t for t in [ranking_table(study, cfg)] if t]
    else:
        if not is_headline:
            sec.tables += grid_tables(study, stats, cfg) if study.cell_params else [headline_table(study, stats, cfg)]
        sec.tables += eval_tables(study, stats, cfg)
        extra = (drop_table(study, cfg), ab_table(study, stats, cfg), baseline_table(study, cfg), perf_table(study, stats))
        sec.tables += [t for t in extra if t]
    if plots_dir is not None:
        from orchestrator.plots import study_plots  # matplotlib only when plots are asked for

        sec.plots += study_plots(family, study, stats, cfg, Path(plots_dir))


def family_sections(tracking_uri: str, family: str, doc: dict, study: str | None = None, sweep_id: str | None = None,
                    plots_dir: Path | None = None) -> tuple[list[Section], list[dict], dict | None]:
    """The markdown sections of one family, its per-cell statistics, and its best configuration."""
    cfg = ReportConfig.from_doc(doc, family)
    claims = parse_claims(doc, family)
    frame = load_runs(tracking_uri, family, study, sweep_id)
    scope = ", ".join(x for x in (study and f"study {study}", sweep_id and f"sweep {sweep_id}") if x)
    head = Section(f"{family}{f' ({scope})' if scope else ''}", 1, [doc.get("description", "")])
    if frame.empty:
        head.text += [f"No trial runs of {family}{f' ({scope})' if scope else ''} in {tracking_uri}."]
        return [head], [], None
    studies = select_studies(frame, doc, sweep_id)
    stats = [StudyStats(s) for s in studies]
    head.text += [f"Source: MLflow `{tracking_uri}`, experiment `{family}`; generated {_now()}.",
                  f"Statistics: mean ± 95% Student-t interval over seeds with n; n = 1 is shown as such (no interval). "
                  f"Only trials with status `finished` count."]
    for s in studies:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
        ignored = f"; older sweeps left out: {', '.join(s.ignored)} (use --sweep)" if s.ignored else ""
        head.text.append(f"- study `{s.name}`: sweep {', '.join(s.sweeps)}: {counts}{ignored}")
    sections = [head]

    chosen = [s for s in studies if s.name == cfg.headline_study] or studies[:1]
    headline, headline_stats = chosen[0], stats[studies.index(chosen[0])]
    title = "Headline: study" if headline.name == cfg.headline_study else "Study"
    top = Section(f"{title} `{headline.name}`", 2, [headline.spec.get("description", "")])
    top.tables.append(headline_table(headline, headline_stats, cfg))
    sections.append(top)

    in_scope = claims if not (study or sweep_id) else [c for c in claims if c.study in {s.name for s in studies}]
    if in_scope:
        sections.append(claims_section(in_scope, studies))

    best = best_configuration(stats, cfg)
    if best:
        sections.append(Section("Best configuration", 2, [f"By the objective {cfg.objective.get('metric')} "
                                                          f"({cfg.objective.get('mode')}), mean over seeds, across the "
                                                          "studies above."], [Table("", pd.DataFrame([best]))]))

    for s, st in zip(studies, stats):
        sec = top if s is headline else Section(f"Study `{s.name}`", 2, [s.spec.get("description", "")])
        fill_study_section(sec, family, s, st, cfg, s is headline, plots_dir)
        if s is not headline:
            sections.append(sec)
    records = [r for st in stats for r in st.records(family)]
    return sections, records, ({"Family": family, **best} if best else None)


def build_report(tracking_uri: str, families, study: str | None = None, sweep_id: str | None = None,
                 plots_dir: Path | None = None, link_base: Path | None = None, docs: dict | None = None,
                 summary: bool | None = None) -> Report:
    """A report over one family (a name) or several (a list). ``docs`` maps a family to its YAML
    document (default: ``search_spaces/<family>.yaml``); ``summary`` (default: several families)
    puts the cross-family summary first."""
    from orchestrator.spaces import load_family_file

    families = [families] if isinstance(families, str) else list(families)
    sections, records, best = [], [], []
    for family in families:
        doc = (docs or {}).get(family) or load_family_file(family)
        s, r, b = family_sections(tracking_uri, family, doc, study, sweep_id, plots_dir)
        sections += s
        records += r
        best += [b] if b else []
    if summary or (summary is None and len(families) > 1):
        summary = Section("Cross-family summary", 1, ["Best configuration of each family by its YAML objective "
                                                      "(mean ± 95% t-interval over seeds, n shown) and its key test metrics."])
        summary.tables.append(Table("", pd.DataFrame(best).fillna("—") if best else
                                    pd.DataFrame([{"Family": ", ".join(families), "Result": "no finished trials"}])))
        sections = [summary] + sections
    sections.append(Section("Notes", 2, [NO_RELIABILITY] + ([] if plots_dir is not None else
                                                           ["Plots: none requested (--plots DIR, or --out FILE.md)."])))
    return Report(tracking_uri, sections, pd.DataFrame(records), link_base)


def log_to_parent(tracking_uri: str, family: str, sweep_id: str, report_path: Path, plots_dir: Path | None) -> str | None:
    """Attach the report (and its plots under ``plots/``) to the sweep's parent run; returns the
    run id, or None when the sweep has no parent run in this store."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.role = 'parent'", max_results=1)
    if not found:
        return None
    run_id = found[0].info.run_id
    client.log_artifact(run_id, str(report_path))
    if plots_dir is not None and Path(plots_dir).is_dir() and any(Path(plots_dir).iterdir()):
        client.log_artifacts(run_id, str(plots_dir), "plots")
    return run_id


def write_sweep_report(outcome, study) -> Path | None:
    """The sweep's report (with plots/) next to its Tune results, and as an artifact of its
    MLflow parent run."""
    from orchestrator.tracking import warn

    base = Path(outcome.experiment_path)
    try:
        report = build_report(outcome.tracking_uri, study.family, sweep_id=outcome.sweep_id, plots_dir=base / "plots",
                              link_base=base)
    except Exception as exc:  # noqa: BLE001 - a finished sweep must not end in a traceback over its report
        warn(f"no report written ({str(exc).splitlines()[0][:200]}); once MLflow holds the runs: "
             f"orchestrate report {study.family} --sweep {outcome.sweep_id} --out report.md")
        return None
    path = base / "report.md"
    path.write_text(report.markdown())
    try:
        log_to_parent(outcome.tracking_uri, study.family, outcome.sweep_id, path, base / "plots")
    except Exception as exc:  # noqa: BLE001 - the report on disk is what matters if MLflow is down
        warn(f"report not logged to MLflow: {exc}")
    return path


# ---------------------------------------------------------------- the `orchestrate report` command


def require_store(uri: str) -> None:
    """Reading must not create an empty store where the user mistyped a path."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file:"):] if uri.startswith("file:") else uri)
    else:
        return
    if not path.exists():
        raise UsageError(f"no MLflow store at {path} (run a sweep first, or pass --tracking-uri)")


def choose_families(names: list[str], every: bool, tracking_uri: str) -> list[str]:
    from orchestrator.spaces import available_families, load_family_file

    if not names and not every:
        raise UsageError("name a FAMILY or --all")
    for name in names:
        load_family_file(name)  # unknown family / malformed YAML: one clear line
    if every:
        client = MlflowClient(tracking_uri)
        names = names + [f for f in available_families() if f not in names and client.get_experiment_by_name(f)]
    return names


def write_report(tracking_uri: str, names: list[str], every: bool, study: str | None, sweep_id: str | None,
                 out: str | None, fmt_name: str, plots_dir: str | None) -> tuple[str | None, list[str]]:
    """Build the report; returns (text for stdout or None, status lines). With ``--out FILE.md``
    the plots default to ``FILE_plots/`` beside it; with ``--sweep`` and ``--out`` the report
    and its plots are also logged to that sweep's parent run."""
    require_store(tracking_uri)
    families = choose_families(names, every, tracking_uri)
    out_path = Path(out) if out else None
    if plots_dir is None and out_path is not None and fmt_name == "markdown":
        plots_dir = str(out_path.parent / f"{out_path.stem}_plots")
    report = build_report(tracking_uri, families, study, sweep_id, Path(plots_dir) if plots_dir else None,
                          link_base=out_path.parent if out_path else Path.cwd(), summary=every or len(families) > 1)
    if report.stats.empty:
        scope = "".join(f", {k} {v}" for k, v in (("study", study), ("sweep", sweep_id)) if v)
        raise UsageError(f"no finished trial runs of {', '.join(families) or 'any family'}{scope} in {tracking_uri}")
    text = report.render(fmt_name)
    if out_path is None:
        return text, []
    out_path.write_text(text)
    plotted = plots_dir and Path(plots_dir).is_dir()
    lines = [f"report written to {out_path}" + (f" (plots in {plots_dir})" if plotted else "")]
    if sweep_id:
        for family in families:
            run_id = log_to_parent(tracking_uri, family, sweep_id, out_path, Path(plots_dir) if plots_dir else None)
            if run_id:
                lines.append(f"logged to MLflow parent run {run_id} of sweep {sweep_id}")
    return None, lines
