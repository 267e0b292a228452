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

The modules, in the order data flows: :mod:`orchestrator.report_data` (MLflow -> tidy frame ->
studies and statistics), :mod:`orchestrator.report_tables` (tables), :mod:`orchestrator.plots`
(figures), :mod:`orchestrator.report_build` (sections of one report),
:mod:`orchestrator.report_render` (markdown, CSV, JSON). This module is the entry point of the
``orchestrate report`` command and of the report written after a sweep.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.errors import UsageError
from orchestrator.report_build import build_report


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


def headline_text(outcome, study) -> str:
    """What ``report.md`` of this sweep opens with (the headline table and the sentences that
    read it), as markdown for the console at the end of ``orchestrate sweep``; the same numbers
    as the report. Empty when MLflow holds no finished trial of the sweep."""
    report = build_report(outcome.tracking_uri, study.family, sweep_id=outcome.sweep_id)
    return report.markdown(lead_only=True) if not report.stats.empty else ""


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
                 out: str | None, fmt_name: str, plots_dir: str | None,
                 across: str | None = None) -> tuple[str | None, list[str]]:
    """Build the report; returns (text for stdout or None, status lines). With ``--out FILE.md``
    the plots default to ``FILE_plots/`` beside it; with ``--sweep`` and ``--out`` the report
    and its plots are also logged to that sweep's parent run. ``across``: rank the methods
    across the values of that param (orchestrator/rankings.py), sections after the summary."""
    require_store(tracking_uri)
    families = choose_families(names, every, tracking_uri)
    out_path = Path(out) if out else None
    if plots_dir is None and out_path is not None and fmt_name == "markdown":
        plots_dir = str(out_path.parent / f"{out_path.stem}_plots")
    rankings = None
    if across:
        from orchestrator.rankings import across_scores_checked

        rankings = across_scores_checked(tracking_uri, families, study, across)  # bad --across: before any write
    report = build_report(tracking_uri, families, study, sweep_id, Path(plots_dir) if plots_dir else None,
                          link_base=out_path.parent if out_path else Path.cwd(), summary=every or len(families) > 1)
    if rankings:
        from orchestrator.rankings import across_sections

        report.sections[1:1] = across_sections(rankings, across, Path(plots_dir) if plots_dir else None)
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
