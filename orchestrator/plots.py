"""PNG figures for reports (matplotlib, Agg backend: no display needed).

Two shapes cover every study: curves (a metric against a numeric swept value, one line per
series, a shaded 95% t-interval where n >= 2, clipped to the metric's bounds) and cells (a metric per named cell with error
bars, the reference cell highlighted). Each figure has one panel per metric.
:func:`study_plots` picks the figures a study's data supports: every numeric swept param, every
numeric eval axis (studies without swept params), and the cells of A/B studies.
:func:`reliability_plots` draws the reliability diagrams of :mod:`orchestrator.reliability`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from orchestrator.report_config import ReportConfig, metric_label  # noqa: E402
from orchestrator.report_data import StudyRuns, StudyStats, axis_items, typed  # noqa: E402
from orchestrator.reliability import Diagram  # noqa: E402
from orchestrator.report_tables import axis_combos, eval_signatures, find_reference, methods_of, metrics_of  # noqa: E402
from trainables.common.metrics import metric_key  # noqa: E402

MAX_SERIES = 10


@dataclass
class Series:
    label: str
    x: list = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)  # the 95% interval, clipped to the metric's bounds;
    high: list[float] = field(default_factory=list)  # the mean itself where n < 2 (no band there)


@dataclass
class Panel:
    ylabel: str
    series: list[Series]


def _finish(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grid(count: int, width: float = 4.2, height: float = 3.3):
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, axes[0]


def curves(path: Path, title: str, xlabel: str, panels: list[Panel], log_x: bool = False) -> Path:
    """Metric vs a numeric value, one line per series with its 95% t-interval band."""
    fig, axes = _grid(len(panels))
    for ax, panel in zip(axes, panels):
        for s in panel.series[:MAX_SERIES]:
            line, = ax.plot(s.x, s.mean, marker="o", label=s.label)
            ax.fill_between(s.x, s.low, s.high, color=line.get_color(), alpha=0.18, linewidth=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def cell_errorbars(path: Path, title: str, labels: list[str], panels: list[Panel], reference: str | None = None) -> Path:
    """A metric per cell (x: the cells by name) with 95% t-interval error bars; one marker per
    series, the reference cell's label in bold."""
    fig, axes = _grid(len(panels), width=max(4.2, 0.55 * len(labels) + 1.5), height=3.8)
    positions = {label: i for i, label in enumerate(labels)}
    for ax, panel in zip(axes, panels):
        count = max(1, len(panel.series[:MAX_SERIES]))
        for j, s in enumerate(panel.series[:MAX_SERIES]):
            offset = (j - (count - 1) / 2) * 0.12
            xs = [positions[c] + offset for c in s.x]
            err = [[m - lo for m, lo in zip(s.mean, s.low)], [hi - m for m, hi in zip(s.mean, s.high)]]
            ax.errorbar(xs, s.mean, yerr=err, fmt="o", capsize=3, label=s.label)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        for tick in ax.get_xticklabels():
            if tick.get_text() == reference:
                tick.set_fontweight("bold")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3, axis="y")
    if any(len(p.series) > 1 for p in panels):
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


# ---------------------------------------------------------------- which figures a study gets


def _series(stats: StudyStats, cells_keys: list[tuple[tuple, str, object]], label: str) -> Series | None:
    s = Series(label)
    for cell, key, x in cells_keys:
        iv = stats.get(cell, key)
        if iv.n:
            s.x.append(x)
            s.mean.append(iv.mean)
            s.low.append(iv.mean if math.isnan(iv.low) else iv.low)
            s.high.append(iv.mean if math.isnan(iv.high) else iv.high)
    return s if s.x else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def _names(panels: list[Panel]) -> str:
    return ", ".join(p.ylabel for p in panels)


def _log_x(xs) -> bool:
    xs = [x for x in xs if isinstance(x, (int, float))]
    return bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20


def study_plots(family: str, study: StudyRuns, stats: StudyStats, cfg: ReportConfig, out: Path) -> list[tuple[str, Path]]:
    """Curves against every numeric swept param and every numeric eval axis (CI bands), and
    the cells of A/B studies with error bars."""
    split, metrics, made = cfg.split, metrics_of(study, cfg, cfg.split), []
    if not metrics or study.is_search:
        return made
    cells = study.cells()
    for axis in study.axes:
        xs = {cell: typed(study.cell_dict(cell)[axis]) for cell in cells}
        if len(set(xs.values())) < 2 or not all(isinstance(x, (int, float)) for x in xs.values()):
            continue
        others = [p for p in study.axes if p != axis]
        methods = methods_of(study, cfg, split) if not others else [m for m in cfg.focus_methods]
        groups: dict[tuple, list] = {}
        for cell in cells:
            groups.setdefault(tuple(study.cell_dict(cell)[p] for p in others), []).append(cell)
        panels = []
        for metric in metrics:
            series = []
            for method in methods:
                for group, members in groups.items():
                    suffix = ", ".join(f"{p}={v}" for p, v in zip(others, group))
                    s = _series(stats, [(c, f"{split}/{method}/{metric}", xs[c]) for c in sorted(members, key=xs.get)],
                                cfg.label(method) + (f" ({suffix})" if suffix else ""))
                    if s:
                        series.append(s)
            if series:
                panels.append(Panel(f"{split} {metric_label(metric)}", series))
        if panels:
            path = out / f"{_safe(family)}-{_safe(study.name)}-{_safe(axis)}.png"
            title = f"{family} / {study.name}: {_names(panels)} vs {axis}"
            made.append((title, curves(path, title, axis, panels, _log_x(xs.values()))))
    if not study.cell_params:
        made += _eval_axis_plots(family, study, stats, cfg, out, metrics)
    if cfg.reference.get(study.name):
        made += _ab_plot(family, study, stats, cfg, out, metrics)
    return made


def _eval_lines(study: StudyRuns, cfg: ReportConfig, axis: str) -> dict[str, list[tuple]]:
    """Line label -> sorted [(x, method, axes)] for the metric-vs-``axis`` plot: one line per
    method and per value of any other eval axis that varies alongside it."""
    lines: dict[str, list[tuple]] = {}
    for signature, methods in eval_signatures(study, cfg).items():
        if axis not in signature:
            continue
        combos = [dict(axis_items(a)) for a in axis_combos(study, signature, methods, cfg.split)]
        varying = [n for n in signature if n != axis and len({c[n] for c in combos}) > 1]
        for method in methods:
            for combo in combos:
                x = typed(combo[axis])
                if isinstance(x, (int, float)):
                    rest = ", ".join(f"{n}={combo[n]}" for n in varying)
                    lines.setdefault(cfg.label(method) + (f" ({rest})" if rest else ""), []).append((x, method, combo))
    return {label: sorted(points, key=lambda p: p[0]) for label, points in lines.items() if len(points) > 1}


def _eval_axis_plots(family, study, stats, cfg, out, metrics) -> list[tuple[str, Path]]:
    made = []
    for axis in sorted({a for signature in eval_signatures(study, cfg) for a in signature}):
        lines = _eval_lines(study, cfg, axis)
        panels = []
        for metric in metrics:
            series = [_series(stats, [((), metric_key(cfg.split, m, metric, **combo), x) for x, m, combo in points], label)
                      for label, points in lines.items()]
            if any(series):
                panels.append(Panel(f"{cfg.split} {metric_label(metric)}", [s for s in series if s]))
        if panels:
            path = out / f"{_safe(family)}-{_safe(study.name)}-{_safe(axis)}.png"
            title = f"{family} / {study.name}: {_names(panels)} vs {axis} (eval axis)"
            made.append((title, curves(path, title, axis, panels, _log_x([p[0] for ps in lines.values() for p in ps]))))
    return made


def _ab_plot(family, study, stats, cfg, out, metrics) -> list[tuple[str, Path]]:
    split = cfg.split
    ref = find_reference(study, cfg.reference[study.name])
    cells = study.cells()
    labels = [study.label(c) for c in cells]
    panels = []
    for metric in metrics:
        series = [s for s in (_series(stats, [(c, f"{split}/{m}/{metric}", study.label(c)) for c in cells], cfg.label(m))
                              for m in cfg.focus_methods) if s]
        if series:
            panels.append(Panel(f"{split} {metric_label(metric)}", series))
    if not panels:
        return []
    path = out / f"{_safe(family)}-{_safe(study.name)}-cells.png"
    title = f"{family} / {study.name}: cells, mean ± 95% t-interval"
    return [(title, cell_errorbars(path, title, labels, panels, study.label(ref) if ref is not None else None))]


# ---------------------------------------------------------------- reliability diagrams


def reliability_figure(path: Path, title: str, panels: list[tuple[str, Diagram]]) -> Path:
    """One panel per diagram: accuracy against confidence per bin (mean over seeds, a 95% band
    across seeds), the diagonal of perfect calibration, ECE in the legend, and below it the
    bin counts as a histogram."""
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for (label, d), ax, hist in zip(panels, axes[0], axes[1]):
        width = 1.0 / d.bins
        centers = [(b + 0.5) * width for b in range(d.bins)]
        filled = [b for b in range(d.bins) if d.accuracy[b] is not None]
        xs = [d.confidence[b] if d.confidence[b] is not None else centers[b] for b in filled]
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
        line, = ax.plot(xs, [d.accuracy[b] for b in filled], marker="o",
                        label=f"{label}: ECE {d.ece.text()}")
        banded = [b for b in filled if d.accuracy_low[b] is not None]
        if banded:
            ax.fill_between([xs[filled.index(b)] for b in banded], [d.accuracy_low[b] for b in banded],
                            [d.accuracy_high[b] for b in banded], color=line.get_color(), alpha=0.18, linewidth=0)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{label} ({d.runs} seed{'s' if d.runs != 1 else ''})", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        hist.bar(centers, d.count, width=width * 0.9, color=line.get_color(), alpha=0.6)
        hist.set_xlabel("confidence (15 equal-width bins)" if d.bins == 15 else f"confidence ({d.bins} bins)")
        hist.set_ylabel("count")
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def reliability_plots(family: str, study: str, found: list[Diagram], cfg: ReportConfig,
                      pairs: list[tuple[str, Diagram, Diagram]], out: Path) -> list[tuple[str, Path]]:
    """``<family>-<study>-reliability-<method>.png`` for each method, and for each eval axis
    that a method varies, the before/after pair ``...-reliability-<method>-<axis>.png`` (at most
    :data:`MAX_SERIES` of each)."""
    made = []
    plain = {d.base for d in found if not d.axes}
    paired = {before.base for _, before, _ in pairs}
    # one diagram per method; an axis variant only where no plain diagram or pair shows its method
    singles = [d for d in found if not d.axes or (d.base not in plain and d.base not in paired)]
    for d in singles[:MAX_SERIES]:
        title = f"{family} / {study}: reliability of {_variant_label(cfg, d)}"
        path = out / f"{_safe(family)}-{_safe(study)}-reliability-{_safe(d.method)}.png"
        made.append((title, reliability_figure(path, title, [(_variant_label(cfg, d), d)])))
    for axis, before, after in pairs[:MAX_SERIES]:
        title = f"{family} / {study}: reliability of {cfg.label(before.base)}, {axis} {before.axes[axis]} vs {after.axes[axis]}"
        path = out / f"{_safe(family)}-{_safe(study)}-reliability-{_safe(before.base)}-{_safe(axis)}.png"
        made.append((title, reliability_figure(path, title, [(_variant_label(cfg, d), d) for d in (before, after)])))
    return made


def _variant_label(cfg: ReportConfig, d: Diagram) -> str:
    axes = ", ".join(f"{k}={v}" for k, v in d.axes.items())
    return cfg.label(d.method) if d.method in cfg.labels or not axes else f"{cfg.label(d.base)} ({axes})"
