"""A driver killed with SIGKILL mid-sweep, then `orchestrate sweep --resume`: every trial
completes, none reruns from scratch, each trial keeps one MLflow run with each epoch once."""

import os
import signal

import pytest
from fault_helpers import finish, results_on_disk, start, steps, trial_runs, wait_for
from mlflow.tracking import MlflowClient

from trainables.busy_loop import expected_acc

pytestmark = pytest.mark.slow

EPOCHS = 4
# half a CPU per trial: all 4 trials run at once (one wave, not two)
SWEEP = ["sweep", "busy_loop", "--study", "smoke", "--set", f"epochs={EPOCHS}", "--set", "seconds_per_epoch=0.5",
         "--cpus-per-trial", "0.5", "--storage", "runs", "--no-report"]


def test_driver_killed_mid_sweep_then_resume_finishes_every_trial_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = SWEEP + ["--tracking-uri", uri]
    storage = tmp_path / "runs"

    first = start(args, tmp_path, tmp_path / "first.log")
    try:
        # kill once a trial is past its second epoch
        wait_for(lambda: any(r[-1]["epoch"] >= 2 for r in results_on_disk(storage).values()), 240,
                 "a trial's second epoch", first, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        finish(first, 60)
    before = results_on_disk(storage)  # Tune's view on disk lags its driver a little
    assert len(before) < 4 or any(r[-1]["epoch"] < EPOCHS for r in before.values()), "the sweep ended before the kill"

    second = start(args + ["--resume"], tmp_path, tmp_path / "resume.log")
    assert finish(second, 400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "4 trials (0 errored, 0 diverged)" in (tmp_path / "resume.log").read_text()

    after = results_on_disk(storage)
    assert len(after) == 4 and set(before) <= set(after)  # Tune kept the trial ids
    resumed_mid_way = 0
    for trial_id, results in after.items():
        epochs = [r["epoch"] for r in results]
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)), (trial_id, epochs)  # nothing lost
        assert epochs.count(1) == 1, (trial_id, epochs)  # not rerun from scratch
        resumed_mid_way += any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for r in results)
        assert trial_id not in before or epochs[:len(before[trial_id])] == [r["epoch"] for r in before[trial_id]]
    assert resumed_mid_way >= 1  # at least one trial continued from its checkpoint

    runs = trial_runs(uri, "busy_loop")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(after)  # exactly one run per trial
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert steps(uri, run.info.run_id, "val/busy/acc") == list(range(1, EPOCHS + 1))  # each epoch once
        config = {"seed": int(run.data.params["seed"]), "lr": float(run.data.params["lr"])}
        assert run.data.metrics["test/busy/acc"] == pytest.approx(expected_acc(config, EPOCHS))
    parents = MlflowClient(uri).search_runs([runs[0].info.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
