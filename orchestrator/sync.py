"""``orchestrate sync``: mirror Tune's results on disk into MLflow, adding only what is missing.

Tune's experiment directory is the source of truth, whatever happened to the tracking server:
each trial's ``params.json`` and ``result.json`` lines, its status in the experiment state, and
the ``orchestrate.json`` the runner writes beside them (family, study, tags, derive rules). Runs
are found by their ``sweep_id``/``trial_id`` tags and logged steps by the step marker, so a
second pass adds nothing. The runner calls this at the end of every sweep too.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from orchestrator.errors import UsageError
from orchestrator.spaces import derive_params
from orchestrator.study_record import log_record
from orchestrator.tracking import SweepTracker, default_artifact_root, node_tags, result_step, trial_tags

SWEEP_META = "orchestrate.json"


@dataclass
class SyncCounts:
    sweep_id: str
    trials: int
    added: dict

    def line(self) -> str:
        what = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.added.items()) if v) or "nothing added"
        return f"{self.sweep_id}: {self.trials} trials; {what}"


def storage_location(storage: str) -> str:
    """A remote URI as given (s3://, gs://, ...), a local path (or file:// URI) made absolute."""
    if storage.startswith("file://"):
        storage = storage[len("file://"):]
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def storage_fs(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a storage location: a local path or a URI (s3://, gs://)."""
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def write_sweep_meta(experiment: str, meta: dict) -> None:
    """What sync needs to rebuild a sweep's runs, written once beside Tune's results."""
    fs, path = storage_fs(experiment)
    fs.create_dir(path)
    target = posixpath.join(path, SWEEP_META)
    if fs.get_file_info(target).type == pyarrow.fs.FileType.NotFound:
        with fs.open_output_stream(target) as out:
            out.write(json.dumps(meta, indent=2, default=str).encode())


def _read_text(fs, path: str) -> str | None:
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()
    except OSError:
        return None


def find_sweeps(storage: str, family: str | None = None, sweep_id: str | None = None) -> list[str]:
    """Experiment locations under ``storage`` written by this orchestrator, in name order."""
    fs, root = storage_fs(storage)
    if sweep_id:
        names = [sweep_id]
    else:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory)
    found = []
    for name in names:
        text = _read_text(fs, posixpath.join(root, name, SWEEP_META))
        if text is not None and (family is None or json.loads(text)["family"] == family):
            found.append(storage.rstrip("/") + "/" + name)
    if sweep_id and not found:
        raise UsageError(f"no sweep {sweep_id!r} under {storage}")
    return found


def _trial_statuses(experiment: str) -> dict[str, str]:
    """Trial id -> Tune status from the experiment state (empty before Tune's first snapshot)."""
    from ray.tune import ExperimentAnalysis

    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(experiment).trials}
    except Exception:  # noqa: BLE001 - no snapshot yet: statuses stay unknown, results still sync
        return {}


def _trial_results(fs, trial_dir: str) -> tuple[dict, list[dict]]:
    params = json.loads(_read_text(fs, posixpath.join(trial_dir, "params.json")) or "{}")
    lines = (_read_text(fs, posixpath.join(trial_dir, "result.json")) or "").splitlines()
    return params, [json.loads(line) for line in lines if line.strip()]


def _sync_trial(tracker: SweepTracker, meta: dict, fs, trial_dir: str, experiment: str, status: str | None,
                results: list[dict], config: dict) -> None:
    """One trial: its run (params), every missing step, where it ran, and how it ended."""
    local_dir = trial_dir if isinstance(fs, pyarrow.fs.LocalFileSystem) else None
    tags = trial_tags(config, local_dir or f"{experiment}/{posixpath.basename(trial_dir)}")
    run_id = tracker.child(results[0]["trial_id"], derive_params(config, meta.get("derive", {})), tags, reopen=False)
    logged = tracker.logged_steps(run_id)
    for result in results:
        step = result_step(result)
        if step not in logged:
            tracker.log_step(run_id, result, step)
            logged.add(step)
    starts = [r for r in results if r.get("iterations_since_restore") == 1] or results
    tags = node_tags(starts[-1])
    if status in ("TERMINATED", "ERROR"):
        tags["status"] = "error" if status == "ERROR" else "diverged" if results[-1].get("diverged") else "finished"
    run = tracker.client.get_run(run_id)
    tracker.update_tags(run, tags)
    if status == "TERMINATED":
        artifacts = Path(local_dir) / "artifacts" if local_dir else None
        if artifacts and artifacts.is_dir() and any(artifacts.iterdir()) and not tracker.client.list_artifacts(run_id, "artifacts"):
            tracker.log_artifacts(run_id, artifacts, "artifacts")
            tracker.stats["artifact_dirs_logged"] += 1
        tracker.close(run, "FINISHED")
    elif status == "ERROR":
        tracker.close(run, "FAILED")


def finish_parent(tracker: SweepTracker, trials: int, errored: int, diverged: int) -> None:
    """Count the sweep's trials on its parent run and end it (FAILED if any trial errored)."""
    parent = tracker.client.get_run(tracker.parent_id)
    tracker.update_tags(parent, {"trials": trials, "errored": errored, "diverged": diverged})
    tracker.close(parent, "FINISHED" if errored == 0 else "FAILED")


def sync_sweep(experiment: str, tracking_uri: str, workdir: Path | None = None) -> SyncCounts:
    """Log into MLflow whatever of one sweep's on-disk results it lacks; return what was added."""
    fs, path = storage_fs(experiment)
    meta_text = _read_text(fs, posixpath.join(path, SWEEP_META))
    if meta_text is None:
        raise UsageError(f"{experiment} is not a sweep of this orchestrator (no {SWEEP_META})")
    meta = json.loads(meta_text)
    tracker = SweepTracker(tracking_uri, meta["family"], meta["sweep_id"], meta["tags"],
                           artifact_root=default_artifact_root(tracking_uri, workdir or Path.cwd()))
    if meta.get("record"):  # a parent made here (a store that never saw the sweep) gets what the sweep ran
        log_record(tracking_uri, tracker.parent_id, meta["record"])
    statuses = _trial_statuses(experiment)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(path))
    trials = diverged = 0
    for trial_dir in sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory):
        config, results = _trial_results(fs, trial_dir)
        if results:
            status = statuses.get(results[0]["trial_id"])
            _sync_trial(tracker, meta, fs, trial_dir, experiment, status, results, config)
            trials += 1
            diverged += status == "TERMINATED" and bool(results[-1].get("diverged"))
    if statuses and all(s in ("TERMINATED", "ERROR") for s in statuses.values()):
        finish_parent(tracker, len(statuses), sum(s == "ERROR" for s in statuses.values()), diverged)
    return SyncCounts(meta["sweep_id"], trials, dict(tracker.stats))


def sync_storage(storage: str, tracking_uri: str, family: str | None = None, sweep_id: str | None = None) -> list[SyncCounts]:
    sweeps = find_sweeps(storage, family, sweep_id)
    if not sweeps:
        raise UsageError(f"no sweeps{' of ' + family if family else ''} under {storage}")
    return [sync_sweep(experiment, tracking_uri) for experiment in sweeps]
