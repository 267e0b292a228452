"""clip_fusion: the pure pieces on synthetic arrays (checked against independent computations),
then the family end to end on digits with a list collector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import softmax
from torch.nn import functional as F

from clip_hub import clip_hub, offline_hub  # noqa: F401
from trainables import clip_fusion as cf
from trainables.common.data import load_dataset
from trainables.common.calibration import fit_temperature, temperature_nll
from trainables.common.checks import ConfigError
from trainables.common.metrics import metric_key, negative_log_likelihood

ROOT = Path(__file__).resolve().parents[1]


def _blobs(rng, n_per_class=60, num_classes=5, dim=16, spread=0.6):
    centers = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), n_per_class)
    return centers[labels] + spread * rng.normal(size=(len(labels), dim)), labels


# ---------------------------------------------------------------- fusion


def test_fusion_endpoints_are_the_single_sources_and_sum_to_one():
    rng = np.random.default_rng(0)
    p_a = softmax(rng.normal(size=(50, 7)) * 3, axis=1)
    p_b = softmax(rng.normal(size=(50, 7)), axis=1)
    np.testing.assert_array_equal(cf.fuse(p_a, p_b, 1.0), p_a)
    np.testing.assert_array_equal(cf.fuse(p_a, p_b, 0.0), p_b)
    for alpha in np.linspace(0, 1, 11):
        np.testing.assert_allclose(cf.fuse(p_a, p_b, alpha).sum(1), 1.0, atol=1e-12)


def test_select_alpha_direction_and_ties():
    val = {0.0: {"acc": 0.9, "nll": 0.5}, 0.5: {"acc": 0.95, "nll": 0.4}, 1.0: {"acc": 0.95, "nll": 0.3}}
    assert cf.select_alpha(val, "acc") == 1.0  # tie on acc -> lower NLL
    assert cf.select_alpha(val, "nll") == 1.0
    val[1.0]["nll"] = 0.45
    assert cf.select_alpha(val, "acc") == 0.5
    assert cf.select_alpha(val, "nll") == 0.5


# ---------------------------------------------------------------- temperature scaling


def _temperature_cases():
    rng = np.random.default_rng(1)
    for scale, case in [(1.0, "calibrated"), (4.0, "overconfident"), (0.25, "underconfident"), (1.0, "random labels")]:
        logits = rng.normal(size=(300, 10)) * 2
        labels = np.array([rng.choice(10, p=p) for p in softmax(logits, axis=1)])
        if case == "random labels":
            labels = rng.integers(0, 10, size=300)
        yield case, logits * scale, labels
    # tiny val sets, where the fit is noisy
    for _ in range(4):
        logits = rng.normal(size=(8, 3)) * rng.uniform(0.1, 10)
        yield "tiny", logits, rng.integers(0, 3, size=8)


@pytest.mark.parametrize("case,logits,labels", list(_temperature_cases()))
def test_temperature_scaling_never_raises_val_nll(case, logits, labels):
    t = fit_temperature(logits, labels)
    nll_t = negative_log_likelihood(softmax(logits / t, axis=1), labels)
    assert nll_t <= negative_log_likelihood(softmax(logits, axis=1), labels)
    # an independent optimiser: a dense grid of T in the same bounds
    grid = np.exp(np.linspace(np.log(1e-2), np.log(1e2), 4001))
    assert nll_t <= min(temperature_nll(logits, labels, g) for g in grid) + 1e-6


def test_temperature_is_one_when_val_is_perfectly_classified():
    logits = np.random.default_rng(6).normal(size=(50, 4))
    assert fit_temperature(logits, logits.argmax(1)) == 1.0
    labels = logits.argmax(1)
    labels[0] = (labels[0] + 1) % 4  # one mistake: a finite optimum below 1 exists again
    assert fit_temperature(logits, labels) < 1.0


def test_temperature_recovers_known_overconfidence():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4000, 10)) * 2
    labels = np.array([rng.choice(10, p=p) for p in softmax(logits, axis=1)])
    assert fit_temperature(logits * 3, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    # the search range misses the optimum (T ~ 3): its best point loses to T = 1, which is kept
    assert fit_temperature(logits * 3, labels, bounds=(50.0, 100.0)) == 1.0


# ---------------------------------------------------------------- prototypes


def test_prototypes_match_torch_cosine_classifier():
    rng = np.random.default_rng(3)
    x, y = _blobs(rng)
    protos = cf.class_prototypes(x, y, 6)  # class 5 has no images: a zero row
    assert np.allclose(protos[5], 0) and np.allclose(np.linalg.norm(protos[:5], axis=1), 1)
    xt = torch.nn.functional.normalize(torch.as_tensor(x), dim=1)
    means = torch.stack([xt[torch.as_tensor(y) == c].mean(0) for c in range(5)])
    ref = torch.nn.functional.cosine_similarity(xt[:, None], means[None], dim=-1).numpy()
    np.testing.assert_allclose(cf.prototype_logits(x, protos, 0.1)[:, :5], ref / 0.1, atol=1e-9)


def test_few_shot_sampling_takes_shots_per_class_and_differs_across_seeds():
    labels = np.repeat(np.arange(4), [30, 30, 30, 3])
    picks = []
    for seed in range(3):
        idx = cf.sample_shots(labels, 5, np.random.default_rng([seed, 0]))
        np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 5, 5, 3])  # class 3 has only 3
        assert len(np.unique(idx)) == len(idx)
        picks.append(idx)
    assert not np.array_equal(picks[0], picks[1]) and not np.array_equal(picks[1], picks[2])
    assert not np.array_equal(picks[0][:5], np.arange(5))  # not the first N
    np.testing.assert_array_equal(cf.sample_shots(labels, 0, np.random.default_rng(0)), np.arange(len(labels)))


# ---------------------------------------------------------------- stacker


def test_stacker_beats_chance_on_separable_sources():
    rng = np.random.default_rng(4)
    num_classes = 5
    labels = rng.integers(0, num_classes, size=600)
    # two noisy sources, each informative on its own
    sources = [softmax(2.0 * np.eye(num_classes)[labels] + rng.normal(size=(600, num_classes)), axis=1) for _ in range(2)]
    fit, hold = cf.stratified_holdout(labels, 0.5, seed=0)
    assert abs(np.bincount(labels[hold]) / len(hold) - np.bincount(labels) / len(labels)).max() < 0.01
    assert len(np.intersect1d(fit, hold)) == 0 and len(fit) + len(hold) == len(labels)
    train, test = hold[: len(hold) // 2], np.concatenate([fit, hold[len(hold) // 2:]])
    model = cf.fit_stacker([s[train] for s in sources], labels[train], C=1.0, seed=0)
    probs = cf.stacker_probs(model, [s[test] for s in sources], num_classes)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    acc = np.mean(probs.argmax(1) == labels[test])
    single = max(np.mean(s[test].argmax(1) == labels[test]) for s in sources)
    assert acc > 0.8 > 1 / num_classes and acc >= single - 0.02


def test_stacker_probs_keep_class_columns_when_a_class_is_missing():
    rng = np.random.default_rng(5)
    labels = rng.choice([0, 2, 3], size=90)
    inputs = [np.eye(4)[labels] + 0.1 * rng.random((90, 4))]
    probs = cf.stacker_probs(cf.fit_stacker(inputs, labels, 1.0, 0), inputs, 4)
    assert probs.shape == (90, 4) and np.all(probs[:, 1] == 0)
    assert np.mean(probs.argmax(1) == labels) == 1.0


def test_text_classifier_is_the_normalised_prompt_mean():
    templates = cf.load_prompts()
    assert len(templates) >= 10 and all(t.count("{}") == 1 for t in templates)

    def encode_text(prompts):  # a fixed deterministic text embedding: letter counts
        z = np.array([[p.count(ch) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"] for p in prompts], float)
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    w = cf.text_classifier(encode_text, ["cat", "dog"], templates[:3])
    ref = encode_text([t.format("dog") for t in templates[:3]]).mean(0)
    np.testing.assert_allclose(w[1], ref / np.linalg.norm(ref))
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0)


# ---------------------------------------------------------------- the family on digits

METHODS = ("prototype", "supervised", "fusion", "stacker")
METRICS = ("acc", "top5", "balanced_acc", "macro_f1", "ece", "nll")
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]


def _config(**overrides):
    """The YAML defaults on a 400-image train split: own-cnn trains in seconds in the test cache."""
    doc = yaml.safe_load((ROOT / "search_spaces" / "clip_fusion.yaml").read_text())
    return {**doc["defaults"], "max_train": 400, "epochs": 4, "seed": 0, "eval": {"alpha": ALPHAS}, "device": "cpu", **overrides}


def _run(config, restore=None):
    reports = []
    # single-threaded as under Ray (OMP_NUM_THREADS=1 per 1-CPU trial): on a shared 2-core machine
    # training own-cnn into the empty test cache took 14 s with 1 thread and 109 s with 2
    with cf.single_thread_on_cpu(torch.device("cpu")):
        cf.train(config, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)), restore=restore)
    return reports


def _without_perf(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module")
def digits_run():
    return _run(_config())


@pytest.mark.slow
def test_family_end_to_end_on_digits(digits_run):
    assert [m["epoch"] for m, _ in digits_run] == [1, 2, 3, 4]
    for metrics, checkpoint in digits_run:
        assert np.isfinite(metrics["train/supervised/loss"]) and 0 <= metrics["val/supervised/acc"] <= 1
        assert checkpoint["epoch"] == metrics["epoch"] and set(cf.checkpoint_heads(checkpoint)) == {"supervised", "stacker_supervised"}
    last = digits_run[-1][0]
    for split in ("val", "test"):
        for method in METHODS:
            for name in METRICS:
                assert np.isfinite(last[metric_key(split, method, name)]), (split, method, name)
        for alpha in ALPHAS:
            assert metric_key(split, "fusion", "acc", alpha=alpha) in last
    for method in METHODS:
        assert last[f"test/{method}/acc"] > 0.9
    assert last["info/zeroshot_available"] == 0.0 and "test/zeroshot/acc" not in last
    for phase in ("features", "supervised_train", "eval", "stacker"):
        assert last[f"perf/{phase}_ms"] > 0, phase
    # the alpha endpoints are the single sources; the plain fusion name is the val-chosen alpha
    for name in METRICS:
        assert last[metric_key("test", "fusion", name, alpha=1.0)] == pytest.approx(last[f"test/prototype/{name}"], abs=1e-12)
        assert last[metric_key("test", "fusion", name, alpha=0.0)] == pytest.approx(last[f"test/supervised/{name}"], abs=1e-12)
        chosen = metric_key("test", "fusion", name, alpha=last["info/fusion_alpha"])
        assert last[f"test/fusion/{name}"] == last[chosen]
    best_val = max(last[metric_key("val", "fusion", "acc", alpha=a)] for a in ALPHAS)
    assert last[metric_key("val", "fusion", "acc", alpha=last["info/fusion_alpha"])] == best_val


@pytest.mark.slow
def test_resume_continues_without_rereporting(digits_run):
    resumed = _run(_config(), restore=digits_run[1][1])
    assert [m["epoch"] for m, _ in resumed] == [3, 4]
    for (a, _), (b, _) in zip(resumed, digits_run[2:]):
        assert _without_perf(a) == pytest.approx(_without_perf(b), abs=1e-9)


@pytest.mark.slow
def test_calibration_switch_lowers_val_nll(digits_run):
    uncalibrated = _run(_config(calibrate=False, stacker=False))[-1][0]
    calibrated = digits_run[-1][0]
    assert uncalibrated["info/prototype_temperature"] == uncalibrated["info/supervised_temperature"] == 1.0
    for source in ("prototype", "supervised"):
        assert calibrated[f"val/{source}/nll"] <= uncalibrated[f"val/{source}/nll"]
        assert calibrated[f"test/{source}/acc"] == uncalibrated[f"test/{source}/acc"]  # T keeps the argmax
    assert calibrated["info/prototype_temperature"] != 1.0


@pytest.mark.slow
def test_supervised_head_from_checkpoint_path(digits_run, tmp_path):
    path = tmp_path / "head.pt"
    torch.save(digits_run[-1][1], path)
    reports = _run(_config(supervised_checkpoint=str(path), stacker=False))
    assert [m["epoch"] for m, _ in reports] == [1]  # nothing to train: one report with the results
    for name in METRICS:
        assert reports[-1][0][f"test/supervised/{name}"] == pytest.approx(digits_run[-1][0][f"test/supervised/{name}"])
    with pytest.raises(ValueError, match="supervised_checkpoint"):
        torch.save({"linear.weight": torch.zeros(3, 5)}, path)
        _run(_config(supervised_checkpoint=str(path)))


@pytest.mark.slow
def test_divergence_is_reported():
    reports = _run(_config(lr=1e30, stacker=False))
    assert reports == [({"diverged": 1.0, "epoch": 1}, None)]  # lr 1e30: the first epoch's loss is not finite


@pytest.mark.slow
def test_shots_change_only_the_prototypes():
    few = [_run(_config(shots=1, seed=s, epochs=1, stacker=False))[-1][0] for s in (0, 1)]
    assert few[0]["test/prototype/nll"] != few[1]["test/prototype/nll"]
    full = _run(_config(shots=0, epochs=1, stacker=False))[-1][0]
    assert few[0]["test/supervised/nll"] == full["test/supervised/nll"]
    assert few[0]["test/prototype/acc"] < full["test/prototype/acc"]


# ---------------------------------------------------------------- check and reliability


@pytest.mark.parametrize("overrides,message", [
    ({"fusion_a": "prototype", "fusion_b": "prototype"}, "fusion_a 'prototype' and fusion_b 'prototype' are both the prototype source"),
    ({"fusion_a": "auto", "fusion_b": "prototype"}, "fusion_a 'auto' and fusion_b 'prototype' are both the prototype source"),
    ({"fusion_b": "zeroshot"}, "fusion_b zeroshot needs encoder clip-vit-b32"),
    ({"supervised_checkpoint": "/nonexistent/head.pt"}, "supervised_checkpoint '/nonexistent/head.pt' cannot be read"),
    ({"stacker_holdout": 0.001}, "stacker_holdout 0.001 of the 399 training images of digits"),
    ({"max_train": 15}, "needs 2 training images per class"),
    ({"dataset": "nosuch"}, "unknown dataset 'nosuch': use one of digits"),
])
def test_check_refuses_what_train_cannot_run(overrides, message):
    from trainables.common.checks import ConfigError

    cf.check(_config())
    with pytest.raises(ConfigError, match=message):
        cf.check(_config(**overrides))


def test_check_reads_a_head_checkpoint_of_the_wrong_shape(tmp_path):
    from trainables.common.checks import ConfigError

    path = tmp_path / "head.pt"
    torch.save({"linear.weight": torch.zeros(3, 5)}, path)
    with pytest.raises(ConfigError, match=r"expected a linear head for 10 classes x 256 features, found a head of shape \(3, 5\)"):
        cf.check(_config(supervised_checkpoint=str(path)))


@pytest.mark.slow
def test_reliability_bins_reproduce_every_logged_test_ece(tmp_path):
    import json

    from trainables.common.lifecycle import RELIABILITY_FILE
    from trainables.common.metrics import ece_from_bins

    last = _run(_config(epochs=1, artifact_dir=str(tmp_path)))[-1][0]
    bins = json.loads((tmp_path / RELIABILITY_FILE).read_text())["splits"]["test"]
    logged = {k.split("/")[1] for k in last if k.startswith("test/") and k.endswith("/ece")}
    assert set(bins) == logged and {"prototype", "supervised", "fusion", "stacker", "fusion:alpha:0.5"} <= logged
    for method, entry in bins.items():
        assert ece_from_bins(entry) == pytest.approx(last[f"test/{method}/ece"], abs=1e-12), method
        assert sum(entry["count"]) == len(load_dataset("digits").test)


# ---------------------------------------------------------------- bench/mutation.py's survivors (2026-12-02)


@pytest.mark.parametrize("metric,lower", [("nll", True), ("ece", True), ("brier", True), ("acc", False),
                                          ("top5", False), ("balanced_acc", False), ("macro_f1", False)])
def test_select_alpha_minimises_the_losses_and_maximises_the_scores(metric, lower):
    """The YAML's alpha_metric choices: nll, ece, brier are losses; every other metric a score."""
    val = {a: {"nll": 0.5, metric: v} for a, v in ((0.0, 0.2), (0.5, 0.3), (1.0, 0.1))}  # nll ties unless it is the metric
    assert cf.select_alpha(val, metric) == (1.0 if lower else 0.5)


def test_select_alpha_full_tie_goes_to_the_smallest_alpha_whatever_the_order():
    tie = {"acc": 0.9, "nll": 0.4}
    for order in ([0.7, 0.2, 0.5], [0.2, 0.5, 0.7], [0.5, 0.7, 0.2]):
        assert cf.select_alpha({a: dict(tie) for a in order}, "acc") == 0.2


def test_linear_head_standardises_with_train_mean_and_unbiased_std_floored():
    """Against numpy: mean, std with ddof 1 (a constant feature gets the 1e-6 floor, not a
    division by zero), then the linear layer on the standardised features."""
    rng = np.random.default_rng(7)
    x = rng.normal(3.0, 2.0, size=(40, 6)).astype(np.float32)
    x[:, 2] = 5.0  # constant: std 0
    head = cf.LinearHead(6, 3)
    head.set_statistics(torch.as_tensor(x))
    std = np.maximum(x.astype(np.float64).std(0, ddof=1), 1e-6)
    np.testing.assert_allclose(head.mean.numpy(), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(head.std.numpy(), std, rtol=1e-5)
    assert head.std[2].item() == pytest.approx(1e-6, rel=1e-6)
    w, b = head.linear.weight.detach().double().numpy(), head.linear.bias.detach().double().numpy()
    x_new = rng.normal(3.0, 2.0, size=(5, 6))
    ref = (x_new - x.mean(0)) / std @ w.T + b
    got = cf.head_logits(head, x_new.astype(np.float32))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_single_thread_on_cpu_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with cf.single_thread_on_cpu(torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), cf.single_thread_on_cpu(torch.device("cpu")):
            raise KeyError("a failing trial")
        assert torch.get_num_threads() == 2
        with cf.single_thread_on_cpu(torch.device("cuda")):  # the device object needs no GPU
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_checkpoint_heads_reads_tracked_heads_and_the_older_heads_entry():
    a, b = {"linear.weight": torch.zeros(2, 3)}, {"linear.weight": torch.ones(2, 3)}
    tracked = {"tracked": {"head:supervised": a, "head:stacker_supervised": b, "optimizer:supervised": {},
                           "generator": torch.zeros(3), "heads_note": {}}}
    assert cf.checkpoint_heads(tracked) == {"supervised": a, "stacker_supervised": b}
    assert cf.checkpoint_heads({"heads": {"supervised": a}, "tracked": {"head:other": b}}) == {"supervised": a}


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_load_supervised_head_reads_a_bare_state_dict_and_refuses_what_is_not_one(tmp_path):
    from fractions import Fraction

    head = cf.LinearHead(4, 3)
    head.set_statistics(torch.randn(10, 4))
    loaded = cf.load_supervised_head(_save(tmp_path / "bare.pt", head.state_dict()), 4, 3, torch.device("cpu"))
    for name, value in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(cf.head_logits(loaded, x), cf.head_logits(head, x))
    older = cf.load_supervised_head(_save(tmp_path / "older.pt", {"heads": {"supervised": head.state_dict()}}), 4, 3, torch.device("cpu"))
    np.testing.assert_array_equal(cf.head_logits(older, x), cf.head_logits(head, x))  # checkpoints from before Trial
    # a family checkpoint whose heads hold no supervised one (the stacker's only)
    only_stacker = _save(tmp_path / "stacker.pt", {"tracked": {"head:stacker_supervised": head.state_dict()}})
    with pytest.raises(ValueError, match=r"expected a linear head for 3 classes x 4 features, found no linear head"):
        cf.load_supervised_head(only_stacker, 4, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="found no linear head"):
        cf.load_supervised_head(_save(tmp_path / "empty.pt", {}), 4, 3, torch.device("cpu"))
    # weights_only: a pickled object that is not a tensor, container or allow-listed numpy type is refused
    unsafe = _save(tmp_path / "unsafe.pt", {**head.state_dict(), "note": Fraction(1, 3)})
    with pytest.raises(ValueError, match="cannot be read"):
        cf.load_supervised_head(unsafe, 4, 3, torch.device("cpu"))


def test_load_prompts_refuses_an_empty_pool_and_templates_without_exactly_one_slot(tmp_path):
    def pool(templates):
        path = tmp_path / "pool.json"
        path.write_text(json.dumps({"templates": templates}))
        return path

    assert cf.load_prompts(pool(["a {}.", "the {} here"])) == ["a {}.", "the {} here"]
    assert cf.load_prompts("") == cf.load_prompts(cf.PROMPTS_PATH)
    for bad in ([], ["a photo."], ["a {} and a {}."], ["ok {}", "no slot"]):
        with pytest.raises(ValueError, match="exactly one"):
            cf.load_prompts(pool(bad))


class _FakeClip:
    """A stand-in for the CLIP encoder that records how it is asked for: text embeddings from
    letter counts (the real tower is checked in ``test_zeroshot_classifier_through_open_clip``)."""

    def __init__(self):
        self.calls = []

    def encode_text(self, prompts):
        return np.array([[p.count(ch) + 0.5 for ch in "abcdefghijklmnopqrstuvwxyz"] for p in prompts], float)

    def get_encoder(self, name, dataset, device, cache_dir=None, progress=True):
        self.calls.append((name, dataset, device, cache_dir, progress))
        return self


def test_zeroshot_classifier_uses_the_clip_text_tower_and_the_configured_prompts(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from trainables.common import encoders

    fake = _FakeClip()
    monkeypatch.setattr(encoders, "get_encoder", fake.get_encoder)
    ds = SimpleNamespace(classes=["cat", "dog", "emu"])
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"templates": ["a {}.", "my {} again"]}))
    cfg = {"encoder": "clip-vit-b32", "cache_dir": str(tmp_path), "prompts": str(pool)}
    device = torch.device("cpu")
    w = cf.zeroshot_classifier(ds, cfg, device)
    assert len(fake.calls) == 1 and fake.calls[0][0] == "clip-vit-b32" and fake.calls[0][1] is ds
    assert fake.calls[0][2] is device and fake.calls[0][3] == str(tmp_path) and fake.calls[0][4] is False
    for c, name in enumerate(ds.classes):
        z = fake.encode_text([f"a {name}.", f"my {name} again"])
        ref = (z / np.linalg.norm(z, axis=1, keepdims=True)).mean(0)
        np.testing.assert_allclose(w[c], ref / np.linalg.norm(ref))
    assert cf.zeroshot_classifier(ds, {**cfg, "cache_dir": ""}, torch.device("cpu")) is not None
    assert fake.calls[-1][3] is None  # "" = the default cache
    assert cf.zeroshot_classifier(ds, {**cfg, "encoder": "own-cnn"}, torch.device("cpu")) is None
    assert len(fake.calls) == 2  # another encoder never builds CLIP

    def unavailable(*args, **kwargs):
        raise encoders.EncoderUnavailable("open_clip is not installed")

    monkeypatch.setattr(encoders, "get_encoder", unavailable)
    assert cf.zeroshot_classifier(ds, cfg, torch.device("cpu")) is None


def test_zeroshot_classifier_through_open_clip(clip_hub, offline_hub, tmp_path):
    """The real text tower (open_clip's ViT-B-32, random weights in a hub cache): each class's row
    is CLIP's prompt ensemble, the normalised mean of the normalised embeddings of every template
    filled with the class name, as open_clip's own tokenizer and ``encode_text`` give them."""
    import open_clip

    root, reference = clip_hub
    offline_hub(root)
    ds = load_dataset("digits", max_train=20, max_test=10)
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"templates": ["a photo of the digit {}.", "a drawing of a {}."]}))
    w = cf.zeroshot_classifier(ds, {"encoder": "clip-vit-b32", "cache_dir": "", "prompts": str(pool)}, torch.device("cpu"))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    with torch.no_grad():
        rows = []
        for name in ds.classes:
            z = F.normalize(reference.encode_text(tokenizer([f"a photo of the digit {name}.", f"a drawing of a {name}."])), dim=-1)
            rows.append(F.normalize(z.mean(0), dim=0))
    assert w.shape == (10, 512)
    np.testing.assert_allclose(w, torch.stack(rows).numpy(), rtol=1e-5, atol=1e-6)


def test_zeroshot_logits_are_clip_scaled_cosines_and_auto_fuses_them_with_clip():
    rng = np.random.default_rng(8)
    x, y = _blobs(rng, n_per_class=10, num_classes=3, dim=5)
    x = x.astype(np.float32)  # as train() hands the head its features
    text = rng.normal(size=(3, 5))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    head = cf.LinearHead(5, 3)
    out = cf.source_logits(x, y, np.arange(len(y)), head, {"val": x[:7]}, {"proto_temperature": 0.1}, 3, text)
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(x[:7, None], dtype=torch.float64), torch.as_tensor(text[None]), dim=-1).numpy()
    np.testing.assert_allclose(out["zeroshot"]["val"], 100.0 * cos, rtol=1e-9)
    assert "zeroshot" not in cf.source_logits(x, y, np.arange(len(y)), head, {"val": x}, {"proto_temperature": 0.1}, 3, None)
    assert cf.fusion_pair({"fusion_a": "auto", "fusion_b": "supervised", "encoder": "clip-vit-b32"}) == ("zeroshot", "supervised")
    assert cf.fusion_pair({"fusion_a": "auto", "fusion_b": "supervised", "encoder": "resnet18"}) == ("prototype", "supervised")
    assert cf.fusion_pair({"fusion_a": "supervised", "fusion_b": "prototype", "encoder": "clip-vit-b32"}) == ("supervised", "prototype")


def test_check_accepts_the_smallest_stacker_split_and_refuses_one_image_less():
    """max_train 20 of digits: 2 images per class, 20 in all. A holdout of 0.5 leaves exactly
    one image per class on each side (accepted); 0.4 and 0.6 leave one side short."""
    cf.check(_config(max_train=20, stacker_holdout=0.5))
    for frac in (0.4, 0.6):
        with pytest.raises(ConfigError, match="the holdout and the rest must each hold one image of each of the 10 classes"):
            cf.check(_config(max_train=20, stacker_holdout=frac))
    cf.check(_config(max_train=20, stacker=False, stacker_holdout=0.6))  # no stacker: no holdout to check
    cf.check(_config(max_train=15, stacker=False))


def test_check_reads_the_prompt_pool_with_the_clip_encoder(tmp_path):
    bad = tmp_path / "pool.json"
    bad.write_text(json.dumps({"templates": ["no slot"]}))
    clip = _config(encoder="clip-vit-b32", fusion_a="zeroshot")
    cf.check(clip)
    for prompts in (str(bad), str(tmp_path / "missing.json")):
        with pytest.raises(ConfigError, match=f"prompts '{prompts}'"):
            cf.check({**clip, "prompts": prompts})
    bad.write_text(json.dumps({"prompts": []}))
    with pytest.raises(ConfigError, match="prompts"):
        cf.check({**clip, "prompts": str(bad)})
    cf.check(_config(prompts=str(bad)))  # another encoder never reads the pool
    with pytest.raises(ConfigError, match="fusion_a 'auto' and fusion_b 'zeroshot' are both the zeroshot source"):
        cf.check({**clip, "fusion_a": "auto", "fusion_b": "zeroshot"})
    with pytest.raises(ConfigError, match="fusion_a zeroshot needs encoder clip-vit-b32"):
        cf.check(_config(fusion_a="zeroshot"))


def test_fit_stacker_weights_each_class_by_its_inverse_frequency():
    """On imbalanced classes (120 / 30 / 10 rows) the stacker is the logistic regression whose
    rows weigh n / (k n_c) (scikit-learn's sample weights here, not class_weight), and differs
    from the unweighted one."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(9)
    labels = np.repeat([0, 1, 2], [120, 30, 10])
    inputs = [softmax(1.5 * np.eye(3)[labels] + rng.normal(size=(160, 3)), axis=1), rng.random((160, 2))]
    x = np.hstack(inputs)
    got = cf.fit_stacker(inputs, labels, C=1.0, seed=0)
    weights = len(labels) / (3 * np.bincount(labels))[labels]
    ref = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, labels, sample_weight=weights)
    np.testing.assert_allclose(got.predict_proba(x), ref.predict_proba(x), atol=1e-3)
    unweighted = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, labels)
    assert np.abs(unweighted.predict_proba(x) - ref.predict_proba(x)).max() > 0.05
