"""Tidy frames shaped like :func:`orchestrator.report_data.load_runs`'s, built in memory from
(seed, params, metrics) trials: what the claims and report-table tests feed the code instead of
a real MLflow store (building one costs ~14 s, paid again by every mutant of bench/mutation.py)."""

from __future__ import annotations

from unittest import mock

import pandas as pd
from statsmodels.stats.multitest import multipletests

from orchestrator.report_data import split_key


def tidy_frame(trials, study: str = "s", sweep: str = "s-1", dataset: str = "digits") -> pd.DataFrame:
    """One row per (trial, metric), as load_runs reads them: params as ``param.<name>`` strings
    (MLflow keeps ``str(value)``; "" where a trial lacks one), the seed also as a column."""
    rows = []
    for i, (seed, params, metrics) in enumerate(trials):
        base = {"run_id": f"{sweep}-run{i}", "sweep_id": sweep, "study": study, "status": "finished",
                "seed": str(seed), "dataset": dataset, "start_time": i,
                **{f"param.{k}": str(v) for k, v in {"seed": seed, **params}.items()}}
        for key, value in metrics.items():
            split, method, axes, metric = split_key(key)
            rows.append({**base, "key": key, "split": split, "method": method, "axes": axes, "metric": metric,
                         "value": float(value)})
    frame = pd.DataFrame(rows)
    params = [c for c in frame.columns if c.startswith("param.")]
    frame[params] = frame[params].fillna("")
    return frame


def holm(pvalues) -> list[float]:
    """statsmodels' Holm-adjusted p-values, the reference the tests check against. multipletests
    runs gc.collect() on every call: 0.1-0.5 s in a process holding pandas, scipy and MLflow."""
    with mock.patch("gc.collect"):
        return list(multipletests(pvalues, method="holm")[1])
