"""subtask_meta: subtask labels from images, heads, meta-learner, temperature scaling,
MC-dropout, and the family end to end on digits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.nn import functional as F

from one_thread import one_thread  # noqa: F401
from orchestrator.spaces import load_study
from trainables.common.checks import ConfigError
from trainables.common.data import Dataset, Split
from trainables.common.lifecycle import RELIABILITY_FILE
from trainables.common.metrics import ece_from_bins, parse_metric_key
from trainables.subtask_meta import (
    CIFAR10_CLASSES,
    INVALID_CONFIGS,
    bin_thresholds,
    build_subtasks,
    check,
    edge_density,
    fit_linear_head,
    grey_levels,
    mean_brightness,
    mc_dropout_predict,
    meta_learner,
    predict_logits,
    sobel_magnitude,
    superclass_map_for,
    three_bins,
    train,
)

SPACE = yaml.safe_load((Path(__file__).parents[1] / "search_spaces" / "subtask_meta.yaml").read_text())


def flat(value: int, n: int = 1, size: int = 32, channels: int = 3) -> np.ndarray:
    return np.full((n, size, size, channels), value, dtype=np.uint8)


def checkerboard(block: int, size: int = 32, channels: int = 3) -> np.ndarray:
    ij = np.add.outer(np.arange(size) // block, np.arange(size) // block) % 2
    return np.repeat((ij * 255).astype(np.uint8)[None, :, :, None], channels, axis=3)


# ---------------------------------------------------------------- brightness


def test_grey_levels_match_pil_luma():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L"), dtype=np.float32) for im in rgb])
    assert np.abs(grey_levels(rgb) - pil).max() <= 1.0  # PIL rounds to integers


def test_grey_levels_and_brightness_are_exact():
    """A grey pixel (v, v, v) is v, and an image's brightness is the exact mean luma rounded once
    (Python's fractions as the reference), so an image whose mean is a cut lands on the side the
    seed's ``<`` rule says; an alpha channel weighs nothing."""
    from fractions import Fraction

    levels = np.arange(256, dtype=np.uint8)
    greys = np.repeat(levels[:, None, None, None], 3, axis=3)
    assert grey_levels(greys)[:, 0, 0].tolist() == levels.tolist()
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 7, 9, 3), dtype=np.uint8)
    exact = [float(Fraction(int((im.astype(np.int64) @ [299, 587, 114]).sum()), 1000 * 7 * 9)) for im in rgb]
    assert mean_brightness(rgb).tolist() == exact
    rgba = np.concatenate([rgb, np.full((6, 7, 9, 1), 255, np.uint8)], axis=3)
    assert mean_brightness(rgba).tolist() == exact and np.array_equal(grey_levels(rgba), grey_levels(rgb))
    half = flat(84, size=2)
    half[:, :, 1] = 86  # mean grey exactly 85: the middle bin
    assert three_bins(mean_brightness(np.concatenate([half, flat(170, size=2)])), np.array([85.0, 170.0])).tolist() == [1, 2]


def test_brightness_bins_on_flat_images():
    images = np.concatenate([flat(10), flat(84), flat(85), flat(128), flat(169), flat(170), flat(240)])
    np.testing.assert_allclose(mean_brightness(images), [10, 84, 85, 128, 169, 170, 240], atol=1e-3)
    cuts = bin_thresholds(mean_brightness(images), "fixed", [85, 170], [])
    assert three_bins(mean_brightness(images), cuts).tolist() == [0, 0, 1, 1, 1, 2, 2]
    grey = flat(200, channels=1)  # single-channel images are taken as is
    assert mean_brightness(grey).tolist() == [200.0]


def test_percentile_thresholds_come_from_train_values():
    train = np.arange(90, dtype=np.float64)
    cuts = bin_thresholds(train, "percentile", [], [100 / 3, 200 / 3])
    np.testing.assert_allclose(cuts, np.percentile(train, [100 / 3, 200 / 3]))
    assert np.bincount(three_bins(train, cuts, upper_closed=True)).tolist() == [30, 30, 30]
    ties = np.array([0.0] * 6 + [1.0, 2.0, 3.0])
    cuts = bin_thresholds(ties, "percentile", [], [100 / 3, 200 / 3])
    assert three_bins(ties, cuts, upper_closed=True).tolist() == [0] * 6 + [2, 2, 2]  # cuts 0, 1/3
    with pytest.raises(ValueError):
        bin_thresholds(train, "adaptive", [1, 2], [])


# ---------------------------------------------------------------- complexity


def test_sobel_matches_scipy():
    grey = np.random.default_rng(1).random((3, 12, 10)).astype(np.float32) * 255
    expected = np.stack([np.hypot(ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=0, mode="nearest")) for g in grey])
    np.testing.assert_allclose(sobel_magnitude(grey), expected, rtol=1e-5, atol=1e-3)


def test_complexity_bins_checkerboard_vs_flat():
    one_edge = flat(0)
    one_edge[:, :, 16:] = 255  # one vertical step: the two columns beside it are edges
    images = np.concatenate([flat(0), flat(255), one_edge, checkerboard(4), checkerboard(2)])
    density = edge_density(images, edge_threshold=100.0, chunk=2)  # chunking must not matter
    np.testing.assert_allclose(density[:3], [0.0, 0.0, 2 / 32])
    assert density[3] > 0.4 and density[4] > 0.9
    # every image against scipy's Sobel on the BT.601 grey levels (every chunk written, none left
    # as np.empty found it), and "exceeds" is strict: a 0|75 step is magnitude 300 exactly
    step = flat(0)
    step[:, :, 16:] = 75
    for threshold, batch in ((100.0, images), (300.0, np.concatenate([step, step[..., :1].repeat(3, -1)]))):
        grey = batch.astype(np.float64) @ [0.299, 0.587, 0.114]
        reference = [(np.hypot(ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=0, mode="nearest"))
                      > threshold + 1e-3).mean() for g in grey]
        # numpy hands a freed small buffer to the next array of its size: after the same densities
        # were computed once (the test itself, unmutated, in mutmut's parent), an image never
        # written would read the right value by chance; NaN there instead
        np.full(len(batch), np.nan, np.float32)
        np.testing.assert_allclose(edge_density(batch, edge_threshold=threshold, chunk=2), reference, atol=1e-6)
    cuts = bin_thresholds(density, "fixed", [0.05, 0.15], [])
    assert three_bins(density, cuts).tolist() == [0, 0, 1, 2, 2]


def test_edge_density_is_the_exact_fraction_of_edge_pixels():
    """10 x 10 images: a density of 70/100 is the float a cut of 0.7 is (float32 would store it
    below the cut), so that image lands in the upper bin as the ``<`` rule says."""
    rng = np.random.default_rng(3)
    images = (rng.random((40, 10, 10, 1)) < 0.3).astype(np.uint8) * 200
    counts = [int((np.hypot(ndimage.sobel(g, axis=1, mode="nearest"), ndimage.sobel(g, axis=0, mode="nearest")) > 300).sum())
              for g in images[..., 0].astype(np.float64)]
    density = edge_density(images, edge_threshold=300.0)
    assert density.tolist() == [c / 100 for c in counts]
    assert density.dtype == np.float64
    at_cut = density[0]
    assert three_bins(density[:1], np.array([at_cut, 1.0])).tolist() == [1]


# ---------------------------------------------------------------- superclass and subtask building


def test_cifar10_superclass_mapping():
    mapping = superclass_map_for(list(CIFAR10_CLASSES), configured=[0] * 10)  # built-in wins
    vehicles = {"airplane", "automobile", "ship", "truck"}
    assert mapping == [0 if c in vehicles else 1 for c in CIFAR10_CLASSES]
    assert superclass_map_for([c.upper() for c in CIFAR10_CLASSES], None) == mapping
    digits = [str(i) for i in range(10)]
    assert superclass_map_for(digits, [1, 0, 0, 0, 0, 0, 1, 0, 1, 1]) == [1, 0, 0, 0, 0, 0, 1, 0, 1, 1]
    assert superclass_map_for(digits, [0, 1]) is None  # wrong length: skipped
    assert superclass_map_for(digits, None) is None


def _toy_dataset(classes: list[str]) -> Dataset:
    """Train: brightness spread 0..250; test: all very bright; class = image index mod C."""
    levels = np.arange(0, 255, 5)
    train = Split(np.concatenate([flat(v, size=8) for v in levels]), np.arange(len(levels)) % len(classes))
    test = Split(np.concatenate([flat(250, size=8) for _ in range(4)]), np.arange(4) % len(classes))
    return Dataset("toy", classes, train, test, test, (0.5,) * 3, (0.25,) * 3)


def test_build_subtasks_bins_on_train_and_skips_unmapped_superclass(capsys):
    ds = _toy_dataset(["a", "b", "c"])
    config = {"subtasks": ["superclass", "brightness", "complexity"], "thresholds": "percentile",
              "bin_percentiles": [100 / 3, 200 / 3], "superclass_map": [0, 1], "edge_threshold": 100.0}
    subtasks = {st.name: st for st in build_subtasks(ds, config)}
    assert set(subtasks) == {"brightness", "complexity"}
    assert "superclass subtask skipped" in capsys.readouterr().err
    bright = subtasks["brightness"]
    assert np.bincount(bright.labels["train"]).tolist() == [17, 17, 17]  # tertiles of TRAIN
    assert bright.labels["test"].tolist() == [2, 2, 2, 2]  # not re-binned on test
    assert subtasks["complexity"].labels["train"].max() == 0  # flat images: no edges
    config["superclass_map"] = [0, 1, 1]
    superclass = build_subtasks(ds, {**config, "subtasks": ["superclass"]})[0]
    assert superclass.num_classes == 2
    np.testing.assert_array_equal(superclass.labels["train"], np.array([0, 1, 1])[ds.train.labels])


def test_each_binning_knob_reaches_the_subtasks_it_names():
    """subtasks (which and in what order), bin_percentiles, thresholds and the fixed cuts each
    change the labels as declared: cuts are numpy's percentiles of the TRAIN values at the
    configured percentiles (not the default tertiles), fixed cuts are the configured ones."""
    ds = _toy_dataset(["a", "b", "c"])
    train_bright = mean_brightness(ds.train.images)
    config = {"subtasks": ["brightness"], "thresholds": "percentile", "bin_percentiles": [10.0, 90.0]}
    (bright,) = build_subtasks(ds, config)
    assert bright.name == "brightness" and bright.num_classes == 3
    cuts = np.percentile(train_bright.astype(np.float64), [10.0, 90.0])
    for split in ("train", "val", "test"):
        expected = np.digitize(mean_brightness(getattr(ds, split).images), cuts, right=True)
        np.testing.assert_array_equal(bright.labels[split], expected)
    assert np.bincount(bright.labels["train"], minlength=3).tolist() != [17, 17, 17]  # not tertiles
    assert [s.name for s in build_subtasks(ds, {**config, "subtasks": ["complexity", "brightness"]})] == \
        ["complexity", "brightness"]
    fixed = build_subtasks(ds, {**config, "thresholds": "fixed", "brightness_thresholds": [50.0, 60.0]})[0]
    np.testing.assert_array_equal(fixed.labels["train"], np.digitize(train_bright, [50.0, 60.0]))
    one_edge = flat(0)
    one_edge[:, :, 16:] = 255  # an edge density of 2/32: bin 1 under the default cuts 0.05, 0.15
    edged = Dataset("edges", ["a"], *[Split(np.concatenate([flat(0), one_edge]), np.zeros(2, int))] * 3, (0.5,) * 3, (0.25,) * 3)
    complexity = {"subtasks": ["complexity"], "thresholds": "fixed", "edge_threshold": 100.0}
    for cuts, labels in (([0.05, 0.15], [0, 1]), ([0.1, 0.3], [0, 0]), ([0.001, 0.01], [0, 2])):
        (labelled,) = build_subtasks(edged, {**complexity, "complexity_thresholds": cuts})
        assert labelled.labels["test"].tolist() == labels, cuts
    for bad in ([60.0, 50.0], [50.0], [1.0, 2.0, 3.0]):  # cuts must be two, increasing
        with pytest.raises(ValueError, match="two increasing cut points"):
            build_subtasks(ds, {**config, "thresholds": "fixed", "brightness_thresholds": bad})
    with pytest.raises(ValueError, match="'fixed' or 'percentile'"):
        build_subtasks(ds, {**config, "thresholds": "adaptive"})


# ---------------------------------------------------------------- heads and meta-learner


def test_linear_head_matches_sklearn_logistic_regression():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=300) > 0).astype(np.int64) + (x[:, 2] > 1)
    wd = 1e-2
    torch.manual_seed(0)
    head = fit_linear_head(torch.from_numpy(x), torch.from_numpy(y), 3, weight_decay=wd, max_iter=500)
    ours = F.softmax(head(torch.from_numpy(x)), 1).detach().numpy()
    sk = LogisticRegression(C=1 / (wd * len(x)), max_iter=5000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(ours, sk.predict_proba(x), atol=2e-3)


def test_linear_head_is_fit_to_its_optimum_on_correlated_features(capsys):
    """With the defaults the trial uses, on digits' 64 correlated pixels (brightness tertiles, as
    the subtask does): the head is scikit-learn's to 2e-4 (measured 7e-5; 100 float32 L-BFGS
    iterations stopped 5.7e-4 away). A head stopped by its iteration budget says so; a looser
    tolerance stops it sooner."""
    from sklearn.datasets import load_digits

    pixels = load_digits().data
    x = ((pixels - pixels.mean(0)) / (pixels.std(0) + 1e-6)).astype(np.float32)
    y = np.digitize(pixels.mean(1), np.percentile(pixels.mean(1), [100 / 3, 200 / 3]))
    sk = LogisticRegression(C=1 / (1e-3 * len(x)), max_iter=20000, tol=1e-12).fit(x.astype(np.float64), y)
    torch.manual_seed(0)
    head = fit_linear_head(torch.from_numpy(x), torch.from_numpy(y), 3)
    assert head.weight.dtype == torch.float32 and not head.training
    ours = F.softmax(head(torch.from_numpy(x)), 1).detach().numpy()
    np.testing.assert_allclose(ours, sk.predict_proba(x.astype(np.float64)), atol=2e-4)
    assert "warning" not in capsys.readouterr().err
    fit_linear_head(torch.from_numpy(x), torch.from_numpy(y), 3, max_iter=5)
    assert re.search(r"a linear head's L-BFGS fit stopped at gradient \S+ > 1e-06 \(at most 5 iterations\)", capsys.readouterr().err)
    loose = fit_linear_head(torch.from_numpy(x), torch.from_numpy(y), 3, tolerance=1e-3)  # the tolerance stops it: 0.10 away
    assert np.abs(F.softmax(loose(torch.from_numpy(x)), 1).detach().numpy() - sk.predict_proba(x.astype(np.float64))).max() > 0.01


def test_meta_learner_architecture():
    model = meta_learner(70, 10)
    layers = list(model)
    assert len(layers) == 4 * 4 + 1
    for i in range(4):
        lin, bn, act, drop = layers[4 * i : 4 * i + 4]
        assert isinstance(lin, nn.Linear) and lin.in_features == (70 if i == 0 else 384) and lin.out_features == 384
        assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 384
        assert isinstance(act, nn.ReLU)
        assert isinstance(drop, nn.Dropout) and drop.p == 0.3
    assert isinstance(layers[-1], nn.Linear) and (layers[-1].in_features, layers[-1].out_features) == (384, 10)
    (alone,) = meta_learner(70, 10, layers=0)  # no hidden block: logistic regression on the inputs
    assert isinstance(alone, nn.Linear) and (alone.in_features, alone.out_features) == (70, 10)


def _trained_toy_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(64, 12)
    model = meta_learner(12, 4)
    model.train()
    model(x)  # one training-mode pass so BatchNorm running statistics move off their init
    return model, x


def test_mc_dropout_varies_while_eval_mode_does_not():
    model, x = _trained_toy_model()
    running_mean = model[1].running_mean.clone()
    a, b = predict_logits(model, x), predict_logits(model, x)
    assert torch.equal(a, b)  # deterministic path
    samples = mc_dropout_predict(model, x, [1, 2, 5], seed=0)
    assert not np.allclose(samples[1][0], F.softmax(a, 1).numpy(), atol=1e-4)  # dropout was active
    assert not np.allclose(samples[1][0], samples[2][0], atol=1e-4)  # passes differ
    assert np.all(samples[1][1] == 0) and samples[5][1].mean() > 1e-3  # std over 1 pass is 0
    np.testing.assert_allclose(samples[5][0].sum(1), 1.0, rtol=1e-6)
    assert torch.equal(model[1].running_mean, running_mean)  # BatchNorm stayed in eval mode
    assert not model.training and torch.equal(predict_logits(model, x), a)  # MC left no trace
    again = mc_dropout_predict(model, x, [5], seed=0)
    np.testing.assert_array_equal(again[5][0], samples[5][0])  # seeded, and nested prefixes


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("overrides", INVALID_CONFIGS)
def test_check_refuses_what_train_cannot_run(overrides):
    """Each refusal is one message naming every field of the bad combination."""
    check(smoke_config())  # the shipped defaults pass
    with pytest.raises(ConfigError) as refused:
        check(smoke_config(**overrides))
    assert all(key in str(refused.value) for key in overrides), refused.value
    with pytest.raises(ConfigError):  # train refuses it too, before loading anything
        train(smoke_config(**overrides), lambda *a, **k: None)


@pytest.mark.parametrize("edge", [{"batch_size": 2}, {"bin_percentiles": [0, 100]}, {"bin_percentiles": [0.0, 0.5]},
                                  {"bin_percentiles": [99.5, 100.0]}, {"brightness_thresholds": [0.0, 0.5]}])
def test_check_accepts_the_edges_of_what_train_can_run(edge):
    """The limits themselves pass: batches of 2 (BatchNorm's least), percentiles 0 and 100."""
    check(smoke_config(**edge))


def test_every_shipped_study_passes_check():
    for cfg in [c for study in SPACE["studies"] for c in load_study("subtask_meta", study).trial_configs()]:
        check({**cfg, "eval": {"mc_samples": [1, 5, 10, 25, 50]}})


# ---------------------------------------------------------------- the family end to end on digits


def smoke_config(**overrides) -> dict:
    """The YAML's defaults + smoke study, as the orchestrator would hand them over."""
    smoke = SPACE["studies"]["smoke"]
    return {**SPACE["defaults"], **smoke["set"], "seed": 0, "device": "cpu", "eval": dict(smoke["eval"]), **overrides}


class Collector:
    def __init__(self):
        self.metrics, self.checkpoints = [], []

    def __call__(self, metrics, checkpoint=None):
        self.metrics.append(dict(metrics))
        self.checkpoints.append(checkpoint)


@pytest.mark.slow
def test_family_end_to_end_on_digits(tmp_path):
    run = Collector()
    train(smoke_config(epochs=3, patience=10, artifact_dir=str(tmp_path)), run)
    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    assert all(c is not None and c["epoch"] == m["epoch"] for m, c in zip(run.metrics, run.checkpoints))
    assert all("train/meta/loss" in m and "val/meta/acc" in m for m in run.metrics)
    final = run.metrics[-1]
    for split in ("val", "test"):
        for method in ("meta", "meta_ts", "meta_mc", "meta_mc:mc_samples:1", "meta_mc:mc_samples:5"):
            for metric in ("acc", "ece", "nll", "brier", "top5", "balanced_acc", "macro_f1"):
                assert np.isfinite(final[f"{split}/{method}/{metric}"]), (split, method, metric)
        for name in ("superclass", "brightness", "complexity"):
            assert 0 <= final[f"{split}/subtask_{name}/acc"] <= 1
    assert final["test/meta/acc"] > 0.85
    assert final["test/subtask_superclass/acc"] > 0.85  # loops vs open strokes is easy on digits
    assert final["test/subtask_brightness/acc"] > 0.45 and final["test/subtask_complexity/acc"] > 0.45  # chance 1/3
    assert final["val/meta_ts/nll"] <= final["val/meta/nll"] + 1e-9
    assert final["test/meta_mc:mc_samples:1/pred_std"] == 0 < final["test/meta_mc:mc_samples:5/pred_std"]
    assert final["test/meta_mc/acc"] == final["test/meta_mc:mc_samples:5/acc"]  # plain name: 25 absent -> largest
    # every phase under its own name in the report's timings table, and no other
    phases = ("features", "subtask_labels", "subtask_heads", "train", "ts_fit", "mc_dropout", "total")
    assert {k for k in final if k.startswith("perf/")} == {f"perf/{k}_ms" for k in phases}
    assert all(final[f"perf/{k}_ms"] > 0 for k in phases)
    outside = [k for k in final if parse_metric_key(k) is None and not k.startswith(("perf/", "info/")) and k != "epoch"]
    assert not outside, outside  # every name follows the metric contract
    bins = json.loads((tmp_path / RELIABILITY_FILE).read_text())["splits"]["test"]
    ece_keys = {k.split("/")[1] for k in final if k.startswith("test/") and k.endswith("/ece")}
    assert set(bins) == ece_keys  # every method that reports a test ECE, axes included
    for method, entry in bins.items():
        assert ece_from_bins(entry) == pytest.approx(final[f"test/{method}/ece"], abs=1e-12), method

    # resume from the epoch-1 checkpoint: epochs 2.. only, and the same final model
    resumed = Collector()
    train(smoke_config(epochs=3, patience=10), resumed, restore=run.checkpoints[0])
    assert [m["epoch"] for m in resumed.metrics] == [2, 3]
    for key in ("test/meta/acc", "test/meta/nll", "test/meta_ts/nll", "test/meta_mc:mc_samples:5/nll"):
        assert resumed.metrics[-1][key] == pytest.approx(final[key], rel=1e-6), key
    done = Collector()
    train(smoke_config(epochs=3, patience=10), done, restore=run.checkpoints[-1])
    assert done.metrics == []  # the final report went out already


@pytest.mark.slow
def test_family_without_subtasks_and_divergence():
    run = Collector()
    train(smoke_config(use_subtasks=False, epochs=1), run)
    final = run.metrics[-1]
    assert not any("subtask" in k for k in final) and final["test/meta/acc"] > 0.5
    assert "perf/subtask_heads_ms" not in final
    diverged = Collector()
    train(smoke_config(lr=1e30), diverged)
    assert diverged.metrics == [{"diverged": 1.0, "epoch": 1}]
