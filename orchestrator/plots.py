"""PNG figures for reports (matplotlib, Agg backend: no display needed).

Two shapes cover every study: curves (a metric against a numeric swept value, one line per
series, a shaded 95% t-interval where n >= 2) and cells (a metric per named cell with error
bars, the reference cell highlighted). Each figure has one panel per metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

MAX_SERIES = 10


@dataclass
class Series:
    label: str
    x: list = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    half: list[float] = field(default_factory=list)  # NaN where n < 2: no band there


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
            lo = [m - h if not math.isnan(h) else m for m, h in zip(s.mean, s.half)]
            hi = [m + h if not math.isnan(h) else m for m, h in zip(s.mean, s.half)]
            ax.fill_between(s.x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _finish(fig, path)


def cells(path: Path, title: str, labels: list[str], panels: list[Panel], reference: str | None = None) -> Path:
    """A metric per cell (x: the cells by name) with 95% t-interval error bars; one marker per
    series, the reference cell's label in bold."""
    fig, axes = _grid(len(panels), width=max(4.2, 0.55 * len(labels) + 1.5), height=3.8)
    positions = {label: i for i, label in enumerate(labels)}
    for ax, panel in zip(axes, panels):
        count = max(1, len(panel.series[:MAX_SERIES]))
        for j, s in enumerate(panel.series[:MAX_SERIES]):
            offset = (j - (count - 1) / 2) * 0.12
            xs = [positions[c] + offset for c in s.x]
            err = [0.0 if math.isnan(h) else h for h in s.half]
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
