"""Rankings of methods across datasets or tasks (``orchestrate report --across PARAM``).

Two views, both over a table of scores (task, method, seed, value):

- Demšar (2006), "Statistical comparisons of classifiers over multiple data sets": per task
  the methods are ranked by their mean over seeds (1 = best); the Friedman test
  (``scipy.stats.friedmanchisquare``) asks whether the average ranks differ at all, the
  Nemenyi post-hoc test (``scikit_posthocs.posthoc_nemenyi_friedman``) which pairs do, and
  the critical difference ``CD = q_alpha * sqrt(k (k + 1) / (6 N))`` (k methods, N tasks) is
  the gap in average rank beyond which two methods differ; the diagram is
  ``scikit_posthocs.critical_difference_diagram``.
- Agarwal et al. (2021), "Deep reinforcement learning at the edge of the statistical
  precipice": the interquartile mean (IQM, the mean of the middle 50% of every run on every
  task, ``scipy.stats.trim_mean(.., 0.25)``) with a 95% stratified-bootstrap interval (runs
  resampled within each task: ``scipy.stats.bootstrap`` with one sample per task), and the
  probability of improvement P(X > Y), the Mann-Whitney U / (n m) of X's runs against Y's on
  a task, averaged over tasks, with the same kind of interval.

The rliable package implements the second view but needs ``arch`` < 8, whose 7.x releases do
not import under the pandas 3 installed here (``deprecate_kwarg`` changed signature); the
definitions above are rliable's, computed with scipy. Scores are used as logged: metrics of
different scales across tasks should be normalised first (accuracies on different datasets
are comparable enough for ranks and IQM, and ranks need no normalisation at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator.errors import UsageError

ALPHA = 0.05
RESAMPLES = 2000
BOOTSTRAP_SEED = 2021


@dataclass
class Ranking:
    """The result of :func:`rank_methods` (``None`` fields with ``note`` where a test needs more)."""

    tasks: list[str]
    methods: list[str]
    means: pd.DataFrame  # task x method, mean over seeds
    ranks: pd.Series  # method -> average rank (1 = best)
    friedman_stat: float | None
    friedman_p: float | None
    nemenyi: pd.DataFrame | None  # method x method p-values
    cd: float | None
    iqm: dict  # method -> (iqm, low, high)
    improvement: dict  # (method x, method y) -> (P(X > Y), low, high)
    dropped: list[str]
    note: str = ""


def critical_difference(k: int, n_tasks: int, alpha: float = ALPHA) -> float:
    """Demšar's CD for the Nemenyi test: q_alpha is the studentized range quantile over sqrt 2."""
    q = stats.studentized_range.ppf(1 - alpha, k, np.inf) / math.sqrt(2)
    return float(q * math.sqrt(k * (k + 1) / (6 * n_tasks)))


def average_ranks(means: pd.DataFrame, lower_is_better: bool) -> pd.Series:
    """Rank the methods within each task (1 = best, ties share the mean rank), then average."""
    ranks = means.rank(axis=1, ascending=lower_is_better, method="average")
    return ranks.mean(axis=0).sort_values()


def iqm(values, axis=None) -> float | np.ndarray:
    """Interquartile mean: the mean of the middle 50% (25% trimmed off each end)."""
    out = stats.trim_mean(np.asarray(values, dtype=float), 0.25, axis=axis)
    return float(out) if np.ndim(out) == 0 else out


def _bootstrap(samples: list[np.ndarray], statistic) -> tuple[float, float]:
    """95% percentile interval of ``statistic(*samples, axis=-1)`` (vectorized over a leading
    batch axis), every sample resampled on its own: the stratified bootstrap."""
    if all(len(s) < 2 or np.ptp(s) == 0 for s in samples):
        value = float(statistic(*samples, axis=-1))
        return value, value  # nothing to resample: every run agrees
    result = stats.bootstrap(samples, statistic, n_resamples=RESAMPLES, vectorized=True, paired=False,
                             method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _iqm_of_tasks(*tasks, axis=-1):
    return iqm(np.concatenate(tasks, axis=axis), axis=axis)


def iqm_interval(per_task: list[np.ndarray]) -> tuple[float, float, float]:
    """IQM over every run of every task, with its stratified-bootstrap 95% interval."""
    low, high = _bootstrap(per_task, _iqm_of_tasks)
    return float(_iqm_of_tasks(*per_task)), low, high


def _beats(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 over all pairs of runs (the last axis), batch axes kept: the
    Mann-Whitney U over n m."""
    x, y = x[..., :, None], y[..., None, :]
    return np.mean((x > y) + 0.5 * (x == y), axis=(-2, -1))


def improvement_probability(x_tasks: list[np.ndarray], y_tasks: list[np.ndarray]) -> float:
    """Mean over tasks of P(X > Y) between the runs of X and of Y on that task."""
    return float(np.mean([_beats(np.asarray(x), np.asarray(y)) for x, y in zip(x_tasks, y_tasks)]))


def improvement_interval(x_tasks: list[np.ndarray], y_tasks: list[np.ndarray]) -> tuple[float, float, float]:
    t = len(x_tasks)

    def statistic(*samples, axis=-1):
        return np.mean([_beats(x, y) for x, y in zip(samples[:t], samples[t:])], axis=0)

    low, high = _bootstrap([*x_tasks, *y_tasks], statistic)
    return improvement_probability(x_tasks, y_tasks), low, high


def rank_methods(scores: pd.DataFrame, lower_is_better: bool = False, alpha: float = ALPHA) -> Ranking:
    """``scores``: columns task, method, seed, value. Methods missing on some task are dropped
    (ranks need every method on every task)."""
    means = scores.groupby(["task", "method"])["value"].mean().unstack("method")
    dropped = sorted(means.columns[means.isna().any()])
    means = means.drop(columns=dropped)
    tasks, methods = [str(t) for t in means.index], list(means.columns)
    if lower_is_better:  # IQM and P(X > Y) below compare raw values; flip so that larger is better
        scores = scores.assign(value=-scores["value"])
    runs = {(t, m): g["value"].to_numpy(dtype=float) for (t, m), g in scores.groupby(["task", "method"])}
    per_method = {m: [runs[(t, m)] for t in means.index] for m in methods}
    sign = -1.0 if lower_is_better else 1.0
    iqms = {}
    for m in methods:
        value, low, high = iqm_interval(per_method[m])
        iqms[m] = (sign * value, *sorted((sign * low, sign * high)))
    improvement = {(x, y): improvement_interval(per_method[x], per_method[y])
                   for x in methods for y in methods if x != y}
    ranks = average_ranks(means, lower_is_better) if methods else pd.Series(dtype=float)
    out = Ranking(tasks, methods, means, ranks, None, None, None, None, iqms, improvement, dropped)
    if len(tasks) < 2 or len(methods) < 3:
        out.note = (f"Friedman and Nemenyi need at least 3 methods on at least 2 tasks "
                    f"(here {len(methods)} on {len(tasks)}); with 2 methods use the paired tests")
        return out
    friedman = stats.friedmanchisquare(*[means[m].to_numpy() for m in methods])
    out.friedman_stat, out.friedman_p = float(friedman.statistic), float(friedman.pvalue)
    import scikit_posthocs

    # the test reads |rank differences| within tasks: the same whichever way is better
    out.nemenyi = scikit_posthocs.posthoc_nemenyi_friedman(means.to_numpy())
    out.nemenyi.index = out.nemenyi.columns = methods
    out.cd = critical_difference(len(methods), len(tasks), alpha)
    return out


def cd_diagram(ranking: Ranking, path: Path, title: str, alpha: float = ALPHA) -> Path | None:
    """Demšar's critical-difference diagram (scikit-posthocs): average ranks on an axis, methods
    the Nemenyi test cannot tell apart joined by a bar, and the CD drawn above."""
    if ranking.nemenyi is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scikit_posthocs

    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * len(ranking.methods)))
    scikit_posthocs.critical_difference_diagram(ranking.ranks, ranking.nemenyi, ax=ax, cd=ranking.cd, alpha=alpha)
    ax.set_title(title, fontsize=9, pad=28)  # above the CD bar
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- from a family's runs to a report section


def method_label(method: str, axes: str) -> str:
    """``busy`` + ``k=1`` -> ``busy:k:1`` (the method spec of the metric key)."""
    return method + "".join(f":{a.replace('=', ':')}" for a in axes.split(",")) if axes else method


def across_scores(frame: pd.DataFrame, across: str, split: str, metric: str, family: str) -> pd.DataFrame:
    """(task, method, seed, value) of ``<split>/<method>/<metric>`` over the finished runs, the
    task being the run's ``across`` param; every other param that varies becomes part of the
    method (``busy:k:1 [lr=0.1]``). The latest run wins where sweeps repeat a trial."""
    done = frame[frame["status"] == "finished"]
    column = f"param.{across}"
    runs = done.drop_duplicates("run_id")
    varying = sorted(c[len("param."):] for c in runs.columns
                     if c.startswith("param.") and c != "param.seed" and runs[c].nunique() > 1)
    if column not in runs or runs[column].nunique() < 2:
        raise UsageError(f"--across {across}: the runs of {family} do not vary {across} "
                         f"(they vary: {', '.join(varying) or 'nothing but the seed'})")
    rows = done[(done["split"] == split) & (done["metric"] == metric)].sort_values("start_time")
    other = [p for p in varying if p != across]
    cell = rows[[f"param.{p}" for p in other]].astype(str).agg(", ".join, axis=1) if other else None
    method = [method_label(m, a) for m, a in zip(rows["method"], rows["axes"])]
    scores = pd.DataFrame({"task": rows[column].to_numpy(), "seed": rows["seed"].to_numpy(), "value": rows["value"].to_numpy(),
                           "method": [f"{m} [{', '.join(f'{p}={v}' for p, v in zip(other, c.split(', ')))}]"
                                      for m, c in zip(method, cell)] if other else method})
    return scores.drop_duplicates(["task", "method", "seed"], keep="last")


def _interval(triple) -> str:
    value, low, high = triple
    return f"{value:.4f} [{low:.4f}, {high:.4f}]"


def across_section(ranking: Ranking, family: str, across: str, key: str, plots_dir: Path | None, alpha: float = ALPHA):
    """The report section: ranks, Friedman, Nemenyi, CD diagram, IQM and P(X > Y)."""
    from orchestrator.report_render import Section, Table
    from orchestrator.stats import p_is

    sec = Section(f"{family}: methods ranked across {across}", 2)
    sec.text.append(f"{len(ranking.methods)} methods on {len(ranking.tasks)} values of `{across}` "
                    f"({', '.join(ranking.tasks)}), by `{key}` (mean over seeds per {across}; rank 1 = best).")
    if ranking.dropped:
        sec.text.append(f"Left out (not run on every {across}): {', '.join(ranking.dropped)}.")
    if ranking.friedman_p is None:
        sec.text.append(ranking.note + ".")
    else:
        differ = "the average ranks differ" if ranking.friedman_p < alpha else "no evidence that the ranks differ"
        sec.text.append(f"Friedman test over the {len(ranking.tasks)} {across} values: χ² = {ranking.friedman_stat:.2f}, "
                        f"{p_is(ranking.friedman_p)} ({differ}); Nemenyi critical difference CD = {ranking.cd:.2f} "
                        f"(k = {len(ranking.methods)}, N = {len(ranking.tasks)}, alpha {alpha}): two methods whose average "
                        "ranks differ by more than CD differ significantly (Demšar 2006).")
    rows = [{"Method": m, "Average rank": f"{ranking.ranks[m]:.2f}", "IQM [95% stratified bootstrap]": _interval(ranking.iqm[m]),
             **{f"{across}={t}": f"{ranking.means.loc[t_raw, m]:.4f}" for t, t_raw in zip(ranking.tasks, ranking.means.index)}}
            for m in ranking.ranks.index]
    sec.tables.append(Table("average rank, IQM over every run of every task, and the mean per task", pd.DataFrame(rows),
                            [f"IQM: mean of the middle 50% of all runs; interval: {RESAMPLES} stratified bootstrap resamples "
                             "(runs resampled within each task), percentile (Agarwal et al. 2021)."]))
    if ranking.nemenyi is not None:
        order = list(ranking.ranks.index)
        p = ranking.nemenyi.loc[order, order].map(lambda v: f"{v:.4f}")
        sec.tables.append(Table("Nemenyi post-hoc p-values (pairs of methods)", p.reset_index(names="Method")))
    improvement = pd.DataFrame([{"X \\ Y": x, **{y: "—" if x == y else _interval(ranking.improvement[(x, y)])
                                                 for y in ranking.ranks.index}} for x in ranking.ranks.index])
    sec.tables.append(Table("probability of improvement P(X > Y) [95% stratified bootstrap]", improvement,
                            [f"P(X > Y): chance that a run of X beats a run of Y on the same {across} (ties count 1/2), "
                             f"averaged over the {across} values (Agarwal et al. 2021)."]))
    if plots_dir is not None:
        path = cd_diagram(ranking, Path(plots_dir) / f"{family}-cd-{across}.png",
                          f"{family}: critical difference diagram across {across} ({key}, Nemenyi alpha {alpha})", alpha)
        if path:
            sec.plots.append((f"{family}: critical difference diagram across {across}", path))
    return sec


def across_scores_checked(tracking_uri: str, families: list[str], study: str | None, across: str) -> list[tuple]:
    """(family, metric key, scores, lower is better) per family; raises UsageError when the
    runs do not vary ``across`` (before the report writes anything)."""
    from orchestrator.claims import lower_is_better
    from orchestrator.report_data import load_runs
    from orchestrator.spaces import load_family_file

    prepared = []
    for family in families:
        doc = load_family_file(family)
        split = (doc.get("report") or {}).get("split", "test")
        metric = str((doc.get("objective") or {}).get("metric", "/acc")).rsplit("/", 1)[-1]
        scores = across_scores(load_runs(tracking_uri, family, study), across, split, metric, family)
        prepared.append((family, f"{split}/<method>/{metric}", scores, lower_is_better(f"{split}/m/{metric}")))
    return prepared


def across_sections(prepared: list[tuple], across: str, plots_dir: Path | None) -> list:
    """One ranking section per family of :func:`across_scores_checked`."""
    return [across_section(rank_methods(scores, lower), family, across, key, plots_dir)
            for family, key, scores, lower in prepared]
