"""set_anomaly: set construction, the farthest-from-mean baseline, and the family end to end on digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.distance import cosine
from scipy.stats import chisquare

from trainables.common.data import load_dataset
from trainables.common.metrics import parse_metric_key
from trainables.common.checks import ConfigError
from trainables.set_anomaly import build_sets, check, effective_classes, farthest_from_mean_scores, make_sets, train

SPEC = yaml.safe_load(open("search_spaces/set_anomaly.yaml"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def smoke_config(cache_dir, **overrides) -> dict:
    cfg = {**SPEC["defaults"], **SPEC["studies"]["smoke"]["set"], "seed": 0, "device": "cpu", "cache_dir": str(cache_dir),
           "max_train": 500}  # a smaller own-cnn to train
    return {**cfg, **overrides}


def test_each_set_has_exactly_one_anomaly_of_another_class_at_uniform_positions(digits):
    labels = digits.train.labels
    idx, target = make_sets(labels, n_classes=6, n_sets=3000, set_size=10, rng=np.random.default_rng(0))
    assert idx.shape == (3000, 10)
    set_labels = labels[idx]
    assert set_labels.max() < 6
    for row, members, t in zip(set_labels, idx, target):
        others = np.delete(row, t)
        assert (others == others[0]).all() and row[t] != others[0]
        assert len(set(np.delete(members, t))) == 9  # class A members are distinct images
    assert chisquare(np.bincount(target, minlength=10)).pvalue > 1e-3
    anchors = set_labels[np.arange(3000), (target + 1) % 10]
    assert chisquare(np.bincount(anchors, minlength=6)).pvalue > 1e-3


def test_splits_share_no_image_and_sets_are_fixed_per_seed(digits):
    cfg = {"seed": 3, "set_size": 10, "n_train_sets": 500, "n_val_sets": 200, "n_test_sets": 200}
    sets = build_sets(digits, cfg, 10)
    used = {split: {getattr(digits, split).images[i].tobytes() for i in idx.ravel()} for split, (idx, _) in sets.items()}
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    again = build_sets(digits, cfg, 10)
    other = build_sets(digits, {**cfg, "seed": 4}, 10)
    np.testing.assert_array_equal(sets["test"][0], again["test"][0])
    assert not np.array_equal(sets["test"][0], other["test"][0])


def test_n_classes_is_capped(digits, capsys):
    assert effective_classes(digits, 20) == 10
    assert "capped at digits's 10 classes" in capsys.readouterr().err
    assert effective_classes(digits, 4) == 4


def test_farthest_from_mean_finds_the_constructed_anomaly():
    rng = np.random.default_rng(0)
    sets, target = [], []
    for t in rng.integers(0, 8, size=50):
        members = np.abs(np.eye(16)[0] + 0.1 * rng.normal(size=(8, 16)))
        members[t] = np.abs(np.eye(16)[5] + 0.1 * rng.normal(size=16))
        sets.append(members)
        target.append(t)
    scores = farthest_from_mean_scores(np.array(sets))
    np.testing.assert_array_equal(scores.argmax(1), target)
    # same values as scipy's cosine distance to the set mean
    x = rng.normal(size=(5, 16))
    np.testing.assert_allclose(farthest_from_mean_scores(x[None])[0], [cosine(v, x.mean(0)) for v in x], rtol=1e-6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("set_anomaly_cache")


def _collect(cfg, restore=None):
    """Run the family with a list collector, on one thread (see tests/test_features.py::one_thread)."""
    reports, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)), restore=restore)
    finally:
        torch.set_num_threads(threads)
    return reports


@pytest.mark.slow
def test_family_runs_on_digits_and_resumes(cache):
    cfg = smoke_config(cache, epochs=3, patience=5)
    reports = _collect(cfg)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert all(ckpt is not None for _, ckpt in reports)
    final = reports[-1][0]
    for split in ("val", "test"):
        for method in ("attention", "flat_mlp", "farthest_from_mean", "random"):
            for metric in ("acc", "top5"):
                assert 0.0 <= final[f"{split}/{method}/{metric}"] <= 1.0
    assert all(parse_metric_key(k) for k in final if "/" in k and not k.startswith("perf/"))
    assert final["perf/features_ms"] > 0 and final["perf/epoch_ms"] > 0
    assert final["test/attention/acc"] > final["test/random/acc"] + 0.2
    # resuming from epoch 1's checkpoint reports epochs 2 and 3 only, with the same results
    resumed = _collect(cfg, restore=reports[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    assert resumed[-1][0]["test/attention/acc"] == pytest.approx(final["test/attention/acc"])
    assert resumed[-1][0]["val/flat_mlp/loss"] == pytest.approx(final["val/flat_mlp/loss"], rel=1e-5)


def test_nan_loss_is_reported_as_diverged(cache):
    reports = _collect(smoke_config(cache, lr=1e30, n_train_sets=200))
    assert reports[-1][0] == {"diverged": 1.0, "epoch": reports[-1][0]["epoch"]}


@pytest.mark.parametrize("overrides,message", [
    ({"heads": 3}, "the own-cnn feature width 256 (model_dim 0) must be divisible by heads 3"),
    ({"heads": 3, "encoder": "resnet50"}, "the resnet50 feature width 2048 (model_dim 0) must be divisible by heads 3"),
    ({"model_dim": 30, "heads": 4}, "model_dim 30 must be divisible by heads 4"),
    ({"n_classes": 1}, "n_classes 1 must be at least 2"),
    ({"set_size": 1}, "set_size 1 must be at least 2"),
])
def test_check_refuses_what_train_cannot_run(overrides, message):
    check(smoke_config("unused"))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(smoke_config("unused", **overrides))
    with pytest.raises(ConfigError):
        train(smoke_config("unused", **overrides), lambda *a, **k: None)


def test_feature_dims_match_the_encoders():
    """check() reads feature widths from FEATURE_DIMS: they are the widths the encoders give
    (torchvision's ResNets built without weights; own-cnn on digits)."""
    import torchvision

    from trainables.common.encoders import OwnCNN
    from trainables.common.features import FEATURE_DIMS

    assert OwnCNN(1, 8, 10).dim == FEATURE_DIMS["own-cnn"]
    for name in ("resnet18", "resnet50"):
        assert getattr(torchvision.models, name)().fc.in_features == FEATURE_DIMS[name]
