"""The attn_knn family without Ray: the report contract, eval axes, resume, divergence, check,
reliability bins, backbones and their weights."""

import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainables.attn_knn import AttnKnnNet, NeighbourAttention, build_backbone, check, train
from trainables.common.checks import ConfigError
from trainables.common.data import load_dataset
from trainables.common.encoders import EncoderUnavailable
from trainables.common.metrics import ece_from_bins, parse_metric_key

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)

SPACE = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "attn_knn.yaml").read_text())
METHODS = ("uniform_knn", "distance_knn", "attn_knn", "cnn")
METRICS = ("acc", "top5", "ece", "nll", "brier", "balanced_acc", "macro_f1")


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
    # eval axes and TTA only at the end: an earlier epoch's val has the plain names alone
    assert all(not parse_metric_key(k)["axes"] and "_tta" not in k for k in first if parse_metric_key(k))
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


def test_resume_continues_at_the_next_epoch_exactly(two_epochs):
    resumed = run(config(epochs=2, k_eval=5, eval={"k": [1, 5], "tta_views": [1, 2]}), restore=two_epochs[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2]
    full, again = two_epochs[1][0], resumed[0][0]
    assert again.keys() == full.keys()
    for name in full:
        if not name.startswith("perf/"):
            assert again[name] == full[name], name  # same state -> the same epoch 2, to the bit
    # and the same state after it, the learning-rate schedule included (a 3rd epoch would train at its lr)
    full_state, again_state = two_epochs[1][1]["tracked"], resumed[0][1]["tracked"]
    assert again_state["scheduler"] == full_state["scheduler"]
    assert again_state["optimizer"]["param_groups"] == full_state["optimizer"]["param_groups"]
    assert run(config(epochs=2), restore=two_epochs[1][1]) == []  # a finished trial does not rerun


def test_eval_axes_do_not_change_training():
    a, b = run(config(eval={"k": [5]})), run(config(eval={"k": [1, 5, 16], "tta_views": [3]}))
    assert a[-1][0]["train/attn_knn/loss"] == b[-1][0]["train/attn_knn/loss"]
    assert a[-1][0]["test/attn_knn/acc"] == b[-1][0]["test/attn_knn/acc"]
    assert "test/attn_knn:k:16:tta_views:3/acc" in b[-1][0] and "test/attn_knn:k:16:tta_views:3/acc" not in a[-1][0]


def test_divergence_is_reported():
    reports = run(config(lr=1e30, epochs=3))
    assert [m for m, _ in reports] == [{"diverged": 1.0, "epoch": 1}]


@pytest.mark.parametrize("overrides,message", [
    ({"embed_dim": 30, "heads": 4}, "embed_dim 30 must be divisible by heads 4"),
    ({"eval": {"k": [5000]}}, r"eval k 5000 is more than the 299 training images of digits \(max_train 300"),
    ({"max_train": 5, "k_train": 16, "k_eval": 5, "eval": {"k": [5]}}, "k_train 16 .* the 10 training images"),  # one per class at least
    ({"max_train": 20, "k_train": 20}, r"k_train 20 \+ 1 own image\(s\) excluded from the neighbours is more than the 20"),
    ({"max_train": 20, "k_train": 19, "mixup_alpha": 0.2}, r"k_train 19 \+ 2 own image"),
    ({"max_train": 0, "imbalance": 100.0, "k_eval": 700}, r"k_eval 700 is more than the \d+ training images .*imbalance 100"),
    ({"pretrained": "imagenet"}, "backbone small_cnn has no pretrained weights"),
    ({"dataset": "nosuch"}, "unknown dataset 'nosuch': use one of digits"),  # the data layer's own message
])
def test_check_refuses_what_train_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(config(**overrides))
    with pytest.raises(ConfigError, match=message):  # train refuses it the same way
        run(config(**overrides))


def test_check_accepts_the_edges():
    check(config(max_train=20, k_train=19, k_eval=20, eval={"k": [20]}))  # 20 images: 19 neighbours + the own one
    for name in SPACE["studies"]:
        study = SPACE["studies"][name]
        check({**SPACE["defaults"], **study.get("set", {}), "seed": 0, "eval": study.get("eval", SPACE["eval"])})


def test_check_sizes_are_the_sizes_train_sees():
    """check's training-set size (from labels only) is the loaded dataset's, whatever the subset."""
    from trainables.attn_knn import load_data

    for overrides in ({"max_train": 0}, {"max_train": 300}, {"max_train": 0, "imbalance": 10.0}, {"max_train": 100, "imbalance": 3.0}):
        n = len(load_data(config(**overrides)).train)
        check(config(**overrides, k_eval=n, eval={"k": [n]}))
        with pytest.raises(ConfigError, match=f"the {n} training images"):
            check(config(**overrides, k_eval=n + 1, eval={"k": [n]}))


@pytest.mark.parametrize("layout", ["CLASS/IMAGE", "SPLIT/CLASS/IMAGE"])
def test_training_size_of_an_image_folder_without_decoding(tmp_path, layout):
    from PIL import Image

    from trainables.common.data import train_class_counts

    rng = np.random.default_rng(0)
    for split, sizes in (("train", (13, 7, 22)), ("test", (3, 4, 5))):
        if layout == "CLASS/IMAGE" and split == "test":
            continue
        for c, n in enumerate(sizes):
            folder = tmp_path / (split if layout.startswith("SPLIT") else "") / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    spec = f"imagefolder:{tmp_path}"
    for max_train in (None, 12):
        ds = load_dataset(spec, max_train=max_train, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(train_class_counts(spec, max_train=max_train), np.bincount(ds.train.labels))


def test_logged_ece_equals_the_ece_of_the_logged_bins(tmp_path):
    reports = run(config(artifact_dir=str(tmp_path)))
    last = reports[-1][0]
    bins = json.loads((tmp_path / "reliability.json").read_text())["splits"]["test"]
    ece_names = {parse_metric_key(k)["method"] + "".join(f":{a}:{v}" for a, v in parse_metric_key(k)["axes"].items())
                 for k in last if k.startswith("test/") and k.endswith("/ece")}
    assert set(bins) == ece_names and "attn_knn:k:5:tta_views:2" in bins and "cnn_tta" in bins
    for name, entry in bins.items():
        key = f"test/{name}/ece"
        assert ece_from_bins(entry) == pytest.approx(last[key], abs=1e-12), key


def test_projected_attention_is_the_attention_module():
    torch.manual_seed(0)
    att = NeighbourAttention(32, 4, 10)
    bank, labels = torch.nn.functional.normalize(torch.randn(50, 32), dim=1), torch.randint(0, 10, (50,))
    z = torch.nn.functional.normalize(torch.randn(7, 32), dim=1)
    nbr = torch.randint(0, 50, (7, 5))
    with torch.no_grad():
        keys, values = att.project(bank)
        fast = att.attend(z, keys, values, nbr, labels[nbr])
        reference = att(z, bank[nbr], labels[nbr])
    np.testing.assert_allclose(fast.numpy(), reference.numpy(), atol=1e-5)


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
    with pytest.raises(EncoderUnavailable, match="resnet18.*IMAGENET1K_V1.*resnet18-f37072fd.pth.*pretrained: none"):
        build_backbone("resnet18", 3, 32, "imagenet")
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")  # offline: refused before anything starts, no download tried
    with pytest.raises(ConfigError, match="resnet50.*IMAGENET1K_V1.*ORCHESTRATE_OFFLINE forbids downloads"):
        check(config(backbone="resnet50", pretrained="imagenet"))


def test_one_weights_resolver_for_every_family(tmp_path, monkeypatch):
    """attn_knn's backbone, the feature encoders and wm_attention's front end load the same
    checkpoint for a name: here a stand-in file at the resolved path (a real resnet18 state
    dict, randomly initialised), loaded into every layer but the CIFAR stem."""
    from torchvision import models

    from trainables.common.encoders import imagenet_state_dict, imagenet_weights, imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    assert str(imagenet_weights("resnet50")) == "ResNet50_Weights.IMAGENET1K_V1"
    path = imagenet_weights_path("resnet18")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    with pytest.raises(EncoderUnavailable, match="encoder resnet18: .*does not load"):
        imagenet_state_dict("resnet18")
    state = models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    net, _ = build_backbone("resnet18", 3, 32, "imagenet")
    assert torch.equal(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    ds = load_dataset("digits", max_train=20, max_test=10)
    model = AttnKnnNet(config(backbone="resnet18", pretrained="imagenet"), ds)  # the family's model asks for them too
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    assert net.conv1.weight.shape == (64, 3, 3, 3)  # the CIFAR stem is new
    check(config(backbone="resnet18", pretrained="imagenet"))  # present: offline is fine


def test_adamw_and_its_cosine_schedule_are_the_configs(two_epochs):
    """The checkpointed optimizer is AdamW (decoupled decay) over every parameter at the config's lr
    and weight decay, decayed by a cosine over ``epochs``: lr * (1 + cos(pi e / epochs)) / 2 after epoch e."""
    cfg = config(epochs=2)
    for metrics, ckpt in two_epochs:
        (group,) = ckpt["tracked"]["optimizer"]["param_groups"]
        e = metrics["epoch"]
        assert group["decoupled_weight_decay"] and group["weight_decay"] == cfg["weight_decay"]
        assert group["initial_lr"] == cfg["lr"]
        assert group["lr"] == pytest.approx(cfg["lr"] * (1 + math.cos(math.pi * e / cfg["epochs"])) / 2, abs=1e-12)
        assert ckpt["tracked"]["scheduler"]["T_max"] == cfg["epochs"] and ckpt["tracked"]["scheduler"]["last_epoch"] == e
        state = ckpt["tracked"]["model"]  # every entry is a parameter but BatchNorm's statistics
        assert len(group["params"]) == len(state) - sum(name.endswith(BN_BUFFERS) for name in state)


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def reference_small_cnn(channels: int, pools: int) -> torch.nn.Sequential:
    """The module doc's small_cnn written out: conv3x3(no bias)-BN-ReLU at 32, 64, 128 channels,
    a 2x2 max-pool after each of the first ``pools`` blocks, global average pooling."""
    from torch import nn

    layers, width_in = [], channels
    for i, width in enumerate((32, 64, 128)):
        layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if i < pools else []
        width_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("channels,size,pools", [(1, 8, 2), (3, 32, 2), (3, 4, 1), (1, 2, 0)])
def test_small_cnn_is_the_documented_architecture(channels, size, pools):
    """Pooled while the map is at least 4 wide, at most twice: 8 -> 4 -> 2, 32 -> 16 -> 8, 4 -> 2, 2 stays."""
    torch.manual_seed(0)
    net, features = build_backbone("small_cnn", channels, size, "none")
    ref = reference_small_cnn(channels, pools)
    ref.load_state_dict(net.state_dict())  # strict: the same layers at the same places, no conv bias
    x = torch.randn(4, channels, size, size)
    for mode in (True, False):
        net.train(mode), ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref(x))
    assert features == 128


def test_resnet_backbones_have_the_cifar_stem():
    """3x3 stride-1 conv1 without bias and no max-pool: a 16x16 image reaches layer4 at 2x2 (stride
    8; torchvision's ImageNet stem gives 1x1 there); no fc, so the output is the pooled features.
    (resnet50 goes through the same function; test_backbones checks its output size.)"""
    net, n = build_backbone("resnet18", 1, 16, "none")
    seen = {}
    net.layer4.register_forward_hook(lambda module, args, out: seen.update(shape=tuple(out.shape[1:])))
    conv = net.conv1
    assert (conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.bias) == (1, (3, 3), (1, 1), (1, 1), None)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 1, 16, 16))
    assert seen["shape"] == (512, 2, 2) and out.shape == (1, 512) and n == 512
    assert isinstance(net.maxpool, torch.nn.Identity) and isinstance(net.fc, torch.nn.Identity)


def test_eval_axes_default_to_k_eval_and_one_or_tta_eval_views():
    """A config without ``eval`` (or with one axis only) still gets the plain and ``_tta`` names'
    cells: k = k_eval, views 1 and tta_eval."""
    from trainables.attn_knn import _eval_axes

    base = {"k_eval": 7, "tta_eval": 3}
    for axes in ({}, {"eval": None}, {"eval": {}}):
        assert _eval_axes({**base, **axes}) == ([7], [1, 3])
    assert _eval_axes({**base, "eval": {"k": (2, 9)}}) == ([2, 9], [1, 3])
    assert _eval_axes({**base, "eval": {"tta_views": [4]}}) == ([7], [4])
