"""Bad input: one clear line, exit code 2, no traceback, nothing started, nothing written."""

import os

import numpy as np
import pytest
import ray
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main
from orchestrator.registry import set_spaces_dirs


@pytest.mark.parametrize("args, message", [
    (["sweep", "nope"], "unknown family"),
    (["sweep", "busy_loop", "--study", "nope"], "unknown study"),
    (["sweep", "busy_loop", "--set", "nokey=1"], "unknown key"),
    (["sweep", "busy_loop", "--set", "lr"], "expects key=value"),
    (["sweep", "busy_loop", "--set", "lr=-1"], "out of range"),
    (["sweep", "busy_loop", "--set", "epochs=1.5"], "expected int"),
    (["sweep", "subtask_meta", "--set", "brightness_thresholds=[false, true]"],
     "--set: brightness_thresholds[0]=False has the wrong type (expected float)"),
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
    assert_refused(tmp_path, args, message)


def assert_refused(tmp_path, args, message):
    result = CliRunner().invoke(main, args)
    set_spaces_dirs([])  # --spaces lasts for one command
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert os.listdir(tmp_path) == []  # no mlflow.db, no runs/
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad family folders and bad datasets, all outside the (empty) working directory."""
    root = tmp_path_factory.mktemp("bad-inputs")
    head = "family: {name}\nobjective: {{metric: val/x/acc, mode: max}}\ndefaults: {{lr: 0.1, heads: 2}}\nstudies: {{s: {{}}}}\n"
    families = {
        "noimport": ("entrypoint: badfam_missing:train\n", None),
        "notcallable": ("entrypoint: badfam_notcallable:train\n", "train = 3\n"),
        "noentry": ("", None),
        "checked": ("entrypoint: badfam_checked:train\n",
                    "from trainables.common.checks import ConfigError\n\n\ndef train(config, report, restore=None):\n"
                    "    pass\n\n\ndef check(config):\n    if config['heads'] > 4:\n"
                    "        raise ConfigError(f\"heads {config['heads']} is more than 4\")\n"),
    }
    spaces = root / "spaces"
    spaces.mkdir()
    for name, (entry, code) in families.items():
        (spaces / f"{name}.yaml").write_text(entry + head.format(name=name))
        if code:
            (spaces / f"badfam_{name}.py").write_text(code)
    (spaces / "malformed.yaml").write_text("entrypoint: badfam_x:train\nstudies: {s: [\n")
    image = np.zeros((8, 8, 3), np.uint8)
    for rel in ("one_class/cat/a.png", "one_class/cat/b.png", "flat/a.png", "flat/b.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / rel)
    (root / "notazip.zip").write_text("not a zip")
    return root


@pytest.mark.parametrize("args, message", [
    (["sweep", "noimport", "--spaces", "{spaces}"], "entrypoint badfam_missing:train: no module 'badfam_missing'"),
    (["sweep", "notcallable", "--spaces", "{spaces}"], "notcallable.yaml: entrypoint badfam_notcallable:train: train is a int"),
    (["sweep", "malformed", "--spaces", "{spaces}"], "malformed YAML in {spaces}/malformed.yaml (line 3)"),
    (["sweep", "noentry", "--spaces", "{spaces}"], "noentry.yaml: no 'entrypoint'"),
    (["list", "--spaces", "{spaces}"], "malformed YAML in {spaces}/malformed.yaml"),  # list reads every file first
    (["sweep", "checked", "--spaces", "{spaces}", "--set", "heads=5"],
     "checked.yaml studies.s trial 0 (seed=0; --set heads=5): heads 5 is more than 4"),
    (["sweep", "attn_knn", "--set", "heads=3"], "embed_dim 128 must be divisible by heads 3"),
    (["sweep", "attn_knn", "--set", "max_train=5", "--set", "k_train=16"], "training images of digits (max_train 5"),
    (["sweep", "busy_loop", "--set", "lr=nan"], "--set lr=nan: not a finite number"),
    (["sweep", "busy_loop", "--cpus-per-trial", "nan"], "--cpus-per-trial nan: not a finite number"),
    (["sweep", "busy_loop", "--dataset", "imagefolder:{root}/one_class"], "at least 2 class folders, found ['cat']"),
    (["sweep", "busy_loop", "--dataset", "imagefolder:{root}/flat"], "no images in ImageFolder layout"),
    (["sweep", "busy_loop", "--dataset", "imagefolder:{root}/notazip.zip"], "neither a directory nor a zip file"),
    # conftest points the cache (where torchvision datasets are read from) at an empty folder
    (["sweep", "busy_loop", "--dataset", "cifar10"], "cifar10 is not on disk under {cache}/torchvision: download it "
                                                     "once (needs network) with: python -c \"from torchvision.datasets "
                                                     "import CIFAR10 as D; [D('{cache}/torchvision', train=t, download=True)"),
])
def test_bad_family_config_or_data_exits_2_before_anything_starts(tmp_path, monkeypatch, inputs, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fill = {"spaces": str(inputs / "spaces"), "root": str(inputs), "cache": os.environ["ORCHESTRATE_CACHE_DIR"]}
    assert_refused(tmp_path, [a.format(**fill) for a in args], message.format(**fill))


@pytest.mark.slow
def test_resources_no_node_has_stop_the_ray_the_sweep_started(tmp_path, monkeypatch):
    """Checked once Ray is up (it knows the nodes) and before any trial is queued or run logged."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert_refused(tmp_path, ["sweep", "busy_loop", "--cpus-per-trial", "64"],
                   f"--cpus-per-trial 64 --gpus-per-trial 0: no node of the cluster has that much (nodes: {os.cpu_count()} CPU")


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


def test_launchable_node_types_count_as_nodes(tmp_path):
    """On a ``ray up`` head, a request fits when some node type the autoscaler may launch has it;
    a type whose resources Ray detects at launch leaves nothing to compare with (no refusal)."""
    from orchestrator.runner import node_type_shapes

    config = tmp_path / "ray_bootstrap_config.yaml"
    assert node_type_shapes(config) == []  # not a `ray up` head: the live nodes decide
    config.write_text("available_node_types:\n  head: {resources: {CPU: 4}}\n  gpu: {resources: {CPU: 8, GPU: 1}}\n")
    assert node_type_shapes(config) == [{"CPU": 4}, {"CPU": 8, "GPU": 1}]
    config.write_text("available_node_types:\n  head: {resources: {CPU: 4}}\n  auto: {node_config: {}}\n")
    assert node_type_shapes(config) is None
    config.write_text("available_node_types: [\n")
    assert node_type_shapes(config) is None
