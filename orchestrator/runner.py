"""Run a validated study as a Ray Tune sweep and log it to MLflow.

Local Ray by default (started in-process), ``--address``/``RAY_ADDRESS`` otherwise. Tune's
results on disk (``./runs/<sweep_id>``, or ``--storage``/``ORCHESTRATE_STORAGE``: a path or an
s3://, gs:// URI) are the source of truth; MLflow mirrors them through a driver-side callback
that survives a tracking server going away, and a final sync (``orchestrate sync`` by hand)
logs whatever the callback missed.

Fault tolerance: trials checkpoint every epoch; a lost worker restarts its trial from the last
checkpoint (``FailureConfig``); Tune snapshots the experiment after every trial checkpoint
(``num_to_keep=1`` forces it), so a driver killed at any point resumes each trial from its
latest checkpoint with ``--resume`` instead of rerunning it.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs
import ray
import yaml
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from orchestrator.cluster import BOOTSTRAP_CONFIG, STORAGE_ENV, check_shared_storage
from orchestrator.errors import UsageError
from orchestrator.mlflow_callback import MlflowCallback
from orchestrator.progress import LiveView, catch_sigterm
from orchestrator.spaces import Study, load_family_file
from orchestrator.study_record import STUDY_FILE, log_record, study_record
from orchestrator.sync import SWEEP_META, finish_parent, storage_fs, storage_location, sync_sweep, write_sweep_meta
from orchestrator.tracking import (SweepTracker, check_tracking_uri, configure_client, default_artifact_root,
                                   default_tracking_uri, git_commit, warn)
from orchestrator.trainable import make_trainable
from orchestrator.warmup import REPORT_MODULES, SUMMARY_MODULES, Warmup
from trainables.common.data import DataError, validate_spec

MLFLOW_RETRY_ENV = "ORCHESTRATE_MLFLOW_RETRY_S"


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
    verbose: int = 0  # 0: the live view only; 1: Tune's tables and per-trial boxes too; 2: and every result
    seeds: list[int] | None = None  # what --seeds gave (already in the study); a resume must match
    name: str | None = None  # a new sweep's Tune experiment name (default: the sweep id)
    sweep_id: str | None = None  # log under this sweep's MLflow parent (--until-decided rounds); default: the name
    no_report: bool = False  # no report follows the sweep (its modules are not imported ahead)


@dataclass
class SweepOutcome:
    sweep_id: str
    experiment_path: Path | str  # a directory, or a URI for remote storage
    tracking_uri: str
    parent_run_id: str
    trials: int
    errored: int
    diverged: int
    finished: list[tuple[str, int]] = field(default_factory=list)  # (cell, seed) of trials that ended
    unfinished: list[tuple[str, int]] = field(default_factory=list)  # stopped or never started
    not_created: int = 0  # trials the searcher had not generated when the sweep stopped

    @property
    def complete(self) -> bool:
        return not self.unfinished and not self.not_created


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
        search_alg = BasicVariantGenerator(random_state=study.seeds[0], max_concurrent=max_concurrent)
        samples = study.samples if study.space else 1
    scheduler = (ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration",
                               max_t=int(study.base.get("epochs", 100)), grace_period=1)
                 if study.scheduler == "asha" else FIFOScheduler())
    # reuse_actors: the next trial runs in the finished one's worker (no new process, no
    # re-import of Ray, torch and the family; trainable.py resets what a trial could leak)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=samples,
                           max_concurrent_trials=max_concurrent or None, reuse_actors=True)


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


def start_ray(address: str | None, verbose: int = 0) -> bool:
    """Connect to ``address``, or start a local Ray listening on loopback only; False when a Ray
    was already initialized in this process (the caller did not start it, so must not stop it)."""
    if ray.is_initialized():
        return False
    # Unless -v, Ray's loggers in the workers stop at WARNING (Ray Train's "Checkpoint
    # successfully created" each epoch drowns the live view); a trial's own warnings, errors
    # and prints still reach the driver.
    quiet = {} if verbose else {"runtime_env": {"worker_process_setup_hook": "orchestrator.progress.quiet_worker_logs"}}
    if address and address != "local":  # "local" starts a Ray of its own, as no address does
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=True, **({} if address.startswith("ray://") else quiet))
        except (ConnectionError, RuntimeError) as exc:
            raise UsageError(f"cannot connect to Ray at {address}: {str(exc).splitlines()[0]}") from None
        return True
    # ray.init turns a node address of 127.0.0.1 into the machine's own (its _node_ip_address is
    # "resolved for localhost"), and then its GCS, raylet and workers listen on every interface.
    # Its single-machine mode (the default on macOS and Windows) keeps the node on 127.0.0.1
    # and every one of those sockets on loopback; it is read when the node starts, so switching
    # it on for ray.init alone is enough. address="local": never join a stray cluster.
    from ray._private import ray_constants

    saved, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(address="local", include_dashboard=False, configure_logging=False, **quiet)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    return True


def node_type_shapes(config_path: Path = BOOTSTRAP_CONFIG) -> list[dict] | None:
    """The resources of every node type a ``ray up`` head may launch ([] where there is no such
    config), or None when a type leaves them to be detected at launch (nothing to compare with)."""
    path = config_path.expanduser()
    if not path.is_file():
        return []
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    types = (config.get("available_node_types") if isinstance(config, dict) else None) or {}
    shapes = [(spec or {}).get("resources") or {} for spec in types.values()]
    return shapes if shapes and all("CPU" in s for s in shapes) else None


def check_trial_resources(cpus: float, gpus: float, config_path: Path = BOOTSTRAP_CONFIG) -> None:
    """Refuse (exit 2) a per-trial request that no node, live or launchable, can give: Tune would
    wait for it forever."""
    types = node_type_shapes(config_path)
    if types is None:
        return
    shapes = [node["Resources"] for node in ray.nodes() if node.get("Alive")] + types
    if any(s.get("CPU", 0) >= cpus and s.get("GPU", 0) >= gpus for s in shapes):
        return
    have = sorted({f"{s.get('CPU', 0):g} CPU + {s.get('GPU', 0):g} GPU" for s in shapes})
    raise UsageError(f"--cpus-per-trial {cpus:g} --gpus-per-trial {gpus:g}: no node of the cluster has that much "
                     f"(nodes: {'; '.join(have)})")


def new_sweep_id(study: Study) -> str:
    return f"{study.family}-{study.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_sweep(storage: str, study: Study, which: str) -> str:
    """The sweep to resume: an explicit id, or the newest restorable one of this family/study."""
    if which != "latest":
        if not tune.Tuner.can_restore(f"{storage}/{which}"):
            raise UsageError(f"no restorable sweep {which!r} under {storage}")
        return which
    fs, root = storage_fs(storage)
    pattern = re.compile(rf"{re.escape(study.family)}-{re.escape(study.name)}-\d{{8}}-\d{{6}}")
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted(i.base_name for i in infos if pattern.fullmatch(i.base_name))  # ids end in a timestamp
    candidates = [name for name in names if tune.Tuner.can_restore(f"{storage}/{name}")]
    if not candidates:
        raise UsageError(f"nothing to resume: no sweep of {study.family}/{study.name} under {storage}")
    return candidates[-1]


def check_resumed_seeds(experiment: str, study: Study, given: list[int] | None) -> None:
    """A resumed sweep keeps the seeds it started with (``--seeds`` may repeat them, not change
    them). Sweeps from before seeds were recorded are not checked."""
    fs, path = storage_fs(experiment)
    try:
        with fs.open_input_stream(posixpath.join(path, SWEEP_META)) as stream:
            recorded = json.loads(stream.read()).get("seeds")
    except (OSError, ValueError):
        return
    if recorded is None:
        return
    if given is not None and sorted(given) != sorted(recorded):
        raise UsageError(f"--seeds gives seeds {','.join(map(str, given))} but the sweep being resumed "
                         f"({posixpath.basename(path)}) runs seeds {','.join(map(str, recorded))}; drop --seeds to resume it")
    study.seeds = list(recorded)


def kill_runs(tracker: SweepTracker, trial_ids: list[str]) -> None:
    """An interrupted sweep: its parent run and the runs of its unfinished trials end KILLED
    (a resume reopens them). MLflow being down must not hide the interruption."""
    run_ids = [tracker.parent_id] + [tracker.known_run(trial_id) for trial_id in trial_ids]
    try:
        for run_id in filter(None, run_ids):
            tracker.finish(run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - the summary and exit code still say it was interrupted
        warn(f"MLflow runs not marked KILLED ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")


def replace_callbacks(tuner: tune.Tuner, callbacks: list, verbose: int) -> None:
    """Give a restored sweep fresh callbacks (and this run's verbosity). Ray 2.60's ``Tuner.restore`` takes no RunConfig:
    the restored one holds the callbacks pickled when the sweep started (an MLflow client for
    the old tracking URI, an empty run cache), and no public API replaces them
    (ray-project/ray#41364), so this reaches into the local tuner's RunConfig."""
    local = getattr(tuner, "_local_tuner", None)
    if local is None:
        raise UsageError("--resume needs the driver on the cluster (--address auto on the head), not a ray:// client")
    run_config = local.get_run_config()
    run_config.callbacks, run_config.verbose = callbacks, verbose


def _cuda_here() -> bool:
    import torch  # only here: a CPU sweep's driver never imports torch (1.6 s quiet, 8 s at load 10)

    return torch.cuda.is_available()


def run_sweep(study: Study, opts: SweepOptions) -> SweepOutcome:
    """Validate the environment, start (or join) Ray, run every trial, return where things are."""
    workdir = opts.workdir
    resolve_paths(study, workdir)
    tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)
    check_tracking_uri(tracking_uri)
    configure_client()
    storage = storage_location(opts.storage or os.environ.get(STORAGE_ENV) or str(workdir / "runs"))
    name = find_sweep(storage, study, opts.resume) if opts.resume else opts.name or new_sweep_id(study)
    sweep_id = opts.sweep_id or name  # until-decided rounds: Tune experiments of their own, one MLflow parent
    experiment = f"{storage}/{name}"
    if opts.resume:
        check_resumed_seeds(experiment, study, opts.seeds)
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if opts.gpus_per_trial and not address and not _cuda_here():
        raise UsageError(f"--gpus-per-trial {opts.gpus_per_trial} asks for GPUs but this machine has none")

    # the MLflow store opens (and what the sweep's end needs is imported) while Ray starts
    warmup = Warmup(tracking_uri, SUMMARY_MODULES + (() if opts.no_report else REPORT_MODULES))
    started = False
    try:
        started = start_ray(address, opts.verbose)
        catch_sigterm()
        check_trial_resources(opts.cpus_per_trial, opts.gpus_per_trial)
        check_shared_storage(storage)
        warmup.wait()
    except BaseException:
        warmup.discard()
        if started:
            ray.shutdown()
        raise
    tags = {"family": study.family, "study": study.name, "dataset": study.base.get("dataset"), "git_commit": git_commit()}
    tracker = SweepTracker(tracking_uri, study.family, sweep_id, tags,
                           artifact_root=default_artifact_root(tracking_uri, workdir))
    record = study_record(study, load_family_file(study.family), sweep_id, git_commit(short=False))
    write_sweep_meta(experiment, {"family": study.family, "study": study.name, "sweep_id": sweep_id,
                                  "tags": tracker.tags, "derive": study.derive, "seeds": study.seeds, "record": record})
    try:
        log_record(tracking_uri, tracker.parent_id, record)
    except Exception as exc:  # noqa: BLE001 - the record in orchestrate.json is kept; the report falls back to the YAML
        warn(f"{STUDY_FILE} not logged to the parent run ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
    trainable = tune.with_resources(make_trainable(study.family, study.derive, study.objective["metric"],
                                                   study.entrypoint, study.import_paths),
                                    {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    view = LiveView(study, verbose=opts.verbose)
    # Tune's result.json and params.json (what sync reads) only: its automatic CSV and
    # TensorBoard loggers would write every metric of every report again on the driver's loop
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    callbacks = [MlflowCallback(tracker, study, retry_s=float(os.environ.get(MLFLOW_RETRY_ENV, "30"))), view,
                 JsonLoggerCallback()]
    # num_to_keep=1 makes Tune snapshot the experiment after every trial checkpoint (the
    # snapshot a resumed sweep starts from); it would warn about each one as "excessive".
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if opts.resume:
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, param_space=param_space(study))
        replace_callbacks(tuner, callbacks, opts.verbose)
        tracker.client.update_run(tracker.parent_id, status="RUNNING")  # KILLED by the interruption
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1), verbose=opts.verbose,
            # a trial's artifact_dir lives in its working directory, which Tune copies into the
            # trial's storage folder (where the MLflow callback finds artifacts/) only with this
            sync_config=tune.SyncConfig(sync_artifacts=True),
        )
        tuner = tune.Tuner(trainable, param_space=param_space(study), tune_config=tune_config(study, opts.max_concurrent),
                           run_config=run_config)
    try:
        results = tuner.fit()  # Ctrl-C (or SIGTERM, see progress.interruptions) stops it gracefully
    except KeyboardInterrupt:  # a second Ctrl-C: Tune gives up saving its state
        kill_runs(tracker, view.unfinished_ids())
        raise
    errored = sum(1 for r in results if r.error is not None)
    diverged = sum(1 for r in results if (r.metrics or {}).get("diverged"))
    try:
        mirror = callbacks[0]
        if opts.resume or not mirror.complete():  # a resume: trials finished before it were never seen here
            sync_sweep(experiment, tracking_uri, workdir)
        else:  # the callback logged every result and ended every run: a sync would re-read all to add nothing
            finish_parent(tracker, len(results), errored, diverged)
        from orchestrator.sweep_summary import log_summary  # scipy: imported by the warmup, not before Ray starts

        # a round of --until-decided holds only its own trials: the parent's summary reads them all from the store
        log_summary(tracker, study, [(r.config, r.metrics or {}) for r in results] if sweep_id == name else None)
    except Exception as exc:  # noqa: BLE001 - Tune's results on disk are complete; MLflow can catch up later
        warn(f"MLflow not brought up to date ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); when it is "
             f"reachable run: orchestrate sync {study.family} --sweep {sweep_id} --storage {storage} --tracking-uri {tracking_uri}")
    if view.unfinished_ids() or view.not_created():
        kill_runs(tracker, view.unfinished_ids())
    path = experiment if "://" in experiment else Path(experiment)
    return SweepOutcome(sweep_id, path, tracking_uri, tracker.parent_id, len(results), errored, diverged,
                        finished=view.finished(), unfinished=view.unfinished(), not_created=view.not_created())
