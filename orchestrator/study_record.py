"""The compiled study a sweep ran, saved with it, so its report reads what ran.

A sweep saves one JSON record (:func:`study_record`) twice: inside ``orchestrate.json`` beside
Tune's results, and as the artifact ``study.json`` of its MLflow parent run. The record holds
the compiled study (grid, eval axes, space, derive rules, seeds, objective, the config every
trial starts from), the family YAML as it was loaded (its ``report:`` and ``claims:`` settings,
defaults and every study entry), the entry point, the package version and the git commit.
``orchestrate report`` builds a sweep's tables from its record (:func:`load_records`), so
editing the YAML later does not change the report of a sweep already run; sweeps from before
records were saved fall back to the YAML as it is now, and the report says which it used.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from importlib import metadata
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

STUDY_FILE = "study.json"
FORMAT = 1


def study_record(study, doc: dict, sweep_id: str, git_commit: str) -> dict:
    """The record of ``study`` (an :class:`orchestrator.spaces.Study`) compiled from ``doc``."""
    try:
        version = metadata.version("sweep-orchestrator")
    except metadata.PackageNotFoundError:
        version = "unknown"
    compiled = {name: getattr(study, name) for name in (
        "description", "base", "grid", "eval_axes", "space", "search", "samples", "scheduler", "seeds", "derive",
        "objective")}
    return {"format": FORMAT, "family": study.family, "study": study.name, "sweep_id": sweep_id,
            "entrypoint": getattr(study, "entrypoint", "") or doc.get("entrypoint", ""),
            "package_version": version, "git_commit": git_commit, "compiled": compiled,
            "family_doc": doc}


def log_record(tracking_uri: str, parent_run_id: str, record: dict) -> None:
    """``study.json`` on the parent run, once: a resumed sweep keeps the record it started with."""
    client = MlflowClient(tracking_uri)
    if any(a.path == STUDY_FILE for a in client.list_artifacts(parent_run_id)):
        return
    client.log_dict(parent_run_id, json.loads(json.dumps(record, default=str)), STUDY_FILE)


def load_records(tracking_uri: str, family: str, sweep_ids) -> dict[str, dict]:
    """sweep id -> its record, for the sweeps whose parent run holds a ``study.json``."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    out: dict[str, dict] = {}
    if exp is None:
        return out
    for sweep_id in sweep_ids:
        parents = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{sweep_id}' and tags.role = 'parent'",
                                     max_results=1)
        if not parents:
            continue
        record = read_json_artifact(client, parents[0].info.run_id, STUDY_FILE)
        if record is not None and record.get("format") == FORMAT:
            out[sweep_id] = record
    return out


def read_json_artifact(client: MlflowClient, run_id: str, path: str) -> dict | None:
    """A run's JSON artifact, or None when the run has none (or its artifact store is
    unreachable: a report then says what it lacks rather than failing)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bar per artifact read
    folder = posixpath.dirname(path) or None
    try:
        if not any(a.path == path for a in client.list_artifacts(run_id, folder)):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, path, tmp)).read_text())
    except (MlflowException, OSError):
        return None
