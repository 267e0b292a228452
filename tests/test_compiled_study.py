"""A sweep saves the compiled study it ran, and its report reads that, not the YAML as edited later;
``report:`` and ``claims:`` are checked before a sweep starts (real Ray, real MLflow, tmp dirs)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

import pytest
import ray
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import search_spaces
from orchestrator.cli import main

SHIPPED = Path(search_spaces.__file__).parent / "busy_loop.yaml"
FAST = ["--set", "epochs=1", "--set", "seconds_per_epoch=0.01"]


@pytest.fixture
def spaces(tmp_path, monkeypatch):
    """A user folder holding a copy of busy_loop.yaml (it wins over the shipped one)."""
    folder = tmp_path / "spaces"
    folder.mkdir()
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(folder))
    monkeypatch.chdir(tmp_path)
    return folder


def write(folder: Path, doc: dict) -> Path:
    path = folder / "busy_loop.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def without_time(markdown: str) -> str:
    return re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d \S+", "generated <time>", markdown)


def test_report_of_a_sweep_reads_the_study_it_saved_not_the_yaml_edited_later(spaces, tmp_path):
    doc = yaml.safe_load(SHIPPED.read_text())
    write(spaces, doc)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        result = invoke("sweep", "busy_loop", "--study", "smoke", *FAST, "--no-report", "--tracking-uri", uri,
                        "--storage", str(tmp_path / "runs"))
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("busy_loop")
    parent, = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    sweep_id = parent.data.tags["sweep_id"]

    # the record: on the parent run and beside Tune's results, the same
    record = client.download_artifacts(parent.info.run_id, "study.json", str(tmp_path))
    record = json.loads(Path(record).read_text())
    on_disk = json.loads((tmp_path / "runs" / sweep_id / "orchestrate.json").read_text())["record"]
    assert record == on_disk
    compiled = record["compiled"]
    assert compiled["grid"] == {"lr": [0.1, 0.2]} and compiled["seeds"] == [0, 1]
    assert compiled["eval_axes"] == {"k": [1, 5]} and compiled["objective"] == doc["objective"]
    assert compiled["base"]["epochs"] == 1 and compiled["base"]["seconds_per_epoch"] == 0.01  # --set included
    assert record["family_doc"] == doc  # report: and claims: settings as they were
    assert record["entrypoint"] == "trainables.busy_loop:train"
    assert record["package_version"] == metadata.version("sweep-orchestrator")
    # a full commit id of this checkout (others may commit while the test runs: not necessarily HEAD now)
    known = subprocess.run(["git", "cat-file", "-e", f"{record['git_commit']}^{{commit}}"], cwd=SHIPPED.parent)
    assert re.fullmatch(r"[0-9a-f]{40}", record["git_commit"]) and known.returncode == 0

    out = tmp_path / "report.md"
    scoped = ["report", "busy_loop", "--tracking-uri", uri, "--out", str(out)]
    assert invoke(*scoped, "--sweep", sweep_id).exit_code == 0
    before_sweep = out.read_text()
    assert invoke(*scoped).exit_code == 0
    before_family = out.read_text()
    assert "settings from the compiled study its sweep saved" in before_sweep

    edited = copy.deepcopy(doc)
    edited["report"]["labels"] = {"busy": "Busy kernel"}
    edited["studies"]["smoke"]["description"] = "EDITED description"
    edited["claims"][0].update(claim="EDITED claim", compare={**edited["claims"][0]["compare"], "better": "lower"})
    write(spaces, edited)
    assert invoke(*scoped, "--sweep", sweep_id).exit_code == 0
    assert without_time(out.read_text()) == without_time(before_sweep)
    assert invoke(*scoped).exit_code == 0
    assert without_time(out.read_text()) == without_time(before_family)

    # the control: without its record the same sweep is reported from the edited YAML
    (Path(urlparse(parent.info.artifact_uri).path) / "study.json").unlink()
    assert invoke(*scoped, "--sweep", sweep_id).exit_code == 0
    fallback = out.read_text()
    assert "Busy kernel" in fallback and "EDITED claim" in fallback and "EDITED" not in before_sweep
    assert "settings from the YAML as it is now (its sweep saved no compiled study)" in fallback


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["report"].update(bogus=1), "report: unknown key(s) ['bogus']"),
    (lambda d: d["report"].update(split="dev"), "report.split: expected one of"),
    (lambda d: d["report"].update(reference={"smoke": {"lr": 0.3}}), "report.reference.smoke.lr: 0.3 is not a value"),
    (lambda d: d["report"].update(drops={"smoke": "batch_size"}), "report.drops.smoke: expected a known study mapped"),
    (lambda d: d["claims"][0]["compare"]["where"].update(lr=0.3), "lr=0.3 is not in study 'smoke''s grid [0.1, 0.2]"),
    (lambda d: d["claims"][0]["compare"].update(metric="test/busy:k:7/acc"), "names eval axis k=7, but study 'smoke'"),
    (lambda d: d["claims"][0].update(study="nope"), "claims[0].study: unknown study 'nope'"),
    (lambda d: d["claims"][0].update(drop={"param": "lr", "from": 0.1, "to": 0.5}), "drop needs lr swept in study"),
])
def test_report_and_claims_keys_are_checked_before_a_sweep_starts(spaces, tmp_path, edit, message):
    doc = yaml.safe_load(SHIPPED.read_text())
    edit(doc)
    path = write(spaces, doc)
    result = invoke("sweep", "busy_loop", "--study", "smoke", "--dry-run")
    assert result.exit_code == 2, result.output
    line, = result.output.strip().splitlines()
    assert str(path) in line and message in line, line
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spaces"]  # no store, no runs/
    assert not ray.is_initialized()
