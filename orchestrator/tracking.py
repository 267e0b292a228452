"""MLflow bookkeeping for a sweep: one experiment per family, one parent run per sweep, one
child run per trial, all created by the driver (workers never talk to MLflow).

Runs are found again by tags (``sweep_id``, ``trial_id``), so a resumed sweep or a later
``orchestrate sync`` reattaches instead of creating duplicates, and steps already logged are
not logged twice.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.errors import UsageError

PARENT, CHILD = "parent", "trial"
# MLflow's UI opens an experiment of this kind on its training-runs view, not the GenAI overview
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Config keys that shape a trial's data (present in some families): the dataset input's profile
DATA_KEYS = ("max_train", "max_test", "noise_rate", "imbalance", "shots", "split", "n_classes",
             "n_train_sets", "n_val_sets", "n_test_sets", "train_sequences", "val_sequences", "test_sequences")
MAX_PARAM_LENGTH = 6000
STEP_MARKER = "epoch"  # logged last in every step: its history says which steps are complete
# The driver's MLflow client must fail fast when a tracking server goes away: with MLflow's
# defaults (7 retries, exponential backoff, 120 s timeout) one call to a dead server takes
# minutes and Tune's loop waits on it. With these, a refused call fails in under a second and
# a hung server in about 10 s.
CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
# runs fetched per request: every page is read, so no sweep or study is cut short (one request
# with max_results=1000 silently dropped a sweep's trials past the thousandth from its summary)
RUNS_PER_PAGE = 1000


def every_run(client: MlflowClient, experiment_id: str, query: str):
    """Every run of the experiment that matches ``query``, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=query, max_results=RUNS_PER_PAGE, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def configure_client() -> None:
    """Short MLflow HTTP retries and timeouts for this process, unless the user set their own."""
    for name, value in CLIENT_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def default_artifact_root(tracking_uri: str, workdir: Path) -> Path | None:
    """Artifacts of a local SQLite store go beside it in ./mlartifacts; a server picks its own."""
    return workdir / "mlartifacts" if tracking_uri.startswith("sqlite:") else None


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


def git_commit(cwd: Path | None = None, short: bool = True) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                             cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(family: str, study: str | None) -> dict[str, str]:
    """MLflow's own tags for where a run came from (the UI's Source, Version and User columns)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (some containers)
        user = "unknown"
    command = f"orchestrate sweep {family}" + (f" --study {study}" if study else "")
    return {"mlflow.source.type": "LOCAL", "mlflow.source.name": command,
            "mlflow.source.git.commit": git_commit(short=False), "mlflow.user": user}


def dataset_input(config: dict) -> DatasetInput:
    """The trial's data as an MLflow dataset input: named by its spec, profiled by the config
    keys that shape its splits (subset sizes, label noise, imbalance, ...), digested over both,
    so runs on the same data share a digest and the UI's Dataset column and filters work."""
    spec = str(config.get("dataset"))
    profile = {key: config[key] for key in DATA_KEYS if key in config}
    if spec.startswith("imagefolder:"):
        source_type, source = "local", {"uri": spec.split(":", 1)[1]}
    else:
        source_type, source = "code", {"tags": {"dataset": spec}}
    described = json.dumps({"name": spec, "source": source, "profile": profile}, sort_keys=True, default=str)
    dataset = Dataset(name=spec, digest=hashlib.sha256(described.encode()).hexdigest()[:8], source_type=source_type,
                      source=json.dumps(source), profile=json.dumps(profile, default=str))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "train")])


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_LENGTH]
    return out


def result_step(result: dict) -> int:
    """The MLflow step of one Tune result: the family's epoch, else Tune's iteration."""
    return int(result.get("epoch", result.get("training_iteration", 0)))


def trial_tags(config: dict, trial_path: str) -> dict:
    return {"seed": config.get("seed"), "dataset": config.get("dataset"), "tune_trial_dir": trial_path}


def node_tags(result: dict) -> dict:
    """Where a trial ran (set from the first result after each start or restore)."""
    return {"host": result.get("hostname", ""), "node_ip": result.get("node_ip", ""), "node_id": result.get("node_id", "")}


def loggable_metrics(result: dict) -> dict[str, float]:
    """The family's own metrics (contract names, ``epoch``, ``diverged``), not Tune's bookkeeping."""
    out = {}
    for key, value in result.items():
        if ("/" in key or key in ("epoch", "diverged")) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class SweepTracker:
    """Creates or reattaches the parent run of one sweep and the child run of each trial.

    ``stats`` counts what this tracker added to the store (runs, params, steps, closed runs,
    changed tags), so ``orchestrate sync`` can say what it did and prove a second pass adds nothing.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str, tags: dict[str, str],
                 artifact_root: Path | None = None):
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.sweep_id = sweep_id
        self.tags = {**source_tags(experiment, tags.get("study")), **{k: str(v) for k, v in tags.items()}}
        self.stats: Counter = Counter()
        self.experiment_id = self._experiment(experiment, artifact_root)
        found = self.find_runs(PARENT)
        # a parent made here means a new sweep: none of its trials can have a run to look for
        self._new_sweep = not found
        self.parent_id = found[0].info.run_id if found else self._create(PARENT, None, {}, run_name=sweep_id)
        self._children: dict[str, str] = {}
        self._last_step: dict[str, int] = {}

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            for key, value in EXPERIMENT_KIND.items():
                if exp.tags.get(key) != value:  # an experiment made before this tag, or by hand
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        location = (artifact_root / name).resolve().as_uri() if artifact_root else None
        return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)

    def find_runs(self, role: str, trial_id: str | None = None) -> list:
        query = f"tags.sweep_id = '{self.sweep_id}' and tags.role = '{role}'"
        if trial_id is not None:
            query += f" and tags.trial_id = '{trial_id}'"
        return list(every_run(self.client, self.experiment_id, query))

    def _create(self, role: str, trial_id: str | None, extra_tags: dict, run_name: str) -> str:
        tags = {**self.tags, **{k: str(v) for k, v in extra_tags.items()}, "role": role, "sweep_id": self.sweep_id}
        if trial_id is not None:
            tags.update({"trial_id": trial_id, "mlflow.parentRunId": self.parent_id})
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        self.stats["runs_created"] += 1
        return run.info.run_id

    def child(self, trial_id: str, config: dict, tags: dict, reopen: bool = True) -> str:
        """The trial's run, created with its params on first sight, reattached afterwards (missing
        params added; ``reopen`` marks it RUNNING again, for a trial that resumes)."""
        if trial_id in self._children:
            return self._children[trial_id]
        existing = [] if self._new_sweep else self.find_runs(CHILD, trial_id)
        params = flatten(config)
        if existing:
            run = existing[0]
            run_id = run.info.run_id
            self._last_step[run_id] = max(self.logged_steps(run_id), default=0)
            params = {k: v for k, v in params.items() if k not in run.data.params}
            if reopen and run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._create(CHILD, trial_id, tags, run_name=trial_id)
            self.client.log_inputs(run_id, datasets=[dataset_input(config)])
        batch = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(batch), 100):
            self.client.log_batch(run_id, params=batch[start:start + 100])
        self.stats["params_logged"] += len(batch) if existing else 0
        self._children[trial_id] = run_id
        return run_id

    def known_run(self, trial_id: str) -> str | None:
        """The trial's run id if this tracker already has it (no request to the store)."""
        return self._children.get(trial_id)

    def is_logged(self, run_id: str, step: int) -> bool:
        """Whether ``log_result`` would skip ``step`` (no request to the store)."""
        return step <= self._last_step.get(run_id, 0)

    def mark_logged(self, run_id: str, step: int) -> None:
        """Record that every step up to ``step`` is in the store (after a batched write)."""
        self._last_step[run_id] = max(step, self._last_step.get(run_id, 0))

    def logged_steps(self, run_id: str) -> set[int]:
        return {m.step for m in self.client.get_metric_history(run_id, STEP_MARKER)}

    def log_step(self, run_id: str, result: dict, step: int) -> None:
        """Log one report's metrics at ``step``, the step marker last (so a step whose marker is
        present was logged whole)."""
        now = int(time.time() * 1000)
        metrics = loggable_metrics(result)
        metrics.pop(STEP_MARKER, None)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()] + [Metric(STEP_MARKER, float(step), now, step)]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[start:start + 1000])
        self.stats["steps_logged"] += 1

    def log_result(self, run_id: str, result: dict, step: int) -> bool:
        """Log one report at ``step``; a step already logged (a resumed trial) is skipped."""
        if self.is_logged(run_id, step):
            return False
        self.log_step(run_id, result, step)
        self._last_step[run_id] = step
        return True

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def update_tags(self, run, tags: dict) -> None:
        """Set only the tags whose value differs from the run's."""
        changed = {k: str(v) for k, v in tags.items() if run.data.tags.get(k) != str(v)}
        if changed:
            self.set_tags(run.info.run_id, changed)
            self.stats["tags_set"] += len(changed)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def close(self, run, status: str) -> None:
        """Terminate a run unless it already ended with ``status``."""
        if run.info.status != status:
            self.finish(run.info.run_id, status)
            self.stats["runs_closed"] += 1

    def log_artifacts(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).is_dir() and any(Path(path).iterdir()):
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif Path(path).is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)


def warn(message: str) -> None:
    print(f"[orchestrate] warning: {message}", file=sys.stderr, flush=True)


def hostname() -> str:
    return socket.gethostname()
