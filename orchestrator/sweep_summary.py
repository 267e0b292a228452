"""A sweep's summary on its MLflow parent run, so MLflow's own compare view can rank sweeps.

Metric names (all within what MLflow accepts: ``/``, word characters, ``.``, ``-``, ``:``, space):

- ``<cell>/<key>/mean``, ``<cell>/<key>/ci95`` and ``<cell>/<key>/n``: over the seeds of one
  grid cell, the mean, the 95% Student-t half-width (absent for n = 1: no interval exists) and
  the seed count of ``<key>``, which is the study's objective (``val/busy/acc``) or a headline
  metric of any method on the test split without eval axes (``test/attn_knn/acc``). ``<cell>``
  is ``cell`` followed by the grid's ``:<param>:<value>`` pairs (``cell:lr:0.1``; just ``cell``
  for a study with one grid point), the same colon pairs eval axes use in metric names.
- ``best/<key>/mean`` and ``best/<key>/ci95``: the same for the cell with the best objective.

Search studies (a ``space``) sample their cells, so each trial is its own; there ``best/<key>``
is the best trial's value. The description (``mlflow.note.content``) names the study, what it
varies and the headline result. Only finished, non-diverged trials count.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from mlflow.entities import Metric, RunTag

from orchestrator.spaces import Study, describe_study
from orchestrator.stats import format_interval, t_interval
from orchestrator.tracking import CHILD
from trainables.common.metrics import parse_metric_key

CELL, BEST = "cell", "best"
NOTE_TAG = "mlflow.note.content"
_UNSAFE = re.compile(r"[^\w.\-]")  # a value inside one name segment: no '/', ':' or space


@dataclass
class CellSummary:
    cell: dict  # grid parameter -> value
    stats: dict[str, tuple[float, float, int]]  # key -> (mean, half-width (NaN for n=1), n)


def cell_name(cell: dict) -> str:
    return ":".join([CELL, *(f"{_UNSAFE.sub('_', str(k))}:{_UNSAFE.sub('_', str(v))}" for k, v in cell.items())])


def summary_keys(metrics: dict, objective: str, headline: list[str]) -> list[str]:
    """The objective, then every test-split headline metric without eval axes, in name order."""
    keys = [k for k in sorted(metrics) if (p := parse_metric_key(k)) and p["split"] == "test"
            and not p["axes"] and p["metric"] in headline and k != objective]
    return [objective, *keys]


def summarize(study: Study, trials: list[tuple[dict, dict]], headline: list[str]) -> list[CellSummary]:
    """Per grid cell, the statistics of :func:`summary_keys` over the cell's counted trials
    (``trials``: (config, final metrics) of each trial), cells in first-seen order."""
    objective = study.objective["metric"]
    counted = [(c, m) for c, m in trials if _finite(m.get(objective)) and not m.get("diverged")]
    groups: dict[tuple, list[dict]] = {}
    cell_keys = list(study.grid) if not study.space else [*study.grid, *study.space]
    for config, metrics in counted:
        cell = tuple((k, config.get(k)) for k in cell_keys)
        if study.space:  # each sampled trial is a cell of its own
            cell += (("trial", len(groups)),)
        groups.setdefault(cell, []).append(metrics)
    out = []
    for cell, runs in groups.items():
        keys = summary_keys(runs[0], objective, headline)
        stats = {k: t_interval([r.get(k) for r in runs if _finite(r.get(k))]) for k in keys}
        out.append(CellSummary(dict(c for c in cell if c[0] != "trial"), stats))
    return out


def best_cell(study: Study, cells: list[CellSummary]) -> CellSummary | None:
    objective, sign = study.objective["metric"], 1 if study.objective["mode"] == "max" else -1
    return max(cells, key=lambda c: sign * c.stats[objective][0], default=None)


def summary_metrics(study: Study, cells: list[CellSummary]) -> dict[str, float]:
    out: dict[str, float] = {}
    if not study.space:
        for cell in cells:
            out.update(_stat_metrics(cell_name(cell.cell), cell))
    best = best_cell(study, cells)
    if best is not None:
        out.update(_stat_metrics(BEST, best, with_n=False))
    return out


def _stat_metrics(prefix: str, cell: CellSummary, with_n: bool = True) -> dict[str, float]:
    out = {}
    for key, (mean, half, n) in cell.stats.items():
        if n == 0:
            continue
        out[f"{prefix}/{key}/mean"] = mean
        if not math.isnan(half):
            out[f"{prefix}/{key}/ci95"] = half
        if with_n:
            out[f"{prefix}/{key}/n"] = float(n)
    return out


def note(study: Study, cells: list[CellSummary], trials: int) -> str:
    """The parent run's description: the study, what it varies, the headline result."""
    objective = study.objective["metric"]
    lines = [f"**{study.family} / {study.name}**: {study.description}",
             f"Varies: {describe_study(study)}; {trials} trials, objective `{objective}` ({study.objective['mode']}).",
             "Metrics: `cell:<param>:<value>/<metric>/mean|ci95|n` per grid cell over seeds (95% t-interval "
             "half-width), `best/...` for the best cell."]
    best = best_cell(study, cells)
    if best is None:
        lines.append("Result: no finished trial reported the objective.")
    else:
        where = ", ".join(f"{k}={v}" for k, v in best.cell.items()) or "the only cell"
        what = "trial" if study.space else "cell"
        shown = [f"`{k}` {format_interval(*s)}" for k, s in best.stats.items()][:4]
        lines.append(f"Best {what} ({where}): " + "; ".join(shown) + ".")
    return "\n\n".join(lines)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline_metrics(family: str) -> list[str]:
    """The family's ``report.headline_metrics`` (the report's default when it names none)."""
    from orchestrator.report_config import ReportConfig
    from orchestrator.spaces import load_family_file

    doc = load_family_file(family)
    return ReportConfig.from_doc(doc, family).headline_metrics


def stored_trials(tracker) -> list[tuple[dict, dict]]:
    """(params, final metrics) of the sweep's finished trial runs in MLflow: for a sweep whose
    trials the driver does not hold all of (``--until-decided`` rounds share one parent run).
    Params are strings, as cell names print values anyway."""
    runs = tracker.find_runs(CHILD)
    return [(run.data.params, run.data.metrics) for run in runs if run.info.status == "FINISHED"]


def log_summary(tracker, study: Study, trials: list[tuple[dict, dict]] | None = None) -> int:
    """Log the summary and description on the sweep's parent run, from ``trials`` or (None) the
    store; only values that differ from what the run holds are written (a resumed sweep adds no
    duplicate points). Returns how many."""
    trials = stored_trials(tracker) if trials is None else trials
    cells = summarize(study, trials, headline_metrics(study.family))
    run = tracker.client.get_run(tracker.parent_id)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in summary_metrics(study, cells).items() if run.data.metrics.get(k) != v]
    text = note(study, cells, len(trials))
    tags = [RunTag(NOTE_TAG, text)] if run.data.tags.get(NOTE_TAG) != text else []
    for start in range(0, max(len(metrics), 1), 1000):
        tracker.client.log_batch(tracker.parent_id, metrics=metrics[start:start + 1000], tags=tags if start == 0 else [])
    return len(metrics)
