"""The attn_knn family without Ray: the report contract, eval axes, resume, divergence, backbones."""

import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from trainables.attn_knn import MissingWeightsError, build_backbone, train
from trainables.common.metrics import parse_metric_key

SPACE = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "attn_knn.yaml").read_text())
METHODS = ("uniform_knn", "distance_knn", "attn_knn", "cnn")
METRICS = ("acc", "top5", "ece", "nll", "brier", "balanced_acc", "macro_f1")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only fight over the shared cores (10x slower under load)."""
    try:
        import faiss
    except ImportError:  # GPU nodes may have torch only
        faiss = None
    before = torch.get_num_threads(), faiss and faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    if faiss:
        faiss.omp_set_num_threads(before[1])


def config(**overrides):
    """The YAML defaults with the smoke study's settings, seed 0, on the CPU."""
    smoke = SPACE["studies"]["smoke"]
    return {**SPACE["defaults"], **smoke["set"], "seed": 0, "device": "cpu", "eval": dict(smoke["eval"]), **overrides}


def run(cfg, restore=None):
    reports = []
    train(cfg, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)), restore=restore)
    return reports


@pytest.fixture(scope="module")
def two_epochs():
    return run(config(epochs=2, k_eval=5, eval={"k": [1, 5], "tta_views": [1, 2]}))


def test_reports_the_contract(two_epochs):
    assert [m["epoch"] for m, _ in two_epochs] == [1, 2]  # one report per epoch: nothing retrained per eval value
    assert all(ckpt is not None and ckpt["epoch"] == m["epoch"] for m, ckpt in two_epochs)
    first, (last, _) = two_epochs[0][0], two_epochs[-1]
    for name in ("train/cnn/loss", "train/attn_knn/loss", "train/distance_knn/loss", "val/cnn/acc", "val/attn_knn/acc"):
        assert name in first and name in last
    for split in ("val", "test"):
        for method in METHODS:
            for metric in METRICS:
                for name in (f"{split}/{method}/{metric}", f"{split}/{method}_tta/{metric}"):
                    assert 0 <= last[name] < float("inf"), name
    for key in last:
        assert key in ("epoch",) or key.startswith("perf/") or parse_metric_key(key) is not None, key
    assert last["perf/search_ms_per_query"] > 0 and last["perf/epoch_ms"] > 0
    assert "perf/attention_ms_per_query" in last
    assert last["test/attn_knn/acc"] > 0.5 and last["test/cnn/acc"] > 0.3  # it learns something in 2 short epochs


def test_one_metric_per_eval_axis_value(two_epochs):
    last = two_epochs[-1][0]
    axis_keys = {parse_metric_key(k)["method"] + str(parse_metric_key(k)["axes"]) for k in last
                 if k.startswith("test/") and k.endswith("/acc") and parse_metric_key(k)["axes"]}
    expected = {f"{m}{{'k': '{k}', 'tta_views': '{n}'}}" for m in METHODS[:3] for k in (1, 5) for n in (1, 2)}
    expected |= {f"cnn{{'tta_views': '{n}'}}" for n in (1, 2)}
    assert axis_keys == expected
    # plain names are k = k_eval (5) with one view; _tta names use tta_eval (2) views
    for method in METHODS[:3]:
        assert last[f"test/{method}/nll"] == last[f"test/{method}:k:5:tta_views:1/nll"]
        assert last[f"test/{method}_tta/nll"] == last[f"test/{method}:k:5:tta_views:2/nll"]
    assert last["test/cnn_tta/nll"] == last["test/cnn:tta_views:2/nll"]
    # with one neighbour, the uniform and the distance-weighted vote are the same one-hot vote
    assert last["test/uniform_knn:k:1:tta_views:1/nll"] == pytest.approx(last["test/distance_knn:k:1:tta_views:1/nll"])
    assert last["test/uniform_knn:k:1:tta_views:1/nll"] > 1.0  # a one-hot vote: any miss costs -log(1e-12)
    assert last["test/attn_knn:k:5:tta_views:2/nll"] != last["test/attn_knn:k:5:tta_views:1/nll"]  # views differ


def test_resume_continues_at_the_next_epoch(two_epochs):
    resumed = run(config(epochs=2, k_eval=5, eval={"k": [1, 5], "tta_views": [1, 2]}), restore=two_epochs[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    full, again = two_epochs[1][0], resumed[0][0]
    for name in ("train/cnn/loss", "train/attn_knn/loss", "test/attn_knn/acc", "test/cnn_tta/nll"):
        assert again[name] == pytest.approx(full[name], rel=1e-4), name  # same state -> same epoch 2


def test_eval_axes_do_not_change_training():
    a, b = run(config(eval={"k": [5]})), run(config(eval={"k": [1, 5, 16], "tta_views": [3]}))
    assert a[-1][0]["train/attn_knn/loss"] == b[-1][0]["train/attn_knn/loss"]
    assert a[-1][0]["test/attn_knn/acc"] == b[-1][0]["test/attn_knn/acc"]
    assert "test/attn_knn:k:16:tta_views:3/acc" in b[-1][0] and "test/attn_knn:k:16:tta_views:3/acc" not in a[-1][0]


def test_divergence_is_reported():
    reports = run(config(lr=1e30, epochs=3))
    assert [m for m, _ in reports] == [{"diverged": 1.0, "epoch": 1}]


def test_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        run(config(embed_dim=30, heads=4))
    with pytest.raises(ValueError, match="training images"):
        run(config(eval={"k": [5000]}))


@pytest.mark.parametrize("name,size", [("small_cnn", 8), ("small_cnn", 32), ("resnet18", 8), ("resnet18", 32), ("resnet50", 8)])
def test_backbones(name, size):
    net, features = build_backbone(name, 3, size, "none")
    assert net(torch.randn(2, 3, size, size)).shape == (2, features)


def test_missing_pretrained_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights ...
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # ... and no way to download them
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen caches its opener (and the proxies it read) for the whole process: give this test
    # its own and put the clean one back afterwards, or later tests' loopback requests go to :9
    monkeypatch.setattr(urllib.request, "_opener", None)
    with pytest.raises(MissingWeightsError, match="resnet18.*resnet18-f37072fd.pth.*pretrained: none"):
        build_backbone("resnet18", 3, 32, "imagenet")
    with pytest.raises(MissingWeightsError, match="small_cnn"):
        build_backbone("small_cnn", 3, 32, "imagenet")
