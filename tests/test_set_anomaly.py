"""set_anomaly: set construction, the farthest-from-mean baseline, and the family end to end on digits."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import yaml
from scipy.spatial.distance import cosine
from scipy.stats import chisquare

from trainables.common.data import load_dataset
from trainables.common.metrics import parse_metric_key
from trainables.common.checks import ConfigError
from trainables.set_anomaly import (build_sets, check, effective_classes, farthest_from_mean_scores, make_sets, train,
                                    train_statistics)

SPEC = yaml.safe_load(open("search_spaces/set_anomaly.yaml"))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def smoke_config(**overrides) -> dict:
    # the session's feature cache (tests/conftest.py) and the wiring tests' 400 images: own-cnn
    # is trained once per session, not once per test file (mutation testing runs a session per mutant)
    cfg = {**SPEC["defaults"], **SPEC["studies"]["smoke"]["set"], "seed": 0, "device": "cpu", "max_train": 400}
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


def test_class_a_images_repeat_only_when_the_class_has_too_few(capsys):
    """Class 0 has exactly set_size - 1 images (each set of class A holds all of them, distinct);
    class 1 has one fewer (drawn with replacement, and said on stderr); a class with no image is refused."""
    labels = np.array([0] * 9 + [1] * 8)
    idx, target = make_sets(labels, n_classes=2, n_sets=200, set_size=10, rng=np.random.default_rng(0))
    assert "classes [1] have fewer than 9 images in a split of 17; their sets repeat images" in capsys.readouterr().err
    class_a = labels[idx[np.arange(200), (target + 1) % 10]]
    members = [np.delete(row, t) for row, t in zip(idx, target)]
    assert all(sorted(m) == list(range(9)) for m, a in zip(members, class_a) if a == 0)
    assert (class_a == 1).any() and all(set(m) <= set(range(9, 17)) for m, a in zip(members, class_a) if a == 1)
    make_sets(np.array([0] * 9 + [1] * 9), n_classes=2, n_sets=5, set_size=10, rng=np.random.default_rng(0))
    assert capsys.readouterr().err == ""  # nothing short, nothing said
    with pytest.raises(ValueError, match="first 3 classes needs images"):
        make_sets(labels, n_classes=3, n_sets=5, set_size=10, rng=np.random.default_rng(0))


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
    assert effective_classes(digits, 10) == 10
    assert capsys.readouterr().err == ""  # exactly the dataset's count: nothing capped, nothing said
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
    # same values as scipy's cosine distance to each set's own mean, whatever the sets' scales
    # (vectors of norm below 1, as normalised embeddings can be, are normalised too)
    x = rng.normal(size=(3, 5, 16)) * np.array([1e-3, 1.0, 50.0])[:, None, None]
    expected = [[cosine(v, s.mean(0)) for v in s] for s in x]
    np.testing.assert_allclose(farthest_from_mean_scores(x), expected, rtol=1e-6)


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
def test_family_runs_on_digits_and_resumes():
    cfg = smoke_config(epochs=3, patience=5)
    began = time.perf_counter()
    reports = _collect(cfg)
    wall_ms = 1e3 * (time.perf_counter() - began)
    assert [m["epoch"] for m, _ in reports] == [1, 2, 3]
    assert all(ckpt is not None for _, ckpt in reports)
    final = reports[-1][0]
    for split in ("val", "test"):
        for method in ("attention", "flat_mlp", "farthest_from_mean", "random"):
            for metric in ("acc", "top5"):
                assert 0.0 <= final[f"{split}/{method}/{metric}"] <= 1.0
    assert all(parse_metric_key(k) for k in final if "/" in k and not k.startswith("perf/"))
    assert final["perf/features_ms"] > 0 and final["perf/epoch_ms"] > 0
    # per-epoch time is the mean over the epochs: 3 epochs and the features fit in the call
    assert final["perf/features_ms"] + 3 * final["perf/epoch_ms"] < wall_ms
    assert final["test/attention/acc"] > final["test/random/acc"] + 0.2
    # resuming from epoch 1's checkpoint reports epochs 2 and 3 only, with the same results
    resumed = _collect(cfg, restore=reports[0][1])
    assert [m["epoch"] for m, _ in resumed] == [2, 3]
    assert resumed[-1][0]["test/attention/acc"] == pytest.approx(final["test/attention/acc"])
    assert resumed[-1][0]["val/flat_mlp/loss"] == pytest.approx(final["val/flat_mlp/loss"], rel=1e-5)


def test_nan_loss_is_reported_as_diverged():
    reports = _collect(smoke_config(lr=1e30, n_train_sets=200))
    # the first step sends the weights to inf: the next batch's loss is NaN, in epoch 1
    assert [m for m, _ in reports] == [{"diverged": 1.0, "epoch": 1}]


@pytest.mark.parametrize("overrides", [{"n_classes": 2}, {"set_size": 2}, {"heads": 1}, {"model_dim": 30, "heads": 5},
                                       {"heads": 256}])
def test_check_accepts_the_smallest_valid_settings(overrides):
    check(smoke_config(**overrides))  # the edges of each rule pass


def test_train_statistics_are_the_train_mean_and_population_std_floored():
    """Against numpy in float64; a feature constant on train gets std 1e-6, not 0 (no division by zero)."""
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(3.0, 2.0, size=50), np.full(50, 7.0)]).astype(np.float32)
    mean, std = train_statistics(x)
    assert mean.dtype == std.dtype == torch.float32
    np.testing.assert_allclose(mean.numpy(), x.astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy()[0], x[:, 0].astype(np.float64).std(), rtol=1e-6)
    assert std[1].item() == pytest.approx(1e-6)


@pytest.mark.parametrize("overrides,message", [
    ({"heads": 3}, "the own-cnn feature width 256 (model_dim 0) must be divisible by heads 3"),
    ({"heads": 3, "encoder": "resnet50"}, "the resnet50 feature width 2048 (model_dim 0) must be divisible by heads 3"),
    ({"model_dim": 30, "heads": 4}, "model_dim 30 must be divisible by heads 4"),
    ({"n_classes": 1}, "n_classes 1 must be at least 2"),
    ({"set_size": 1}, "set_size 1 must be at least 2"),
])
def test_check_refuses_what_train_cannot_run(overrides, message):
    check(smoke_config())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(smoke_config(**overrides))
    with pytest.raises(ConfigError):
        train(smoke_config(**overrides), lambda *a, **k: None)


def test_feature_dims_match_the_encoders():
    """check() reads feature widths from FEATURE_DIMS: they are the widths the encoders give
    (torchvision's ResNets built without weights; own-cnn on digits)."""
    import torchvision

    from trainables.common.encoders import OwnCNN
    from trainables.common.features import FEATURE_DIMS

    assert OwnCNN(1, 8, 10).dim == FEATURE_DIMS["own-cnn"]
    for name in ("resnet18", "resnet50"):
        assert getattr(torchvision.models, name)().fc.in_features == FEATURE_DIMS[name]
