"""Bad input: one clear line, exit code 2, no traceback, nothing started, nothing written."""

import os

import pytest
import ray
from click.testing import CliRunner

from orchestrator.cli import main


@pytest.mark.parametrize("args, message", [
    (["sweep", "nope"], "unknown family"),
    (["sweep", "busy_loop", "--study", "nope"], "unknown study"),
    (["sweep", "busy_loop", "--set", "nokey=1"], "unknown key"),
    (["sweep", "busy_loop", "--set", "lr"], "expects key=value"),
    (["sweep", "busy_loop", "--set", "lr=-1"], "out of range"),
    (["sweep", "busy_loop", "--set", "epochs=1.5"], "expected int"),
    (["sweep", "busy_loop", "--dataset", "imagefolder:/no/such/dir"], "does not exist"),
    (["sweep", "busy_loop", "--dataset", "mnist"], "unknown dataset"),
    (["sweep", "busy_loop", "--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
    (["sweep", "busy_loop", "--address", "127.0.0.1:9"], "not reachable"),
    (["report", "busy_loop", "--tracking-uri", "http://127.0.0.1:9"], "not reachable"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert os.listdir(tmp_path) == []  # no mlflow.db, no runs/
    assert not ray.is_initialized()


def test_dry_run_lists_trials_without_starting_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep", "busy_loop", "--study", "scaling", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "6 trials" in result.output and result.output.count("trial ") == 6
    assert "lr=0.2 " in result.output  # batch 256, linear rule: 0.1 * 256 / 128
    assert os.listdir(tmp_path) == [] and not ray.is_initialized()


def test_list_names_every_family_and_study():
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    assert "busy_loop:" in result.output and "scaling:" in result.output
