"""Read a family's runs from MLflow into a tidy pandas frame and write markdown tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from orchestrator.stats import format_interval, t_interval
from trainables.common.metrics import parse_metric_key

HEADLINE_METRICS = ("acc", "ece", "nll")


def load_runs(tracking_uri: str, family: str, study: str | None = None, sweep_id: str | None = None) -> pd.DataFrame:
    """One row per (trial run, metric): run_id, sweep_id, study, seed, split, method, axes, metric, value,
    plus the run's params as ``param.<name>`` columns."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    if exp is None:
        return pd.DataFrame()
    query = "tags.role = 'trial'"
    if study:
        query += f" and tags.study = '{study}'"
    if sweep_id:
        query += f" and tags.sweep_id = '{sweep_id}'"
    rows = []
    for run in client.search_runs([exp.experiment_id], filter_string=query, max_results=50000):
        base = {"run_id": run.info.run_id, "sweep_id": run.data.tags.get("sweep_id"), "study": run.data.tags.get("study"),
                "status": run.data.tags.get("status", ""), "seed": run.data.params.get("seed")}
        base.update({f"param.{k}": v for k, v in run.data.params.items()})
        for key, value in run.data.metrics.items():
            parsed = parse_metric_key(key)
            if parsed is None:
                continue
            axes = ",".join(f"{k}={v}" for k, v in parsed["axes"].items())
            rows.append({**base, "split": parsed["split"], "method": parsed["method"], "axes": axes,
                         "metric": parsed["metric"], "value": value})
    return pd.DataFrame(rows)


def headline_table(frame: pd.DataFrame, split: str = "test", metrics=HEADLINE_METRICS) -> pd.DataFrame:
    """Method x metric, each cell mean ± 95% t-interval over the runs (seeds) with n."""
    sel = frame[(frame["split"] == split) & (frame["axes"] == "") & frame["metric"].isin(metrics)]
    if sel.empty:
        return pd.DataFrame()
    cells = (sel.groupby(["method", "metric"])["value"]
             .apply(lambda v: format_interval(*t_interval(v.tolist())))
             .unstack("metric"))
    return cells[[m for m in metrics if m in cells.columns]].rename_axis(None, axis=1).reset_index()


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, table.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *rows])


def build_report(tracking_uri: str, family: str, study: str | None = None, sweep_id: str | None = None) -> str:
    frame = load_runs(tracking_uri, family, study, sweep_id)
    scope = " / ".join(x for x in (family, study, sweep_id) if x)
    if frame.empty:
        return f"# {scope}\n\nNo finished trial runs found in {tracking_uri}.\n"
    parts = [f"# {scope}", "", f"{frame['run_id'].nunique()} trial runs from {tracking_uri}.", ""]
    for split in ("test", "val"):
        table = headline_table(frame, split)
        if not table.empty:
            parts += [f"## Headline ({split}): mean ± 95% t-interval over seeds", "", to_markdown(table), ""]
    return "\n".join(parts)


def write_sweep_report(outcome, study) -> Path:
    """The sweep's report next to its Tune results, and as an artifact of its MLflow parent run."""
    markdown = build_report(outcome.tracking_uri, study.family, sweep_id=outcome.sweep_id)
    path = Path(outcome.experiment_path) / "report.md"
    path.write_text(markdown)
    try:
        MlflowClient(outcome.tracking_uri).log_artifact(outcome.parent_run_id, str(path))
    except Exception as exc:  # noqa: BLE001 - the report on disk is what matters if MLflow is down
        from orchestrator.tracking import warn

        warn(f"report not logged to MLflow: {exc}")
    return path
