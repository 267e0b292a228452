"""The function Tune runs for every trial: a family's plain ``train`` behind Ray's API.

Kept apart from the runner so a trial's worker process imports only Ray Tune and the family,
not MLflow, torch (unless the family does) or the driver's machinery.

Tune reuses a worker for the next trial (``reuse_actors``), so each trial starts from the same
state a fresh process would give it: Python's, numpy's and torch's global generators seeded
from the trial's seed, and the family's module re-executed (:func:`fresh_train`), so module-level
state a family keeps (a counter, a list, a cached model) never reaches the next trial. Shared
helpers such as ``trainables.common`` keep their caches: those are keyed by their inputs.
"""

from __future__ import annotations

import importlib
import pickle
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import ray
from ray import tune

from orchestrator.registry import resolve_entrypoint
from orchestrator.spaces import derive_params

CHECKPOINT_FILE = "state.pt"  # torch.save: families that use torch
PICKLE_FILE = "state.pkl"  # plain pickle: families that never import torch (no 1-2 s import per worker)
_RUN_HERE: set[str] = set()  # family modules a trial in this worker process has already used


def fresh_train(entrypoint: str, import_paths: tuple[str, ...]):
    """The family's ``train`` as a fresh process would see it: on a reused worker, its module is
    re-executed first (module-level state reset; its imports stay cached, so this costs little)."""
    fn = resolve_entrypoint(entrypoint, import_paths)  # the YAML's folder first on sys.path
    module = sys.modules[fn.__module__]
    if module.__name__ in _RUN_HERE:
        fn = getattr(importlib.reload(module), fn.__name__)
    _RUN_HERE.add(module.__name__)
    return fn


def seed_globals(seed: int) -> None:
    """Seed the global generators a family might use unseeded, the same way in every trial."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def save_state(state: dict, directory: Path) -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].save(state, directory / CHECKPOINT_FILE)
    else:
        with open(directory / PICKLE_FILE, "wb") as out:
            pickle.dump(state, out, protocol=pickle.HIGHEST_PROTOCOL)


def load_state(directory: Path) -> dict:
    if (directory / PICKLE_FILE).exists():
        with open(directory / PICKLE_FILE, "rb") as src:
            return pickle.load(src)
    import torch

    return torch.load(directory / CHECKPOINT_FILE, weights_only=False)


def make_trainable(family: str, derive: dict, objective: str, entrypoint: str, import_paths: tuple[str, ...]):
    """Wrap a family's plain ``train`` so Tune can run it: derive parameters, restore from the
    latest checkpoint, and turn ``report(metrics, checkpoint)`` into ``tune.report``. A diverged
    report carries the objective as NaN, so searchers and schedulers count the trial as failed
    rather than Tune rejecting the result."""

    def trainable(config: dict) -> None:
        train = fresh_train(entrypoint, import_paths)
        seed_globals(int(config.get("seed", 0)))
        config = derive_params(config, derive)
        config["artifact_dir"] = str(Path.cwd() / "artifacts")  # Tune syncs the trial dir to storage
        restore = None
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                restore = load_state(Path(directory))

        node_id = ray.get_runtime_context().get_node_id()

        def report(metrics: dict, checkpoint: dict | None = None) -> None:
            if metrics.get("diverged"):
                metrics = {objective: float("nan"), **metrics}
            metrics = {**metrics, "node_id": node_id}  # hostname and IP do not tell nodes of one machine apart
            # The last epoch's checkpoint is never a resume point (a trial stopped after its last
            # report re-runs that one epoch from the one before), and each checkpoint costs a
            # copy to storage plus a forced snapshot of the whole experiment (CheckpointConfig
            # num_to_keep=1), which grows with the sweep: one-epoch trials then save none.
            if checkpoint is None or metrics.get("epoch") == config.get("epochs"):
                tune.report(metrics)
                return
            with tempfile.TemporaryDirectory() as directory:
                save_state(checkpoint, Path(directory))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

        train(config, report, restore)

    trainable.__name__ = family
    return trainable
