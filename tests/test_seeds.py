"""`orchestrate sweep --seeds`: counts and lists in dry runs, bad values refused (exit 2, nothing
written), a real sweep that runs exactly the seeds given, a wall-time estimate from it, and a
resume that refuses other seeds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fault_helpers import finish, start
from orchestrator.cli import main


def dry_run(*args: str):
    return CliRunner().invoke(main, ["sweep", "busy_loop", "--study", "smoke", "--dry-run", *args])


@pytest.mark.parametrize("given, seeds", [("5", [0, 1, 2, 3, 4]), ("3,7,11", [3, 7, 11]), ("1", [0]), (" 4 , 2", [4, 2])])
def test_dry_run_shows_the_trials_of_the_seeds_given(given, seeds):
    result = dry_run("--seeds", given)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # smoke is a grid of 2 learning rates: one trial per lr and seed
    assert lines[0].startswith(f"busy_loop/smoke: {2 * len(seeds)} trials ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
                               f"{', '.join(map(str, seeds))})")
    trials = [line for line in lines if line.lstrip().startswith("trial ")]
    assert sorted(line.split("seed=")[1] for line in trials) == sorted(str(s) for s in seeds for _ in range(2))


def test_dry_run_without_seeds_keeps_the_studys_own():
    result = dry_run()
    assert result.exit_code == 0 and result.output.startswith("busy_loop/smoke: 4 trials (2 seeds: 0, 1)")


@pytest.mark.parametrize("bad, why", [("0", "at least 1"), ("-3", "at least 1"), ("1,1", "given twice"),
                                      ("2,-1", ">= 0"), ("x", "expected a count"), ("3,", "expected a count"),
                                      ("1.5", "expected a count"), ("", "expected a count")])
def test_bad_seeds_are_one_line_and_exit_2(tmp_path, monkeypatch, bad, why):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep", "busy_loop", "--study", "smoke", "--seeds", bad])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and why in result.output
    assert list(tmp_path.iterdir()) == []  # refused before anything starts: no store, no runs/


@pytest.mark.slow
def test_sweep_runs_exactly_the_seeds_given_and_a_resume_keeps_them(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["sweep", "busy_loop", "--study", "smoke", "--seeds", "3,7", "--set", "epochs=1", "--no-report"]
    proc = start(args, tmp_path, tmp_path / "sweep.txt")
    assert finish(proc, 400) == 0, (tmp_path / "sweep.txt").read_text()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("busy_loop")
    trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'")
    assert sorted((float(t.data.params["lr"]), int(t.data.params["seed"])) for t in trials) == \
        [(0.1, 3), (0.1, 7), (0.2, 3), (0.2, 7)]
    (sweep_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((sweep_dir / "orchestrate.json").read_text())["seeds"] == [3, 7]

    # the dry run of the same study now estimates its wall time from that sweep's trials
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        planned = runner.invoke(main, ["sweep", "busy_loop", "--study", "smoke", "--dry-run", "--seeds", "4",
                                       "--storage", str(tmp_path / "runs")])
    assert planned.exit_code == 0, planned.output
    assert "estimated wall time: ~" in planned.output and f"(sweep {sweep_dir.name}: 4 trials in " in planned.output

    # other seeds on --resume: refused before anything starts
    before = sorted(p.name for p in sweep_dir.iterdir())
    refused = CliRunner().invoke(main, ["sweep", "busy_loop", "--study", "smoke", "--set", "epochs=1", "--seeds", "3,8",
                                        "--resume", sweep_dir.name, "--tracking-uri", uri, "--storage", str(tmp_path / "runs")])
    assert refused.exit_code == 2, refused.output
    assert refused.output.strip() == (f"Error: --seeds gives seeds 3,8 but the sweep being resumed ({sweep_dir.name}) "
                                      "runs seeds 3,7; drop --seeds to resume it")
    assert sorted(p.name for p in sweep_dir.iterdir()) == before
    assert len(client.search_runs([exp.experiment_id])) == 5


def test_the_resume_line_keeps_the_spaces_folders_and_options(tmp_path):
    from orchestrator.cli import _resume_command, sweep
    from orchestrator.registry import set_spaces_dirs

    try:
        ctx = sweep.make_context("sweep", ["busy_loop", "--spaces", str(tmp_path), "--seeds", "3,7", "--max-concurrent", "2"])
        with ctx:
            line = _resume_command("busy_loop", "smoke", "busy_loop-smoke-20260101-000000")
    finally:
        set_spaces_dirs([])
    assert line == (f"orchestrate sweep busy_loop --study smoke --spaces {tmp_path.resolve()} "
                    "--max-concurrent 2 --seeds 3,7 --resume busy_loop-smoke-20260101-000000")
