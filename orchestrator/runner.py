"""Run a validated study as a Ray Tune sweep and log it to MLflow.

Local Ray by default (started in-process), ``--address``/``RAY_ADDRESS`` otherwise. Tune's
results on disk (``./runs/<sweep_id>``) are the source of truth; MLflow mirrors them through a
driver-side callback that survives a tracking server going away (``orchestrate sync`` fills
the gaps later).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from orchestrator.errors import UsageError
from orchestrator.spaces import Study, derive_params
from orchestrator.tracking import SweepTracker, check_tracking_uri, default_tracking_uri, git_commit, warn
from trainables import get_trainable
from trainables.common.data import DataError, validate_spec

CHECKPOINT_FILE = "state.pt"


@dataclass
class SweepOptions:
    address: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    max_failures: int = 2
    resume: str | None = None  # "latest" or a sweep id
    workdir: Path = field(default_factory=Path.cwd)
    verbose: int = 1


@dataclass
class SweepOutcome:
    sweep_id: str
    experiment_path: Path
    tracking_uri: str
    parent_run_id: str
    trials: int
    errored: int
    diverged: int


# ---------------------------------------------------------------- the trainable Tune runs


def make_trainable(family: str, derive: dict, objective: str):
    """Wrap a family's plain ``train`` so Tune can run it: derive parameters, restore from the
    latest checkpoint, and turn ``report(metrics, checkpoint)`` into ``tune.report``. A diverged
    report carries the objective as NaN, so searchers and schedulers count the trial as failed
    rather than Tune rejecting the result."""

    def trainable(config: dict) -> None:
        config = derive_params(config, derive)
        config["artifact_dir"] = str(Path.cwd() / "artifacts")  # Tune syncs the trial dir to storage
        restore = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                restore = torch.load(Path(directory) / CHECKPOINT_FILE, weights_only=False)

        def report(metrics: dict, checkpoint: dict | None = None) -> None:
            if metrics.get("diverged"):
                metrics = {objective: float("nan"), **metrics}
            if checkpoint is None:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as directory:
                torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

        get_trainable(family)(config, report, restore)

    trainable.__name__ = family
    return trainable


# ---------------------------------------------------------------- MLflow as a Tune callback


class MlflowCallback(tune.Callback):
    """Mirror every trial into MLflow. MLflow failures never stop the sweep: they are warned
    about once and left for ``orchestrate sync``."""

    def __init__(self, tracker: SweepTracker, study: Study):
        self.tracker, self.study = tracker, study
        self._warned = False

    def _safe(self, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - the tracking store is best effort during a sweep
            if not self._warned:
                warn(f"MLflow unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                     "trials go on, run `orchestrate sync` later to log what is missing")
                self._warned = True
            return None

    def _run_id(self, trial):
        config = derive_params(trial.config, self.study.derive)
        tags = {"seed": config.get("seed"), "dataset": config.get("dataset"), "tune_trial_dir": trial.path}
        return self._safe(self.tracker.child, trial.trial_id, config, tags)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)
        if run_id is None:
            return
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if result.get("training_iteration") == 1 or result.get("iterations_since_restore") == 1:
            self._safe(self.tracker.set_tags, run_id, {"host": result.get("hostname", ""), "node_ip": result.get("node_ip", "")})
        self._safe(self.tracker.log_result, run_id, result, step)
        if result.get("diverged"):
            self._safe(self.tracker.set_tags, run_id, {"status": "diverged"})

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        if run_id is None:
            return
        diverged = bool((trial.last_result or {}).get("diverged"))
        self._safe(self.tracker.set_tags, run_id, {"status": "diverged" if diverged else "finished"})
        self._safe(self.tracker.log_artifacts, run_id, Path(trial.path) / "artifacts", "artifacts")
        self._safe(self.tracker.finish, run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        if run_id is not None:
            self._safe(self.tracker.set_tags, run_id, {"status": "error"})
            self._safe(self.tracker.finish, run_id, "FAILED")


# ---------------------------------------------------------------- building the Tune run


def param_space(study: Study) -> dict:
    space = dict(study.base)
    for key, values in study.grid.items():
        space[key] = tune.grid_search(values)
    for key, dist in study.space.items():
        (kind, args), = dist.items()
        space[key] = tune.choice(args) if kind == "choice" else getattr(tune, kind)(*args)
    space["seed"] = tune.grid_search(study.seeds) if study.search != "optuna" else study.seeds[0]
    space["eval"] = dict(study.eval_axes)
    space["device"] = space.get("device", "auto")
    return space


def tune_config(study: Study, max_concurrent: int) -> tune.TuneConfig:
    metric, mode = study.objective["metric"], study.objective["mode"]
    if study.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(metric=metric, mode=mode, seed=study.seeds[0])
        samples = study.samples
    else:
        search_alg = BasicVariantGenerator(random_state=study.seeds[0])
        samples = study.samples if study.space else 1
    scheduler = (ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration",
                               max_t=int(study.base.get("epochs", 100)), grace_period=1)
                 if study.scheduler == "asha" else FIFOScheduler())
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=samples,
                           max_concurrent_trials=max_concurrent or None)


def resolve_paths(study: Study, workdir: Path) -> None:
    """Make the dataset path absolute (trials run in their own directories) and check it."""
    dataset = study.base.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("imagefolder:"):
        path = Path(dataset.split(":", 1)[1]).expanduser()
        study.base["dataset"] = f"imagefolder:{(workdir / path).resolve() if not path.is_absolute() else path}"
    datasets = [study.base.get("dataset")] + study.grid.get("dataset", [])
    for spec in datasets:
        if spec is None:
            continue
        try:
            validate_spec(spec)
        except DataError as exc:
            raise UsageError(str(exc)) from None


def check_ray_address(address: str) -> None:
    """Fail fast (exit 2) on a host:port nobody listens on, instead of Ray's long retry loop."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError):
        raise UsageError(f"Ray cluster at {address} is not reachable") from None


def start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    if address:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as exc:
            raise UsageError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}") from None
    else:
        ray.init(include_dashboard=False, configure_logging=False)


def new_sweep_id(study: Study) -> str:
    return f"{study.family}-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_sweep(storage: Path, study: Study, which: str) -> str:
    """The sweep to resume: an explicit id, or the newest restorable one of this family/study."""
    if which != "latest":
        if not tune.Tuner.can_restore(str(storage / which)):
            raise UsageError(f"no restorable sweep {which!r} under {storage}")
        return which
    candidates = sorted((p for p in storage.glob(f"{study.family}-{study.name}-*") if tune.Tuner.can_restore(str(p))),
                        key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UsageError(f"nothing to resume: no sweep of {study.family}/{study.name} under {storage}")
    return candidates[-1].name


def run_sweep(study: Study, opts: SweepOptions) -> SweepOutcome:
    """Validate the environment, start (or join) Ray, run every trial, return where things are."""
    workdir = opts.workdir
    resolve_paths(study, workdir)
    tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    check_tracking_uri(tracking_uri)
    storage = Path(opts.storage or workdir / "runs").expanduser().resolve()
    sweep_id = find_sweep(storage, study, opts.resume) if opts.resume else new_sweep_id(study)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if opts.gpus_per_trial and not address and not torch.cuda.is_available():
        raise UsageError(f"--gpus-per-trial {opts.gpus_per_trial} asks for GPUs but this machine has none")

    start_ray(address)
    tracker = SweepTracker(
        tracking_uri, study.family, sweep_id,
        tags={"family": study.family, "study": study.name, "dataset": study.base.get("dataset"), "git_commit": git_commit()},
        artifact_root=workdir / "mlartifacts" if tracking_uri.startswith("sqlite:") else None,
    )
    trainable = tune.with_resources(make_trainable(study.family, study.derive, study.objective["metric"]),
                                    {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    run_config = tune.RunConfig(
        name=sweep_id, storage_path=str(storage), callbacks=[MlflowCallback(tracker, study)],
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=opts.verbose,
    )
    if opts.resume:
        tuner = tune.Tuner.restore(str(storage / sweep_id), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space(study))
        tuner._local_tuner._run_config.callbacks = run_config.callbacks  # callbacks are not pickled with the tuner
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(study), tune_config=tune_config(study, opts.max_concurrent),
                           run_config=run_config)
    results = tuner.fit()
    errored = sum(1 for r in results if r.error is not None)
    diverged = sum(1 for r in results if (r.metrics or {}).get("diverged"))
    tracker.set_tags(tracker.parent_id, {"trials": len(results), "errored": errored, "diverged": diverged})
    tracker.finish(tracker.parent_id, "FINISHED" if errored == 0 else "FAILED")
    return SweepOutcome(sweep_id, storage / sweep_id, tracking_uri, tracker.parent_id, len(results), errored, diverged)


