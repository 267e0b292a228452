"""Rankings across tasks: Friedman, Nemenyi and the critical difference against their formulas
(Demšar 2006), IQM and P(X > Y) against scipy, the stratified bootstrap, and a cross-task
report with its critical-difference diagram from a real MLflow store of busy_loop trials."""

import math
import os

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from orchestrator.cli import main
from orchestrator.rankings import (critical_difference, improvement_interval, improvement_probability, iqm,
                                   iqm_interval, rank_methods)
from orchestrator.tracking import SweepTracker
from trainables import busy_loop

TASKS, METHODS, SEEDS = 6, ["a", "b", "c", "d"], 3


def scores(shift=(0.02, 0.01, 0.0, 0.0), noise=0.005, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame([{"task": t, "method": m, "seed": s, "value": 0.7 + 0.05 * t + e + rng.normal(0, noise)}
                         for t in range(TASKS) for m, e in zip(METHODS, shift) for s in range(SEEDS)])


def test_friedman_nemenyi_and_cd_equal_demsars_formulas():
    data = scores()
    r = rank_methods(data)
    k, n = len(METHODS), TASKS
    means = data.groupby(["task", "method"])["value"].mean().unstack()
    ranks = means.rank(axis=1, ascending=False).mean()
    chi2 = 12 * n / (k * (k + 1)) * (np.sum(ranks ** 2) - k * (k + 1) ** 2 / 4)  # Demšar (2006), eq. in sec. 3.2.2
    assert r.friedman_stat == pytest.approx(chi2) and r.friedman_p == pytest.approx(stats.chi2.sf(chi2, k - 1))
    assert r.ranks.to_dict() == pytest.approx(ranks.to_dict()) and list(r.ranks.index)[0] == "a"
    se = math.sqrt(k * (k + 1) / (6 * n))
    for x, y in (("a", "d"), ("b", "c")):
        q = abs(ranks[x] - ranks[y]) / se
        assert r.nemenyi.loc[x, y] == pytest.approx(stats.studentized_range.sf(q * math.sqrt(2), k, np.inf), abs=1e-6)
    # Demšar's table of q_0.05: 2.343 (k=3), 2.569 (k=4), 2.728 (k=5)
    for kk, q05 in ((3, 2.343), (4, 2.569), (5, 2.728)):
        assert critical_difference(kk, 10) == pytest.approx(q05 * math.sqrt(kk * (kk + 1) / 60), rel=1e-3)
    flipped = rank_methods(data, lower_is_better=True)
    assert list(flipped.ranks.index)[-1] == "a" and flipped.friedman_p == pytest.approx(r.friedman_p)


def test_iqm_and_improvement_equal_scipy_and_the_bootstrap_is_stratified():
    x = np.random.default_rng(1).normal(size=20)
    assert iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))
    xs = [np.random.default_rng(i).normal(0, 1, 4) for i in range(3)]
    ys = [np.random.default_rng(10 + i).normal(0.5, 1, 5) for i in range(3)]
    assert improvement_probability(xs, ys) == pytest.approx(
        np.mean([stats.mannwhitneyu(a, b).statistic / 20 for a, b in zip(xs, ys)]))
    value, low, high = improvement_interval(xs, ys)
    assert low <= value <= high and 0 <= low and high <= 1
    # two tasks far apart: a resample that mixed them could hold only task 0's runs (IQM near 0);
    # resampling within each task keeps four runs of each, so the IQM stays between them
    tasks = [np.array([0.0, 0.0, 0.05, 0.1]), np.array([1.0, 1.0, 1.05, 1.1])]
    value, low, high = iqm_interval(tasks)
    assert value == pytest.approx(stats.trim_mean(np.concatenate(tasks), 0.25)) and 0.25 < low <= value <= high < 0.9


def test_two_methods_or_a_method_missing_a_task():
    two = rank_methods(scores()[lambda f: f["method"].isin(["a", "b"])])
    assert two.friedman_p is None and "at least 3 methods" in two.note and two.iqm["a"][0] > two.iqm["b"][0]
    holes = scores()[lambda f: ~((f["method"] == "d") & (f["task"] == 2))]
    assert rank_methods(holes).dropped == ["d"]


def log_busy_loop(uri: str, study: str, configs: list[dict]) -> str:
    """Run busy_loop's own train() (no Ray) for each config and log it like a sweep does."""
    sweep_id = f"busy_loop-{study}-1"
    tracker = SweepTracker(uri, "busy_loop", sweep_id, {"family": "busy_loop", "study": study, "dataset": "digits"})
    for i, config in enumerate(configs):
        reports = []
        busy_loop.train(config, lambda metrics, checkpoint=None: reports.append(metrics))
        run_id = tracker.child(f"{sweep_id}-{i}", config, {"seed": config["seed"], "dataset": "digits"})
        tracker.log_result(run_id, reports[-1], reports[-1]["epoch"])
        tracker.set_tags(run_id, {"status": "finished"})
        tracker.finish(run_id)
    return sweep_id


def across_configs() -> list[dict]:
    base = {"dataset": "digits", "epochs": 1, "seconds_per_epoch": 0.0, "lr": 0.1, "batch_size": 128, "lr_rule": "none",
            "diverge_at_epoch": 0, "noise": 0.002, "eval": {"k": [1, 5, 10]}}
    return [{**base, "task": t, "seed": s} for t in range(5) for s in range(2)]


def test_cross_task_report_with_its_diagram(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_busy_loop(uri, "across", across_configs())
    out = tmp_path / "across.md"
    result = CliRunner().invoke(main, ["report", "busy_loop", "--across", "task", "--tracking-uri", uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "## busy_loop: methods ranked across task" in text and "Friedman test over the 5 task values" in text
    assert "busy:k:10" in text and "Nemenyi post-hoc p-values" in text and "P(X > Y)" in text
    diagram = tmp_path / "across_plots" / "busy_loop-cd-task.png"
    assert diagram.stat().st_size > 5000 and f"]({os.path.relpath(diagram, tmp_path)})" in text
