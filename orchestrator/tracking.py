"""MLflow bookkeeping for a sweep: one experiment per family, one parent run per sweep, one
child run per trial, all created by the driver (workers never talk to MLflow).

Runs are found again by tags (``sweep_id``, ``trial_id``), so a resumed sweep or a later
``orchestrate sync`` reattaches instead of creating duplicates, and steps already logged are
not logged twice.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.errors import UsageError

PARENT, CHILD = "parent", "trial"
MAX_PARAM_LENGTH = 6000


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Exit-2 error when a tracking server does not answer or a local store cannot be written."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
                resp.read()
        except (urllib.error.URLError, OSError) as exc:
            raise UsageError(f"MLflow tracking server {uri} is not reachable: {getattr(exc, 'reason', exc)}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise UsageError(f"MLflow store directory does not exist: {parent}")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file:"):] if uri.startswith("file:") else uri)
        if not path.parent.is_dir():
            raise UsageError(f"MLflow store directory does not exist: {path.parent}")
    else:
        raise UsageError(f"unsupported MLflow tracking URI {uri!r} (use sqlite:///PATH, a directory, or http(s)://HOST:PORT)")


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd or Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def loggable_metrics(result: dict) -> dict[str, float]:
    """The family's own metrics (contract names, ``epoch``, ``diverged``), not Tune's bookkeeping."""
    out = {}
    for key, value in result.items():
        if ("/" in key or key in ("epoch", "diverged")) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class SweepTracker:
    """Creates or reattaches the parent run of one sweep and the child run of each trial."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str, tags: dict[str, str],
                 artifact_root: Path | None = None):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.sweep_id = sweep_id
        self.tags = {k: str(v) for k, v in tags.items()}
        self.experiment_id = self._experiment(experiment, artifact_root)
        self.parent_id = self._find_or_create(PARENT, None, {}, run_name=sweep_id)
        self._children: dict[str, str] = {}
        self._last_step: dict[str, int] = {}

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = (artifact_root / name).resolve().as_uri() if artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    def find_runs(self, role: str, trial_id: str | None = None) -> list:
        query = f"tags.sweep_id = '{self.sweep_id}' and tags.role = '{role}'"
        if trial_id is not None:
            query += f" and tags.trial_id = '{trial_id}'"
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)

    def _find_or_create(self, role: str, trial_id: str | None, extra_tags: dict, run_name: str) -> str:
        found = self.find_runs(role, trial_id)
        if found:
            return found[0].info.run_id
        tags = {**self.tags, **extra_tags, "role": role, "sweep_id": self.sweep_id}
        if trial_id is not None:
            tags.update({"trial_id": trial_id, "mlflow.parentRunId": self.parent_id})
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        return run.info.run_id

    def child(self, trial_id: str, config: dict, tags: dict) -> str:
        """The trial's run, created with its params on first sight, reattached afterwards."""
        if trial_id in self._children:
            return self._children[trial_id]
        existing = self.find_runs(CHILD, trial_id)
        if existing:
            run = existing[0]
            history = self.client.get_metric_history(run.info.run_id, "epoch")
            self._last_step[run.info.run_id] = max((int(m.value) for m in history), default=0)
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            run_id = run.info.run_id
        else:
            run_id = self._find_or_create(CHILD, trial_id, tags, run_name=trial_id)
            params = [Param(k, v) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):
                self.client.log_batch(run_id, params=params[start:start + 100])
        self._children[trial_id] = run_id
        return run_id

    def log_result(self, run_id: str, result: dict, step: int) -> bool:
        """Log one report at ``step``; a step already logged (a resumed trial) is skipped."""
        if step <= self._last_step.get(run_id, 0):
            return False
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in loggable_metrics(result).items()]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start:start + 1000])
        self._last_step[run_id] = step
        return True

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir() and any(Path(path).iterdir()):
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif Path(path).is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)


def warn(message: str) -> None:
    print(f"[orchestrate] warning: {message}", file=sys.stderr, flush=True)


def hostname() -> str:
    return socket.gethostname()
