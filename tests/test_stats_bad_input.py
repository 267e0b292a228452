"""Bad input to --until-decided and --across: one clear line, exit code 2, nothing started,
nothing written (the style of tests/test_cli_bad_input.py)."""

import os

import pytest
import ray
from click.testing import CliRunner

from orchestrator.cli import main
from test_rankings import across_configs, log_busy_loop


def one_line_exit_2(result, message):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--study", "scaling", "--until-decided"], "declares no claims"),
    (["--study", "decide", "--until-decided", "--max-seeds", "1"], "below the 2 seeds"),
    (["--study", "decide", "--until-decided", "--batch", "0"], "at least 1 seed"),
    (["--study", "decide", "--until-decided", "--batch", "-2"], "at least 1 seed"),
    (["--study", "decide", "--max-seeds", "6"], "go with --until-decided"),
])
def test_until_decided_bad_input(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    one_line_exit_2(CliRunner().invoke(main, ["sweep", "busy_loop", *args]), message)
    assert os.listdir(tmp_path) == []  # no mlflow.db, no runs/
    assert not ray.is_initialized()


def test_across_a_param_the_runs_do_not_vary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log_busy_loop(uri, "across", across_configs())
    before = sorted(os.listdir(tmp_path))
    result = CliRunner().invoke(main, ["report", "busy_loop", "--across", "lr", "--tracking-uri", uri,
                                       "--out", str(tmp_path / "r.md")])
    one_line_exit_2(result, "--across lr: the runs of busy_loop do not vary lr (they vary: task)")
    assert sorted(os.listdir(tmp_path)) == before  # no report, no plots folder
