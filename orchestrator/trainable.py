"""The function Tune runs for every trial: a family's plain ``train`` behind Ray's API.

Kept apart from the runner so a trial's worker process imports only Ray Tune, torch and the
family, not MLflow and the driver's machinery (each trial starts a fresh worker process).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from orchestrator.registry import resolve_entrypoint
from orchestrator.spaces import derive_params

CHECKPOINT_FILE = "state.pt"


def make_trainable(family: str, derive: dict, objective: str, entrypoint: str, import_paths: tuple[str, ...]):
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

        node_id = ray.get_runtime_context().get_node_id()

        def report(metrics: dict, checkpoint: dict | None = None) -> None:
            if metrics.get("diverged"):
                metrics = {objective: float("nan"), **metrics}
            metrics = {**metrics, "node_id": node_id}  # hostname and IP do not tell nodes of one machine apart
            if checkpoint is None:
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as directory:
                torch.save(checkpoint, Path(directory) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

        resolve_entrypoint(entrypoint, import_paths)(config, report, restore)  # the YAML's folder first on sys.path

    trainable.__name__ = family
    return trainable
