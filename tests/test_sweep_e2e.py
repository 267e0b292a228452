"""`orchestrate sweep` end to end: real Ray (local), real MLflow store, real families."""

import pytest
import ray
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.registry import families
from orchestrator.spaces import load_family_file
from trainables.busy_loop import expected_acc
from trainables.common.metrics import parse_metric_key

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """One local Ray for the module (a Ray start costs several seconds); feature caches in tmp."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    mp.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
    mp.undo()


def sweep(tmp_path, *args):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(main, ["sweep", *args, "--tracking-uri", uri, "--storage", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    return MlflowClient(uri), result.output


def runs_by_role(client, family):
    exp = client.get_experiment_by_name(family)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    children = [r for r in runs if r.data.tags.get("role") == "trial"]
    return parents, children


def test_busy_loop_sweep_logs_one_parent_and_one_child_per_trial(local_ray, tmp_path):
    client, output = sweep(tmp_path, "busy_loop", "--study", "smoke")
    assert "4 trials (0 errored, 0 diverged)" in output and "report:" in output
    parents, children = runs_by_role(client, "busy_loop")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["trial_id"] for c in children}) == 4
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        for tag in ("sweep_id", "trial_id", "study", "dataset", "seed", "git_commit", "host"):
            assert tags.get(tag), tag
        assert tags["study"] == "smoke" and tags["status"] == "finished" and child.info.status == "FINISHED"
        config = {"seed": int(params["seed"]), "lr": float(params["lr"])}
        assert params["eval.k"] == "[1, 5]"
        # final metrics equal the kernel's known values; every epoch was logged once
        assert metrics["test/busy/acc"] == pytest.approx(expected_acc(config, 3))
        assert metrics["test/busy:k:5/acc"] == pytest.approx(expected_acc(config, 3) - 0.005)
        history = client.get_metric_history(child.info.run_id, "val/busy/acc")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert all(parse_metric_key(k) for k in metrics if k not in ("epoch",))
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id)]
    assert "report.md" in artifacts

    report = CliRunner().invoke(main, ["report", "busy_loop", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert report.exit_code == 0, report.output
    assert "| busy |" in report.output


def test_diverged_trial_is_reported_and_the_sweep_goes_on(local_ray, tmp_path):
    client, output = sweep(tmp_path, "busy_loop", "--study", "smoke", "--set", "diverge_at_epoch=2")
    assert "4 trials (0 errored, 4 diverged)" in output
    _, children = runs_by_role(client, "busy_loop")
    assert len(children) == 4 and all(c.data.tags["status"] == "diverged" for c in children)


# Every registered model family with a smoke study (busy_loop, the engine's test kernel, has its own tests above).
MODEL_FAMILIES = [f for f in families() if f != "busy_loop" and "smoke" in load_family_file(f)["studies"]]


def test_every_shipped_model_family_has_a_smoke_study():
    assert len(MODEL_FAMILIES) == len(families()) - 1


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_family_smoke_study_runs_through_ray_and_mlflow(local_ray, tmp_path, family):
    client, output = sweep(tmp_path, family, "--study", "smoke")
    parents, children = runs_by_role(client, family)
    assert len(parents) == 1 and len(children) >= 1
    for child in children:
        assert child.data.tags["status"] == "finished", child.data.tags
        metrics = child.data.metrics
        contract = [parse_metric_key(k) for k in metrics]
        assert any(p and p["split"] == "test" for p in contract), sorted(metrics)
        bad = [k for k, p in zip(metrics, contract) if p is None and not k.startswith(("perf/", "info/")) and k not in ("epoch", "diverged")]
        assert not bad, bad
