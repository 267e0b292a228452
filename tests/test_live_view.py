"""The live view of `orchestrate sweep`: a real `orchestrate` process with stdout not a terminal
(a file, as in CI), real local Ray, a real MLflow store; and what Ctrl-C / SIGTERM leave."""

from __future__ import annotations

import re
import shlex
import signal

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from fault_helpers import finish, results_on_disk, start, wait_for
from orchestrator.cli import first_table
from orchestrator.progress import FINISHED_STATES, LiveView, cell_label, group_by_cell
from orchestrator.spaces import load_study

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything but tab and newline, \r and ESC included


def test_cells_and_groups_read_as_the_study_writes_them():
    assert cell_label({"lr": 0.1, "batch_size": 64, "seed": 3}, ["batch_size", "lr"]) == "batch_size=64 lr=0.1"
    assert cell_label({"seed": 3}, []) == "defaults"
    assert group_by_cell([("lr=0.1", 1), ("lr=0.2", 0), ("lr=0.1", 0)]) == ["lr=0.1: seeds 0, 1", "lr=0.2: seed 0"]


def brute_force(trials: list, status: dict, metric: str) -> tuple:
    """What the view must say, recomputed from every trial: (done, running, pending, errored), best cell."""
    cells: dict[str, list[float]] = {}
    for t in trials:
        value = t.last_result.get(metric)
        if status[t.trial_id] == "TERMINATED" and not t.last_result.get("diverged") and value is not None:
            cells.setdefault(cell_label(t.config, ["lr"]), []).append(value)
    best = max(cells, key=lambda c: sum(cells[c]) / len(cells[c]), default=None)
    states = [status[t.trial_id] for t in trials]
    counts = (states.count("TERMINATED"), states.count("RUNNING"), states.count("PENDING"), states.count("ERROR"))
    return counts, best and (best, sum(cells[best]) / len(cells[best]), len(cells[best]))


def test_live_view_bookkeeping_per_event_equals_a_recount_of_every_trial():
    """The view keeps counts and the best cell per event (a rescan per step grew with the square of
    the trial count); over random steps, completions (some diverged), errors and trials appearing
    late, on Tune's own Trial objects, it says what a recount of every trial says."""
    from ray.tune.experiment import Trial

    rng = np.random.default_rng(0)
    study = load_study("busy_loop", "scaling")
    study.grid, study.space, study.seeds = {"lr": [0.1, 0.2, 0.3]}, {}, list(range(20))
    assert study.num_trials == 60
    view, trials, status = LiveView(study), [], {}
    metric = view.metric
    for step in range(400):
        if len(trials) < 60 and rng.random() < 0.3:  # the searcher adds a trial
            trials.append(Trial("busy_loop", config={"lr": float(rng.choice([0.1, 0.2, 0.3])), "seed": len(trials)}, stub=True))
        open_trials = [t for t in trials if t.status not in FINISHED_STATES]
        if open_trials and rng.random() < 0.5:
            t = open_trials[rng.integers(len(open_trials))]
            if t.status == "PENDING":
                t.set_status(Trial.RUNNING)
            elif rng.random() < 0.15:
                view._see(trials, t, "ERROR")  # on_trial_error's bookkeeping (its line reads the trial's error file)
                t.set_status(Trial.ERROR)
            else:
                t.update_last_result({metric: float(rng.random()), "diverged": float(rng.random() < 0.1)})
                view.on_trial_complete(step, trials, t)
                t.set_status(Trial.TERMINATED)  # Tune sets it after the callbacks
        view.on_step_end(step, trials)
        status = {t.trial_id: t.status for t in trials}
        counts, best = brute_force(trials, status, metric)
        assert view._state()[:2] == counts[:2] and view._state()[3] == counts[3]
        assert view._state()[2] == counts[2] + 60 - len(trials)  # never-created trials count as pending
        assert view.best() == (best and pytest.approx(best))
    assert sum(t.status in FINISHED_STATES for t in trials) > 20  # the walk finished a good share


def test_the_console_takes_the_reports_first_table_with_caption_and_notes():
    lead = ("# fam (sweep s)\n\nwhat it is\n\n## Headline: study `h`\n\n**test metrics**\n\n| Method | Acc |\n"
            "| --- | --- |\n| a | 0.9 [0.8, 1.0] (n=3) |\n\n- [low, high]: clipped\n\n## Summary\n\nlong sentences\n\n| b |\n")
    assert first_table(lead) == ["**test metrics**", "| Method | Acc |", "| --- | --- |", "| a | 0.9 [0.8, 1.0] (n=3) |",
                                 "- [low, high]: clipped"]
    assert first_table("no table here") == []


BOOM_PY = """
import warnings


def train(config, report, restore=None):
    warnings.warn(f"seed {config['seed']}: a warning from inside the trial")
    if config["seed"] == 1:
        raise RuntimeError("boom: seed 1 fails on purpose")
    report({"epoch": 1, "val/boom/acc": 0.5})
"""
BOOM_YAML = """
entrypoint: boom:train
family: boom
description: a family whose seed-1 trial raises
objective: {metric: val/boom/acc, mode: max}
default_study: two
defaults: {dataset: digits}
studies:
  two: {description: "two seeds, one fails", seeds: 2}
"""


def run(args: list[str], cwd, timeout: float = 400) -> tuple[int, str]:
    log = cwd / "console.txt"
    proc = start(args, cwd, log)
    return finish(proc, timeout), log.read_text()


def parent_run(uri: str, family: str = "busy_loop"):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(family)
    runs = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_smoke_sweep_console_fits_one_screen_without_control_characters(tmp_path):
    rc, text = run(["sweep", "busy_loop", "--study", "smoke"], tmp_path)
    assert rc == 0, text
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert not CONTROL.search(text), [line for line in lines if CONTROL.search(line)]
    # one line per finished trial, with its cell, seed, objective and wall time
    finished = [line for line in lines if re.match(r"\[\d/4\] lr=0\.[12] seed=[01]: val/busy/acc 0\.\d{4} in \d+\.\d s$", line)]
    assert len(finished) == 4, text
    # progress lines: counts, elapsed, ETA and, once a trial is in, the best cell
    assert re.search(r"4/4 trials done \[\d\d:\d\d elapsed, ETA 00:00\], 0 running, 0 pending, 0 errored; "
                     r"best val/busy/acc 0\.8900 at lr=0\.2 \(n=2\)", text), text
    # Tune's own boxes and tables stay away; the report's headline table and the locations come at the end
    assert "Trial status" not in text and "Configuration for experiment" not in text and "╭" not in text
    assert "| 0.2 | busy | 0.8900 ± 0.0635 (n=2) |" in text
    tail = lines[-4:]
    assert tail[0].startswith("4 trials (0 errored, 0 diverged) in sweep busy_loop-smoke-")
    assert tail[1].startswith("results: ") and tail[2].startswith("mlflow: ") and tail[3].startswith("report: ")
    assert (tmp_path / tail[3].split(maxsplit=1)[1]).is_file()
    assert parent_run(f"sqlite:///{tmp_path / 'mlflow.db'}").info.status == "FINISHED"


@pytest.mark.slow
def test_trial_errors_and_warnings_reach_the_console_in_full_without_verbose(tmp_path):
    (tmp_path / "boom.py").write_text(BOOM_PY)
    (tmp_path / "boom.yaml").write_text(BOOM_YAML)
    rc, text = run(["sweep", "boom", "--spaces", str(tmp_path)], tmp_path)
    assert rc == 1, text
    assert "UserWarning: seed 1: a warning from inside the trial" in text
    assert "Trial task failed for trial boom_" in text and 'raise RuntimeError("boom: seed 1 fails on purpose")' in text
    assert re.search(r"warning: defaults seed=1 failed \(trial \w+, traceback above\); retrying from its last checkpoint", text)
    assert re.search(r"^\[2/2\] defaults seed=1: ERROR RuntimeError: boom: seed 1 fails on purpose \(trial \w+; "
                     r"traceback above, every attempt's in .+/error\.txt\)$", text, re.M), text
    assert "[1/2] defaults seed=0: val/boom/acc 0.5000 in" in text
    assert "2 trials (1 errored, 0 diverged)" in text and not CONTROL.search(text)


@pytest.mark.slow
def test_verbose_shows_tunes_tables_and_trial_boxes(tmp_path):
    rc, text = run(["sweep", "busy_loop", "--study", "smoke", "-v", "--seeds", "1", "--set", "epochs=1"], tmp_path)
    assert rc == 0, text
    assert "Configuration for experiment" in text and "Trial status" in text
    assert re.search(r"Trial busy_loop_\w+ config", text), text


def interrupt_when_running(args: list[str], cwd, signum: int) -> tuple[int, str]:
    """Start a sweep, send ``signum`` once a trial has reported, return its exit code and
    console. Two trials run at a time and each takes 4 epochs of 1.5 s, so some never start."""
    log = cwd / f"console-{signum}.txt"
    proc = start(args, cwd, log)
    try:
        wait_for(lambda: results_on_disk(cwd / "runs"), 240, "a first trial result", proc, log)
        proc.send_signal(signum)
    finally:
        rc = finish(proc, 240)
    return rc, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_says_so_marks_parent_killed_and_resumes(tmp_path, signum, code):
    args = ["sweep", "busy_loop", "--study", "long", "--set", "epochs=4", "--set", "seconds_per_epoch=1.5"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, text = interrupt_when_running(args, tmp_path, signum)
    assert rc == code, text
    name = signal.Signals(signum).name
    summary = re.search(rf"interrupted by {name}: (\d) of 4 trials finished, (\d) did not; the sweep is incomplete", text)
    assert summary and int(summary[1]) + int(summary[2]) == 4 and int(summary[2]) > 0, text
    assert "not finished: defaults: seed" in text
    assert "trials (0 errored" not in text and "report:" not in text  # never called complete
    resume = re.search(r"^resume with: (.+)$", text, re.M)[1]
    assert resume.startswith("orchestrate sweep busy_loop --study long --set epochs=4 --set seconds_per_epoch=1.5 "
                             "--resume busy_loop-long-")
    assert not re.search(r"Tuner\.restore|Trials did not complete|Failed to fetch metrics", text)
    assert not CONTROL.search(text)
    parent = parent_run(uri)
    assert parent.info.status == "KILLED"

    if signum == signal.SIGTERM:  # the resume is the same for both; once is enough
        return
    # --resume refuses other seeds, before anything starts
    rc, text = run(shlex.split(resume)[1:] + ["--seeds", "5"], tmp_path)
    assert rc == 2 and "--seeds gives seeds 0,1,2,3,4 but the sweep being resumed" in text, text
    assert len(text.splitlines()) == 1 and parent_run(uri).info.status == "KILLED"
    rc, text = run(shlex.split(resume)[1:], tmp_path)
    assert rc == 0, text
    assert "4 trials (0 errored, 0 diverged)" in text
    parent = parent_run(uri)
    assert parent.info.status == "FINISHED"
    trials = MlflowClient(uri).search_runs([parent.info.experiment_id], "tags.role = 'trial'")
    assert sorted(int(t.data.params["seed"]) for t in trials) == [0, 1, 2, 3]
    assert all(t.info.status == "FINISHED" for t in trials)
