"""Cluster configs and multi-node sweeps: cluster.yaml against the installed Ray's schema and the
project's rules; on a real multi-node Ray cluster on this machine (a head and two workers, each
its own raylet), the shared-storage rule and a worker node killed mid-trial."""

import pytest
import ray
import yaml
from click.testing import CliRunner
from fault_helpers import ROOT, finish, results_on_disk, start, steps, trial_runs, wait_for
from ray.cluster_utils import Cluster

from orchestrator.cli import main
from orchestrator.cluster import filesystem_type, is_remote_uri
from trainables.busy_loop import expected_acc

CLUSTER_YAML = ROOT / "cluster.yaml"


def validate(tmp_path, mutate):
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    mutate(config)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(main, ["cluster", "validate", str(path)])


def test_shipped_cluster_yaml_is_valid():
    result = CliRunner().invoke(main, ["cluster", "validate", str(CLUSTER_YAML)])
    assert result.exit_code == 0, result.output
    assert "valid (Ray 2." in result.output


def _drop_setup(index):
    return lambda c: c["setup_commands"].pop(index)


BROKEN = {
    # Ray's own schema
    "unknown key": (lambda c: c["available_node_types"]["gpu_worker"].update(max_worker=3),
                    "available_node_types.gpu_worker.max_worker"),
    "wrong type": (lambda c: c.update(max_workers="four"), "max_workers"),
    "negative resource": (lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=-1),
                          "available_node_types.gpu_worker.resources.GPU"),
    "no provider": (lambda c: c.pop("provider"), "provider: missing"),
    # the project's rules
    "no GPU worker": (lambda c: c["available_node_types"]["gpu_worker"]["resources"].pop("GPU"), "available_node_types:"),
    "unknown head type": (lambda c: c.update(head_node_type="boss"), "head_node_type"),
    "project not installed": (_drop_setup(0), "setup_commands: no command runs `pip install`"),
    "project not copied": (lambda c: c.update(file_mounts={}), "file_mounts"),
    "storage not shared": (lambda c: c.update(initialization_commands=[]), "ORCHESTRATE_STORAGE=/mnt/shared/runs is each node's own disk"),
    "no storage": (_drop_setup(1), "no command exports ORCHESTRATE_STORAGE"),
    "storage not in container": (lambda c: c["docker"].update(run_options=[]), "docker.run_options"),
    "tracking on loopback": (lambda c: c["setup_commands"].__setitem__(2, "echo 'export MLFLOW_TRACKING_URI=http://127.0.0.1:5000' >> ~/.bashrc"),
                             "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"),
    "public dashboard": (lambda c: c["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"),
                         "head_start_ray_commands: --dashboard-host=0.0.0.0"),
    "credential": (lambda c: c["setup_commands"].append("export AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP"), "setup_commands.3"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_cluster_yaml_fails_naming_the_key(tmp_path, name):
    mutate, key = BROKEN[name]
    result = validate(tmp_path, mutate)
    assert result.exit_code == 2, result.output
    assert key in result.output, result.output
    assert "Traceback" not in result.output


def test_documented_on_premises_config_is_valid(tmp_path):
    doc = (ROOT / "docs" / "cluster.md").read_text()
    block = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "type: local" in block
    path = tmp_path / "lab.yaml"
    path.write_text(block)
    result = CliRunner().invoke(main, ["cluster", "validate", str(path)])
    assert result.exit_code == 0, result.output
    on_premises = yaml.safe_load(block)
    on_premises["provider"].pop("worker_ips")
    on_premises["available_node_types"] = {"gpu": {"resources": {"GPU": 1}, "node_config": {}}}
    path.write_text(yaml.safe_dump(on_premises))
    result = CliRunner().invoke(main, ["cluster", "validate", str(path)])
    assert result.exit_code == 2
    assert "provider.worker_ips: no worker machines" in result.output
    assert "available_node_types: Ray builds node types itself for provider local" in result.output


def test_s3_storage_needs_no_mount(tmp_path):
    def to_s3(config):
        config["setup_commands"][1] = "echo 'export ORCHESTRATE_STORAGE=s3://my-bucket/sweeps' >> ~/.bashrc"
        config["initialization_commands"] = []
        config["docker"]["run_options"] = []

    assert validate(tmp_path, to_s3).exit_code == 0


def test_shared_storage_is_told_by_uri_or_mount_table():
    mounts = ("/dev/sda1 / ext4 rw 0 0\n"
              "fs-1.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw 0 0\n"
              "/dev/sdb1 /mnt/shared/scratch ext4 rw 0 0\n"
              "server:/export /mnt/my\\040data nfs rw 0 0\n")
    assert filesystem_type("/mnt/shared/runs", mounts) == "nfs4"
    assert filesystem_type("/mnt/shared/scratch/runs", mounts) == "ext4"  # the innermost mount wins
    assert filesystem_type("/mnt/sharedX/runs", mounts) == "ext4"  # a prefix of the name is not a parent
    assert filesystem_type("/mnt/my data/runs", mounts) == "nfs"
    assert is_remote_uri("s3://bucket/sweeps") and is_remote_uri("gs://bucket/x")
    assert not is_remote_uri("/mnt/shared/runs") and not is_remote_uri("file:///tmp/runs")


# ---------------------------------------------------------------- a real multi-node cluster


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker raylets, one CPU each (three trial slots)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_local_storage_is_refused_on_several_nodes_before_anything_starts(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv("ORCHESTRATE_SHARED_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        result = CliRunner().invoke(main, ["sweep", "busy_loop", "--address", cluster[0].address, "--storage", "runs",
                                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    finally:
        ray.shutdown()  # this process joined as a driver; the next test's driver is its own process
    assert result.exit_code == 2, result.output
    assert "is a local directory" in result.output and "3 nodes" in result.output and "ORCHESTRATE_SHARED_STORAGE=1" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_sweep_spans_nodes_and_survives_a_worker_killed_mid_trial(cluster, tmp_path):
    ray_cluster, workers = cluster
    victim = workers[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage, log = tmp_path / "runs", tmp_path / "sweep.log"
    epochs = 4
    # one machine: the directory is the same on every node, which the driver checks with a probe
    driver = start(["sweep", "busy_loop", "--study", "smoke", "--set", f"epochs={epochs}", "--set", "seconds_per_epoch=1.0",
                    "--address", ray_cluster.address, "--storage", str(storage), "--tracking-uri", uri, "--no-report"],
                   tmp_path, log, ORCHESTRATE_SHARED_STORAGE="1")
    try:
        def running_on_victim():
            return [t for t, rs in results_on_disk(storage).items()
                    if rs[-1]["node_id"] == victim.node_id and 2 <= rs[-1]["epoch"] < epochs]

        killed = wait_for(running_on_victim, 300, "a trial mid-way on the worker to kill", driver, log)[0]
        ray_cluster.remove_node(victim, allow_graceful=False)  # SIGKILL to the raylet and everything on it
        rc = driver.wait(timeout=400)
    finally:
        if driver.poll() is None:
            driver.kill()
        finish(driver, 30)
    assert rc == 0, log.read_text()[-3000:]
    assert "4 trials (0 errored, 0 diverged)" in log.read_text()

    results = results_on_disk(storage)
    assert len(results) == 4
    nodes = {r["node_id"] for rs in results.values() for r in rs}
    assert len(nodes) >= 2  # trials landed on more than one node
    for trial_id, rs in results.items():
        assert [r["epoch"] for r in rs] == list(range(1, epochs + 1)), trial_id  # each epoch once, none lost
    restarted = results[killed]
    restart = next(r for r in restarted if r["iterations_since_restore"] == 1 and r["epoch"] > 1)  # from its checkpoint
    assert restart["node_id"] != victim.node_id

    runs = trial_runs(uri, "busy_loop")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(results)  # exactly one run per trial
    for run in runs:
        tags = run.data.tags
        assert run.info.status == "FINISHED" and tags["status"] == "finished"
        assert tags["node_id"] == results[tags["trial_id"]][-1]["node_id"] and tags["node_ip"] and tags["host"]
        assert steps(uri, run.info.run_id, "val/busy/acc") == list(range(1, epochs + 1))
        config = {"seed": int(run.data.params["seed"]), "lr": float(run.data.params["lr"])}
        assert run.data.metrics["test/busy/acc"] == pytest.approx(expected_acc(config, epochs))
    assert {r.data.tags["node_id"] for r in runs} <= nodes
