"""A family of the user's own, from a folder outside the package, through real Ray, MLflow and
the report. Its two files are the ones docs/own_family.md shows, read from the page, so the page
cannot drift from what works."""

import os
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.registry import set_spaces_dirs

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_family.md"
SHIPPED = sorted(p.stem for p in Path(str(resources.files("search_spaces"))).glob("*.yaml"))


def doc_files() -> dict[str, str]:
    """The page's code blocks that name a file (```python my_mlp.py)."""
    return {name: body for name, body in re.findall(r"```\w+ (\S+)\n(.*?)```", DOC.read_text(), re.S)}


@pytest.fixture
def own_family(tmp_path):
    """docs/own_family.md's files in ``tmp_path/mine``; commands run from ``tmp_path``, so only
    the registry can put ``mine/`` on the import path (of the driver and of every worker)."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, body in doc_files().items():
        (folder / name).write_text(body)
    yield folder
    set_spaces_dirs([])
    sys.modules.pop("my_mlp", None)


def orchestrate(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed ``orchestrate`` command, as a user runs it (no cwd on sys.path, unlike -m)."""
    command = shutil.which("orchestrate", path=os.path.dirname(sys.executable)) or shutil.which("orchestrate")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ORCHESTRATE_SPACES_DIR")}
    return subprocess.run([command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_the_doc_holds_one_python_file_and_one_yaml():
    files = doc_files()
    assert sorted(files) == ["my_mlp.py", "my_mlp.yaml"]
    assert "entrypoint: my_mlp:train" in files["my_mlp.yaml"]


def test_shipped_families_are_listed_beside_it(own_family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["list", "--spaces", "mine"])
    assert result.exit_code == 0, result.output
    heads = {line.split(":")[0]: line for line in result.output.splitlines() if not line.startswith(" ")}
    assert sorted(heads) == sorted(SHIPPED + ["my_mlp"])
    assert f"[{own_family / 'my_mlp.yaml'} via --spaces]" in heads["my_mlp"]
    assert all("via" not in heads[name] for name in SHIPPED)
    assert "  width (default): hidden width 8 vs 64 [hidden=[8, 64]; eval noise=[0.0, 0.5, 1.0]; seeds=2; 4 trials]" \
        in result.output


def test_its_check_refuses_a_bad_combination_before_anything_starts(own_family, tmp_path, monkeypatch):
    """The line the doc shows, exit code 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["sweep", "my_mlp", "--spaces", "mine", "--set", "batch_size=512",
                                       "--set", "max_train=100"])
    assert result.exit_code == 2, result.output
    expected = ("my_mlp.yaml studies.width trial 0 (hidden=8 seed=0; --set batch_size=512; --set max_train=100): "
                "batch_size 512 is more than max_train 100")
    assert result.output.strip() == f"Error: {expected}"
    shown = " ".join(DOC.read_text().split())  # the doc wraps the line in a comment
    where, problem = expected.split("): ")
    assert f"{where}):" in shown and f"# {problem}" in shown
    assert sorted(os.listdir(tmp_path)) == ["mine"]


@pytest.mark.slow
def test_own_family_sweeps_through_ray_and_mlflow_and_reports(own_family, tmp_path):
    sweep = orchestrate(tmp_path, "sweep", "my_mlp", "--spaces", "mine", "--set", "epochs=2")
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    assert "4 trials (0 errored, 0 diverged)" in sweep.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("my_mlp")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len([r for r in runs if r.data.tags.get("role") == "parent"]) == 1 and len(children) == 4
    assert sorted((r.data.params["hidden"], r.data.params["seed"]) for r in children) == \
        [("64", "0"), ("64", "1"), ("8", "0"), ("8", "1")]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["status"] == "finished"
        history = client.get_metric_history(child.info.run_id, "val/mlp/acc")
        assert sorted(m.step for m in history) == [1, 2]
        assert {f"test/mlp:noise:{s}/acc" for s in ("0", "0.5", "1")} <= set(child.data.metrics)

    # What Ray ran is what the plain function gives for that config, in this process, without Ray.
    sys.path.insert(0, str(own_family))
    import my_mlp

    child = next(r for r in children if r.data.params["hidden"] == "64" and r.data.params["seed"] == "1")
    config = {"dataset": "digits", "epochs": 2, "lr": 0.05, "hidden": 64, "batch_size": 64, "max_train": 0,
              "seed": 1, "eval": {"noise": [0.0, 0.5, 1.0]}, "device": "auto", "artifact_dir": str(tmp_path / "art")}
    reports = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU trial: the same summation order, the same floats
    try:
        my_mlp.train(config, lambda metrics, checkpoint=None: reports.append(metrics))
    finally:
        torch.set_num_threads(threads)
    for key in ("test/mlp/acc", "test/mlp:noise:1/acc", "test/mlp/nll", "train/mlp/loss"):
        assert child.data.metrics[key] == pytest.approx(reports[-1][key], rel=1e-6), key
    assert reports[-1]["test/mlp/acc"] > 0.5  # far above chance (0.1): it learned

    report = orchestrate(tmp_path, "report", "my_mlp", "--spaces", "mine")
    assert report.returncode == 0, report.stderr[-3000:]
    assert report.stdout.startswith("# my_mlp")
    assert "a wider hidden layer is more accurate" in report.stdout
    for hidden in ("8", "64"):
        assert re.search(rf"\| {hidden} \| mlp \| 0\.\d+ .*\(n=2\)", report.stdout), report.stdout
    assert list((tmp_path / "runs").iterdir())  # Tune's results
    assert sorted(p.name for p in own_family.iterdir() if p.name != "__pycache__") == ["my_mlp.py", "my_mlp.yaml"]
