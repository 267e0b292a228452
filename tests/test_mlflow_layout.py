"""What MLflow's own UI reads, on a real SQLite store: the experiment kind, MLflow's source and
user tags, each trial's dataset input, and the parent run's sweep summary and description
(checked against scipy's t-interval, computed here independently)."""

import getpass
import json
import math
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrator.spaces import load_study
from orchestrator.sweep_summary import NOTE_TAG, log_summary
from orchestrator.tracking import SweepTracker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    """One store for the module (creating an MLflow database takes seconds); sweeps keep tests apart."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def tracker(uri, sweep_id, study="smoke"):
    return SweepTracker(uri, "busy_loop", sweep_id, {"study": study, "family": "busy_loop"})


def test_experiment_kind_is_set_on_new_and_existing_experiments(uri):
    client = MlflowClient(uri)
    client.create_experiment("handmade")  # made before the tag existed, or by hand
    for name in ("handmade", "attn_knn"):
        t = SweepTracker(uri, name, "kind", {"study": "k"})
        assert client.get_experiment(t.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_runs_carry_mlflow_source_tags_and_the_trial_its_dataset(uri):
    t = tracker(uri, "tags")
    config = {"dataset": "digits", "seed": 0, "lr": 0.1, "max_train": 500, "noise_rate": 0.2, "imbalance": 10.0}
    run_id = t.child("trial_a", config, {"seed": 0})
    run = t.client.get_run(run_id)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for r in (run, t.client.get_run(t.parent_id)):
        tags = r.data.tags
        assert tags["mlflow.source.git.commit"] == head and tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.name"] == "orchestrate sweep busy_loop --study smoke"
        assert tags["mlflow.source.type"] == "LOCAL" and tags["study"] == "smoke"  # the project's own tags stay
    (dataset_input,) = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.name == "digits" and len(dataset.digest) == 8
    assert json.loads(dataset.profile) == {"max_train": 500, "noise_rate": 0.2, "imbalance": 10.0}
    assert {tag.key: tag.value for tag in dataset_input.tags} == {"mlflow.data.context": "train"}

    # the same data -> the same digest (the UI groups by it); other noise -> another one
    same = t.client.get_run(t.child("trial_b", {**config, "seed": 1, "lr": 0.2}, {"seed": 1})).inputs.dataset_inputs
    noisier = t.client.get_run(t.child("trial_c", {**config, "noise_rate": 0.4}, {"seed": 0})).inputs.dataset_inputs
    assert same[0].dataset.digest == dataset.digest and noisier[0].dataset.digest != dataset.digest
    # reattaching a trial (a resumed sweep) logs no second input
    again = tracker(uri, "tags")
    assert len(t.client.get_run(again.child("trial_a", config, {"seed": 0})).inputs.dataset_inputs) == 1


def half_width(values):
    return stats.sem(values) * stats.t.ppf(0.975, len(values) - 1)


def test_parent_run_holds_the_sweep_summary_and_a_description(uri):
    study = load_study("busy_loop", "smoke")  # grid lr 0.1 / 0.2, objective val/busy/acc (max), headline acc
    accs = {0.1: [0.80, 0.84, 0.83], 0.2: [0.90, 0.95, 0.91]}
    trials = [({"lr": lr, "seed": s}, {"val/busy/acc": a, "test/busy/acc": a - 0.01, "test/busy:k:5/acc": 0.5,
                                       "test/busy/loss": 1.0, "train/busy/loss": 0.3})
              for lr, values in accs.items() for s, a in enumerate(values)]
    trials.append(({"lr": 0.2, "seed": 3}, {"val/busy/acc": float("nan"), "diverged": 1.0}))  # not counted
    t = tracker(uri, "summary")
    assert log_summary(t, study, trials) > 0
    parent = t.client.get_run(t.parent_id)
    metrics = parent.data.metrics
    for lr, values in accs.items():
        cell = f"cell:lr:{lr}"
        assert metrics[f"{cell}/val/busy/acc/mean"] == pytest.approx(sum(values) / 3)
        assert metrics[f"{cell}/val/busy/acc/ci95"] == pytest.approx(half_width(values))
        assert metrics[f"{cell}/test/busy/acc/mean"] == pytest.approx(sum(values) / 3 - 0.01)
        assert metrics[f"{cell}/val/busy/acc/n"] == 3
    assert metrics["best/val/busy/acc/mean"] == pytest.approx(sum(accs[0.2]) / 3)
    assert metrics["best/test/busy/acc/ci95"] == pytest.approx(half_width(accs[0.2]))
    # only the objective and headline metrics of plain methods: no eval axes, no other metrics
    assert not [k for k in metrics if ":k:" in k or "loss" in k]
    note = parent.data.tags[NOTE_TAG]
    assert "busy_loop / smoke" in note and "lr=[0.1, 0.2]" in note and "Best cell (lr=0.2)" in note
    assert f"{sum(accs[0.2]) / 3:.4f} ± {half_width(accs[0.2]):.4f} (n=3)" in note
    # a resumed sweep logging the same summary adds no points
    assert log_summary(t, study, trials) == 0
    assert len(t.client.get_metric_history(t.parent_id, "best/val/busy/acc/mean")) == 1


def test_one_seed_logs_no_interval(uri):
    study = load_study("busy_loop", "smoke")
    t = tracker(uri, "one-seed")
    log_summary(t, study, [({"lr": 0.1, "seed": 0}, {"val/busy/acc": 0.8, "test/busy/acc": 0.79})])
    metrics = t.client.get_run(t.parent_id).data.metrics
    assert metrics["cell:lr:0.1/val/busy/acc/mean"] == 0.8 and metrics["cell:lr:0.1/val/busy/acc/n"] == 1
    assert not [k for k in metrics if k.endswith("/ci95") or math.isnan(metrics[k])]
    assert "(n=1, no interval)" in t.client.get_run(t.parent_id).data.tags[NOTE_TAG]


def test_summary_from_the_store_matches_the_drivers(uri, monkeypatch):
    """--until-decided rounds share one parent: the summary then reads every finished trial run,
    over as many pages as MLflow returns them in (2 runs a page here: 3 pages)."""
    import orchestrator.tracking

    monkeypatch.setattr(orchestrator.tracking, "RUNS_PER_PAGE", 2)
    study = load_study("busy_loop", "smoke")
    t = tracker(uri, "rounds")
    trials = [({"lr": lr, "seed": s, "dataset": "digits"}, {"val/busy/acc": 0.8 + lr + 0.01 * s, "test/busy/acc": 0.7 + s / 100})
              for lr in (0.1, 0.2) for s in range(3)]
    for i, (config, metrics) in enumerate(trials):
        run_id = t.child(f"trial_{i}", config, {"seed": config["seed"]})
        t.log_result(run_id, {**metrics, "epoch": 1}, 1)
        t.finish(run_id, "FINISHED" if i else "FAILED")  # a failed trial does not count
    from_store = tracker(uri, "rounds")
    log_summary(from_store, study)
    stored = from_store.client.get_run(from_store.parent_id).data.metrics
    check = tracker(uri, "rounds-check")
    log_summary(check, study, trials[1:])
    expected = check.client.get_run(check.parent_id).data.metrics
    assert stored.keys() == expected.keys() and all(stored[k] == pytest.approx(expected[k]) for k in expected)
