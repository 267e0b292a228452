"""A driver killed with SIGKILL mid-sweep, then `orchestrate sweep --resume`: every trial
completes, each continues from the checkpoint Tune's last experiment snapshot holds, and each keeps
one MLflow run with each epoch once."""

import json
import os
import signal
from pathlib import Path

import pytest
from fault_helpers import finish, results_on_disk, start, steps, trial_runs, wait_for
from mlflow.tracking import MlflowClient
from ray.tune.utils.serialization import TuneFunctionDecoder

from trainables.busy_loop import expected_acc

pytestmark = pytest.mark.slow

EPOCHS = 4
# half a CPU per trial: all 4 trials run at once (one wave, not two)
SWEEP = ["sweep", "busy_loop", "--study", "smoke", "--set", f"epochs={EPOCHS}", "--set", "seconds_per_epoch=0.5",
         "--cpus-per-trial", "0.5", "--storage", "runs", "--no-report"]


def snapshot(storage: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (status, epoch of its latest checkpoint) in Tune's experiment snapshot on
    storage: what a resume starts from. The driver writes the snapshot and result.json to a
    staging folder and copies both to storage in the background, so result.json there can hold
    epochs past the snapshot's checkpoint (CI, 2026-12-02: a trial with epochs 1-2 on disk resumed
    from scratch). {} while there is no snapshot or one is being copied."""
    try:
        latest = max(storage.glob("*/experiment_state-*.json"))  # the session's timestamp sorts
        state = json.loads(latest.read_text())
    except (ValueError, OSError):  # none yet, or half copied
        return {}
    out = {}
    for trial_json, meta_json in state["trial_data"]:
        trial = json.loads(trial_json, cls=TuneFunctionDecoder, allow_cloudpickle=True)
        meta = json.loads(meta_json, cls=TuneFunctionDecoder, allow_cloudpickle=True)
        latest_result = meta["checkpoint_manager"].latest_checkpoint_result
        out[trial["trial_id"]] = (trial["status"], latest_result.metrics["epoch"] if latest_result else 0)
    return out


def test_driver_killed_mid_sweep_then_resume_finishes_every_trial_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = SWEEP + ["--tracking-uri", uri]
    storage = tmp_path / "runs"

    first = start(args, tmp_path, tmp_path / "first.log")
    try:
        # kill once Tune's snapshot on storage holds a running trial's mid-way checkpoint
        wait_for(lambda: any(status == "RUNNING" and 1 <= epoch < EPOCHS for status, epoch in snapshot(storage).values()),
                 240, "a mid-way checkpoint in Tune's snapshot", first, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        finish(first, 60)
    before = results_on_disk(storage)  # Tune's view on disk lags its driver a little
    resume_points = snapshot(storage)
    assert any(status != "TERMINATED" for status, _ in resume_points.values()), "the sweep ended before the kill"

    second = start(args + ["--resume"], tmp_path, tmp_path / "resume.log")
    assert finish(second, 400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert "4 trials (0 errored, 0 diverged)" in (tmp_path / "resume.log").read_text()

    after = results_on_disk(storage)
    assert len(after) == 4 and set(before) <= set(after)  # Tune kept the trial ids
    resumed_mid_way = 0
    for trial_id, results in after.items():
        epochs = [r["epoch"] for r in results]
        assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)), (trial_id, epochs)  # nothing lost
        first_run = [r["epoch"] for r in before.get(trial_id, [])]
        assert epochs[:len(first_run)] == first_run, (trial_id, epochs, first_run)
        status, checkpointed = resume_points.get(trial_id, ("PENDING", 0))
        # what the resume ran: the epochs after the snapshot's checkpoint, none before it, none twice
        expected = [] if status == "TERMINATED" else list(range(checkpointed + 1, EPOCHS + 1))
        assert epochs[len(first_run):] == expected, (trial_id, epochs, first_run, resume_points)
        resumed_mid_way += bool(expected) and checkpointed > 0
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
