"""Trials on a reused Tune worker (``reuse_actors``, the runner's setting) start as they would in
a fresh process, and the driver's MLflow mirror (asynchronous, batched) logs each report once.
Plain Ray Tune drives the project's trainable wrapper and callback, one worker for every trial."""

import random
import socket
import textwrap
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.mlflow_callback import MlflowCallback
from orchestrator.spaces import load_study
from orchestrator.tracking import CLIENT_ENV_DEFAULTS, SweepTracker
from orchestrator.trainable import load_state, make_trainable

pytestmark = pytest.mark.slow

# A family that keeps module-level state and draws from the global generators unseeded: on a
# reused worker without a reset, CALLS would grow and the draws would continue the last trial's.
LEAKY = '''
    import os
    import random

    import numpy as np
    import torch

    CALLS = []


    def train(config, report, restore=None):
        CALLS.append(config["seed"])
        start = restore["epoch"] + 1 if restore else 1
        for epoch in range(start, config["epochs"] + 1):
            report({"epoch": epoch, "val/leak/calls": float(len(CALLS)), "val/leak/pid": float(os.getpid()),
                    "val/leak/py": random.random(), "val/leak/np": float(np.random.rand()),
                    "val/leak/torch": float(torch.rand(1)), "val/leak/seed": float(config["seed"]),
                    "val/leak/lr": config["lr"]}, checkpoint={"epoch": epoch})
'''


@pytest.fixture(scope="module")
def one_cpu_ray():
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


SEED_OF_LR = {0.1: 0, 0.2: 1, 0.3: 0}  # trials 1 and 3 share a seed, trial 2 between them does not


def run(tmp_path, lrs: list[float], epochs: int, callbacks=()):
    """The leaky family through the project's trainable wrapper, one trial at a time on one worker."""
    (tmp_path / "leaky_family.py").write_text(textwrap.dedent(LEAKY))
    trainable = make_trainable("leaky", {}, "val/leak/seed", "leaky_family:train", (str(tmp_path),))
    space = {"lr": tune.grid_search(lrs), "epochs": epochs,
             "seed": tune.sample_from(lambda spec: SEED_OF_LR[spec.config.lr])}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=space,
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), callbacks=list(callbacks), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    return tuner.fit()


def test_reused_worker_leaks_nothing_between_trials(one_cpu_ray, tmp_path):
    results = run(tmp_path, [0.1, 0.2, 0.3], epochs=2)
    finals = sorted((r.metrics for r in results), key=lambda m: m["val/leak/lr"])
    assert len({m["val/leak/pid"] for m in finals}) == 1, "Tune did not reuse the worker: the test proves nothing"
    for lr, m in zip([0.1, 0.2, 0.3], finals):
        assert m["val/leak/calls"] == 1  # the family's module was fresh for every trial
        assert (m["val/leak/lr"], m["val/leak/seed"]) == (lr, SEED_OF_LR[lr])  # this trial's own config
        # what a fresh process seeded with the trial's seed draws second (epoch 1 drew first)
        py, npr = random.Random(SEED_OF_LR[lr]), np.random.RandomState(SEED_OF_LR[lr])
        py.random(), npr.rand()
        assert m["val/leak/py"] == py.random() and m["val/leak/np"] == npr.rand()
    assert finals[0]["val/leak/torch"] == finals[2]["val/leak/torch"] != finals[1]["val/leak/torch"]


def test_mirror_logs_every_report_once_and_knows_it_is_complete(one_cpu_ray, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "leaky", "sweep-1", {"study": "smoke"})
    mirror = MlflowCallback(tracker, load_study("busy_loop", "smoke"))
    results = run(tmp_path, [0.1, 0.2, 0.3], epochs=3, callbacks=[mirror])
    assert mirror.complete() and mirror.missed == 0 and len(mirror.closed) == 3
    client = MlflowClient(uri)
    runs = client.search_runs([tracker.experiment_id], "tags.role = 'trial'")
    assert len(runs) == 3 and {r.data.tags["trial_id"] for r in runs} == {r.metrics["trial_id"] for r in results}
    for result in results:  # every epoch checkpoints but the last, which no resume needs
        with result.checkpoint.as_directory() as directory:
            assert load_state(Path(directory)) == {"epoch": 2}
    for run_ in runs:
        assert run_.info.status == "FINISHED" and run_.data.tags["status"] == "finished" and run_.data.tags["node_id"]
        for key in ("val/leak/seed", "epoch"):
            assert sorted(m.step for m in client.get_metric_history(run_.info.run_id, key)) == [1, 2, 3]


def test_mirror_with_the_store_gone_says_a_sync_is_needed(one_cpu_ray, tmp_path, capfd, monkeypatch):
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "leaky", "sweep-2", {"study": "smoke"})
    with socket.socket() as s:  # a port nobody listens on: every request is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in CLIENT_ENV_DEFAULTS.items():  # the runner's fail-fast client settings
        monkeypatch.setenv(name, value)
    tracker.client = MlflowClient(f"http://127.0.0.1:{port}")  # the server went away after the sweep started
    mirror = MlflowCallback(tracker, load_study("busy_loop", "smoke"), retry_s=0.1)
    results = run(tmp_path, [0.1, 0.2], epochs=2, callbacks=[mirror])
    assert all(r.error is None for r in results)  # the trials went on
    assert mirror.missed > 0 and not mirror.complete() and not mirror.closed
    assert "MLflow unavailable" in capfd.readouterr().err


def family_finals(tmp_path, study, seeds: list[int]) -> dict[int, dict]:
    """A real family's trials, one at a time on one worker: seed -> final metrics."""
    base = {k: v for k, v in study.trial_configs()[0].items() if k != "seed"}
    trainable = make_trainable(study.family, study.derive, study.objective["metric"], study.entrypoint, study.import_paths)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={**base, "eval": dict(study.eval_axes), "device": "cpu", "seed": tune.grid_search(seeds)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=1),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), verbose=0),
    )
    results = tuner.fit()
    assert all(r.error is None for r in results)
    return {r.config["seed"]: r.metrics for r in results}


def test_a_real_family_on_a_reused_worker_matches_a_fresh_one(one_cpu_ray, tmp_path):
    """attn_knn's smoke study: seed 2 after seeds 0 and 1 on the same worker gives, to the last
    digit, every metric seed 2 gives on a fresh worker (model, memory bank, kNN, TTA): nothing
    the earlier trials left in shared state (data caches, global generators, torch's settings)
    reaches it, whether the wrapper or the family's own seeding resets it."""
    study = load_study("attn_knn", "smoke")
    reused = family_finals(tmp_path / "reused", study, [0, 1, 2])
    fresh = family_finals(tmp_path / "fresh", study, [2])
    assert len({m["pid"] for m in reused.values()}) == 1, "Tune did not reuse the worker: the test proves nothing"
    keys = [k for k in fresh[2] if k.startswith(("train/", "val/", "test/"))]
    assert len(keys) > 100 and {k: reused[2][k] for k in keys} == {k: fresh[2][k] for k in keys}
    assert reused[0]["test/attn_knn/acc"] != reused[2]["test/attn_knn/acc"] or reused[0]["val/attn_knn/nll"] != reused[2]["val/attn_knn/nll"]
