"""clip_fusion's wiring, through its real ``train()`` on digits: which split each source, fit
and choice may see (prototypes and heads from train, temperature and alpha from val, the
stacker on a stratified holdout of train), fusion and the stacker against numpy and
scikit-learn reimplementations from the run's own heads, and that each knob changes what it
names and nothing else. Each test fails when that choice is broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainables import clip_fusion as cf
from trainables.common.calibration import fit_temperature
from trainables.common.data import load_dataset
from trainables.common.features import extract_features

from wiring_helpers import assert_same_outside_test, pick, with_mirrored_val

ROOT = Path(__file__).resolve().parents[1]
DOC = yaml.safe_load((ROOT / "search_spaces" / "clip_fusion.yaml").read_text())
ALPHAS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
# 400 training images: own-cnn trains in seconds, once per test session (the session cache)
BASE = {**DOC["defaults"], "max_train": 400, "max_test": 0, "epochs": 3, "seed": 0, "device": "cpu", "eval": {"alpha": ALPHAS}}


def config(**overrides) -> dict:
    return {**BASE, **overrides}


def run(cfg: dict) -> list[tuple[dict, dict]]:
    reports = []
    with cf.single_thread_on_cpu(torch.device("cpu")):
        cf.train(cfg, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)))
    return reports


def data(cfg: dict):
    """(features, labels) per split, as train() loads them."""
    ds = load_dataset(cfg["dataset"], max_train=cfg["max_train"] or None, max_test=cfg["max_test"] or None)
    fs = extract_features(ds, cfg["encoder"], device="cpu", progress=False)
    return ({s: np.asarray(fs.split(s), dtype=np.float64) for s in ("train", "val", "test")},
            {s: getattr(ds, s).labels for s in ("train", "val", "test")})


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def proto_logits(x_fit, y_fit, x, temperature, num_classes=10):
    centroids = unit(np.stack([unit(x_fit[y_fit == c]).mean(0) for c in range(num_classes)]))
    return unit(x) @ centroids.T / temperature


def head_logits(state: dict, x: np.ndarray) -> np.ndarray:
    """The linear head of a checkpoint in numpy: standardise with its stored statistics, project."""
    w, b = state["linear.weight"].double().numpy(), state["linear.bias"].double().numpy()
    return (x - state["mean"].double().numpy()) / state["std"].double().numpy() @ w.T + b


def acc_nll(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    return float(np.mean(probs.argmax(1) == labels)), float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def assert_reported(metrics: dict, split: str, method: str, probs: np.ndarray, labels: np.ndarray, rel=1e-6):
    acc, nll = acc_nll(probs, labels)
    assert metrics[f"{split}/{method}/acc"] == pytest.approx(acc, abs=1e-12), (split, method)
    assert metrics[f"{split}/{method}/nll"] == pytest.approx(nll, rel=rel), (split, method)


@pytest.fixture(scope="module")
def base_run():
    return run(config())


@pytest.fixture(scope="module")
def arrays():
    return data(config())


# ---------------------------------------------------------------- sources


@pytest.mark.parametrize("shots", [0, 3])
def test_prototypes_are_train_centroids_and_shots_are_drawn_per_seed_from_train(arrays, shots):
    """Against numpy: centroids of the (sampled) train features. Mutations caught: centroids
    of val or test features, unnormalised centroids, proto_temperature not applied, shots not
    drawn from train with the trial's own stream."""
    x, y = arrays
    got = run(config(shots=shots, calibrate=False, stacker=False, epochs=1))[-1][0]
    rows = cf.sample_shots(y["train"], shots, np.random.default_rng([0, 0]))
    if shots:
        assert np.all(np.bincount(y["train"][rows]) == shots)
    for split in ("val", "test"):
        probs = softmax(proto_logits(x["train"][rows], y["train"][rows], x[split], BASE["proto_temperature"]), axis=1)
        assert_reported(got, split, "prototype", probs, y[split])
    other_seed = run(config(shots=shots, calibrate=False, stacker=False, epochs=1, seed=1))[-1][0]
    same = pick(got, "test/prototype/") == pick(other_seed, "test/prototype/")
    assert same == (shots == 0)  # all of train: no seed in the centroids; few-shot: a draw per seed


def test_supervised_head_learns_from_train_only_and_is_the_reported_source(base_run, arrays):
    """The head standardises with train statistics and its logits, in numpy, are the reported
    supervised source. Mutations caught: statistics of val/test, the head trained on val."""
    x, y = arrays
    heads = cf.checkpoint_heads(base_run[-1][1])
    state = heads["supervised"]
    np.testing.assert_allclose(state["mean"].numpy(), x["train"].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state["std"].numpy(), np.maximum(x["train"].std(0, ddof=1), 1e-6), rtol=1e-4, atol=1e-5)
    got = base_run[-1][0]
    t = got["info/supervised_temperature"]
    for split in ("val", "test"):
        assert_reported(got, split, "supervised", softmax(head_logits(state, x[split]) / t, axis=1), y[split], rel=1e-5)


# ---------------------------------------------------------------- calibration and fusion


def test_temperature_is_fit_on_val_and_changes_only_confidence(base_run, arrays):
    """T is the val-NLL fit of each source's val logits; it leaves every argmax metric as it
    was. Mutations caught: T fit on test, T fit on train, T applied as a product."""
    x, y = arrays
    got, state = base_run[-1][0], cf.checkpoint_heads(base_run[-1][1])["supervised"]
    logits = {"prototype": {s: proto_logits(x["train"], y["train"], x[s], BASE["proto_temperature"]) for s in ("val", "test")},
              "supervised": {s: head_logits(state, x[s]) for s in ("val", "test")}}
    for src, z in logits.items():
        t = got[f"info/{src}_temperature"]
        assert t == pytest.approx(fit_temperature(z["val"], y["val"]), rel=1e-4), src
        assert t != 1.0, src  # this config must exercise calibration
        assert_reported(got, "test", src, softmax(z["test"] / t, axis=1), y["test"], rel=1e-5)
    plain = run(config(calibrate=False))[-1][0]
    for src in logits:
        assert plain[f"info/{src}_temperature"] == 1.0
        for m in ("acc", "top5", "balanced_acc", "macro_f1"):
            assert plain[f"test/{src}/{m}"] == got[f"test/{src}/{m}"], (src, m)
        assert plain[f"test/{src}/nll"] != got[f"test/{src}/nll"]


def test_every_alpha_is_the_mixture_of_one_runs_calibrated_sources(base_run, arrays):
    """p = alpha p_a + (1 - alpha) p_b, in numpy, from the run's own prototypes and final head
    (one trained model behind every alpha). Mutations caught: the mixture's weights swapped,
    uncalibrated sources fused, a head per alpha."""
    x, y = arrays
    got, state = base_run[-1][0], cf.checkpoint_heads(base_run[-1][1])["supervised"]
    t_a, t_b = got["info/prototype_temperature"], got["info/supervised_temperature"]
    for split in ("val", "test"):
        p_a = softmax(proto_logits(x["train"], y["train"], x[split], BASE["proto_temperature"]) / t_a, axis=1)
        p_b = softmax(head_logits(state, x[split]) / t_b, axis=1)
        for alpha in ALPHAS:
            assert_reported(got, split, f"fusion:alpha:{alpha:g}", alpha * p_a + (1 - alpha) * p_b, y[split], rel=1e-5)


@pytest.mark.parametrize("alpha_metric", ["acc", "nll"])
def test_alpha_is_chosen_on_val_by_alpha_metric(alpha_metric):
    """The plain fusion name reports the alpha with the best val ``alpha_metric`` (ties: lower
    val NLL, then smaller alpha). Mutations caught: chosen on test, nll maximised, alpha_metric
    ignored."""
    got = run(config(alpha_metric=alpha_metric, stacker=False))[-1][0]
    sign = 1 if alpha_metric == "nll" else -1
    val = {a: (sign * got[f"val/fusion:alpha:{a:g}/{alpha_metric}"], got[f"val/fusion:alpha:{a:g}/nll"], a) for a in ALPHAS}
    best = min(val, key=val.get)
    assert got["info/fusion_alpha"] == best
    assert pick(got, "test/fusion/") == {k.replace(f":alpha:{best:g}", ""): v for k, v in pick(got, f"test/fusion:alpha:{best:g}/").items()}


def test_alpha_metric_changes_the_choice_in_this_config():
    """Keeps the previous test honest: on this config acc and nll pick different alphas."""
    picks = {m: run(config(alpha_metric=m, stacker=False))[-1][0]["info/fusion_alpha"] for m in ("acc", "nll")}
    assert picks["acc"] != picks["nll"], picks


# ---------------------------------------------------------------- stacker


def test_stacker_learns_on_a_stratified_train_holdout_from_sources_refit_on_the_rest(base_run, arrays):
    """Against scikit-learn: the holdout is sklearn's stratified split of train, the stacker's
    own head saw only the rest (its statistics are the rest's), its prototypes are the rest's,
    its sources are calibrated on val, and a LogisticRegression on the holdout's source
    probabilities reproduces the reported stacker. Mutations caught: a random (unstratified)
    holdout, the stacker fit on val, its sources fit on all of train or on the holdout."""
    x, y = arrays
    cfg, got, heads = config(), base_run[-1][0], cf.checkpoint_heads(base_run[-1][1])
    fit, hold = train_test_split(np.arange(len(y["train"])), test_size=cfg["stacker_holdout"], stratify=y["train"], random_state=0)
    fit, hold = np.sort(fit), np.sort(hold)
    state = heads["stacker_supervised"]
    np.testing.assert_allclose(state["mean"].numpy(), x["train"][fit].mean(0), rtol=1e-5, atol=1e-5)
    evals = {"holdout": x["train"][hold], "val": x["val"], "test": x["test"]}
    sources = {"prototype": {s: proto_logits(x["train"][fit], y["train"][fit], v, cfg["proto_temperature"]) for s, v in evals.items()},
               "supervised": {s: head_logits(state, v) for s, v in evals.items()}}
    probs = {}
    for src, z in sources.items():
        t = fit_temperature(z["val"], y["val"])
        probs[src] = {s: softmax(v / t, axis=1) for s, v in z.items()}
    inputs = {s: np.hstack([probs[src][s] for src in sorted(probs)]) for s in evals}
    model = LogisticRegression(C=cfg["stacker_C"], class_weight="balanced", max_iter=5000, random_state=0)
    model.fit(inputs["holdout"], y["train"][hold])
    for split in ("val", "test"):
        assert_reported(got, split, "stacker", model.predict_proba(inputs[split]), y[split], rel=1e-4)


# ---------------------------------------------------------------- knobs and split isolation


def test_shots_change_only_the_prototype_side(base_run):
    """The supervised heads (main and the stacker's), their losses and temperatures do not move
    with shots; the prototypes and what reads them do."""
    few = run(config(shots=2))
    full = base_run
    for (a, _), (b, _) in zip(few, full):
        assert pick(a, "train/") == pick(b, "train/")
    a, b = few[-1][0], full[-1][0]
    for prefix in ("test/supervised/", "val/supervised/", "info/supervised_temperature"):
        assert pick(a, prefix) == pick(b, prefix), prefix
    for prefix in ("test/prototype/", "test/stacker/", "test/fusion:alpha:0.6/"):
        assert pick(a, prefix) != pick(b, prefix), prefix


@pytest.mark.parametrize("knob,value,changes", [
    ("proto_temperature", 0.2, ("prototype", "stacker", "fusion:alpha:0.6")),
    ("stacker_C", 0.5, ("stacker",)),
    ("lr", 0.05, ("supervised", "stacker", "fusion:alpha:0.6")),
])
def test_each_knob_changes_its_sources_and_nothing_else(knob, value, changes):
    base, other = run(config(calibrate=False))[-1][0], run(config(calibrate=False, **{knob: value}))[-1][0]
    for method in ("prototype", "supervised", "stacker", "fusion:alpha:0.6"):
        a, b = pick(base, f"test/{method}/"), pick(other, f"test/{method}/")
        assert (a != b) == (method in changes), (knob, method)


def test_fusion_a_and_b_name_the_mixed_sources(base_run):
    swapped = run(config(fusion_a="supervised", fusion_b="prototype", stacker=False))[-1][0]
    for src, alpha in (("supervised", 1.0), ("prototype", 0.0)):
        fused = {k.split("/")[-1]: v for k, v in pick(swapped, f"test/fusion:alpha:{alpha:g}/").items()}
        assert fused == pytest.approx({k.split("/")[-1]: v for k, v in pick(swapped, f"test/{src}/").items()}, abs=1e-12)


def test_test_split_changes_only_test_metrics():
    """max_test changes only the test split: every train, val and info figure (temperatures, the
    chosen alpha) of every report stays. Mutations caught: T or alpha fit on test, the head,
    prototypes or stacker fit on test."""
    a, b = run(config(max_test=200)), run(config(max_test=300))
    assert_same_outside_test(a, b)


def test_val_split_only_calibrates_and_chooses(monkeypatch):
    """Without calibration, val only chooses alpha: a different val split (mirrored images)
    leaves training and every test figure but the chosen fusion the same. Mutations caught:
    a head, prototype or stacker fit on val."""
    cfg = config(calibrate=False)
    plain = run(cfg)
    load = cf.load_dataset

    def mirrored_val(*args, **kwargs):
        return with_mirrored_val(load(*args, **kwargs))

    monkeypatch.setattr(cf, "load_dataset", mirrored_val)
    other = run(cfg)
    for (a, _), (b, _) in zip(plain, other):
        assert pick(a, "train/") == pick(b, "train/")
    a, b = plain[-1][0], other[-1][0]
    assert pick(a, "val/prototype/") != pick(b, "val/prototype/")
    keep = [k for k in a if k.startswith("test/") and not k.startswith("test/fusion/")]
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}
