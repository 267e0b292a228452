"""clip_fusion's wiring, through its real ``train()`` on digits: which split each source, fit
and choice may see (prototypes and heads from train, temperature and alpha from val, the
stacker on a stratified holdout of train), fusion and the stacker against numpy and
scikit-learn reimplementations from the run's own heads, and that each knob changes what it
names and nothing else. Each test fails when that choice is broken."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainables import clip_fusion as cf
from trainables.common.cache import default_cache_dir
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
        assert_reported(got, split, "prototype", probs, y[split], rel=1e-10)  # float64 throughout, as here
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


def expected_stacker(cfg: dict, state: dict, x: dict, y: dict, text: np.ndarray | None = None) -> dict:
    """split -> the stacker's probabilities, from scikit-learn: the holdout is sklearn's
    stratified split of train, the sources are fit on the rest (prototypes of the rest, or of
    ``shots`` per class drawn from it with the trial's stream ``[seed, 1]``; ``state`` is the
    stacker's own head), calibrated on val and concatenated in name order, and a balanced
    LogisticRegression learns on the holdout's."""
    fit, hold = train_test_split(np.arange(len(y["train"])), test_size=cfg["stacker_holdout"], stratify=y["train"],
                                 random_state=cfg["seed"])
    fit, hold = np.sort(fit), np.sort(hold)
    protos = cf.sample_shots(y["train"][fit], cfg["shots"], np.random.default_rng([cfg["seed"], 1]))
    if cfg["shots"]:
        assert np.all(np.bincount(y["train"][fit][protos]) == cfg["shots"])
    evals = {"holdout": x["train"][hold], "val": x["val"], "test": x["test"]}
    x_fit, y_fit = x["train"][fit][protos], y["train"][fit][protos]
    sources = {"prototype": {s: proto_logits(x_fit, y_fit, v, cfg["proto_temperature"]) for s, v in evals.items()},
               "supervised": {s: head_logits(state, v) for s, v in evals.items()}}
    if text is not None:
        sources["zeroshot"] = {s: 100.0 * unit(v) @ text.T for s, v in evals.items()}
    probs = {}
    for src, z in sources.items():
        t = fit_temperature(z["val"], y["val"])
        probs[src] = {s: softmax(v / t, axis=1) for s, v in z.items()}
    inputs = {s: np.hstack([probs[src][s] for src in sorted(probs)]) for s in evals}
    model = LogisticRegression(C=cfg["stacker_C"], class_weight="balanced", max_iter=5000, random_state=0)
    model.fit(inputs["holdout"], y["train"][hold])
    return {split: model.predict_proba(inputs[split]) for split in ("val", "test")}


@pytest.fixture(scope="module")
def few_shot_run():
    return run(config(shots=2))


@pytest.mark.parametrize("shots", [0, 2])
def test_stacker_learns_on_a_stratified_train_holdout_from_sources_refit_on_the_rest(base_run, few_shot_run, arrays, shots):
    """Against scikit-learn (:func:`expected_stacker`); the stacker's own head saw only the rest
    of train (its statistics are the rest's). Mutations caught: a random (unstratified)
    holdout, the stacker fit on val, its sources fit on all of train or on the holdout, its
    few-shot prototypes not drawn from the rest with the trial's stream."""
    x, y = arrays
    cfg, reports = config(shots=shots), (few_shot_run if shots else base_run)
    got, state = reports[-1][0], cf.checkpoint_heads(reports[-1][1])["stacker_supervised"]
    fit, _ = train_test_split(np.arange(len(y["train"])), test_size=cfg["stacker_holdout"], stratify=y["train"], random_state=0)
    np.testing.assert_allclose(state["mean"].numpy(), x["train"][np.sort(fit)].mean(0), rtol=1e-5, atol=1e-5)
    for split, probs in expected_stacker(cfg, state, x, y).items():
        assert_reported(got, split, "stacker", probs, y[split], rel=1e-4)


# ---------------------------------------------------------------- knobs and split isolation


def test_shots_change_only_the_prototype_side(base_run, few_shot_run):
    """The supervised heads (main and the stacker's), their losses and temperatures do not move
    with shots; the prototypes and what reads them do."""
    few = few_shot_run
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
    ("batch_size", 50, ("supervised", "stacker", "fusion:alpha:0.6")),
    ("weight_decay", 0.1, ("supervised", "stacker", "fusion:alpha:0.6")),
    ("stacker_holdout", 0.5, ("stacker",)),
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


# ---------------------------------------------------------------- bench/mutation.py's survivors (2026-12-02)


def reference_head(x: np.ndarray, y: np.ndarray, cfg: dict, seed: int, epochs: int, x_val: np.ndarray):
    """The linear head in plain torch: nn.Linear initialised right after torch.manual_seed(seed)
    on the features standardised with their mean and unbiased std (floored at 1e-6), Adam with
    the config's lr and weight decay, batch_size minibatches in torch.randperm order from a
    generator seeded with ``seed``. Per epoch: (weight, bias, mean train loss, val argmax)."""
    xt = torch.as_tensor(x, dtype=torch.float32)
    z = (xt - xt.mean(0)) / xt.std(0).clamp_min(1e-6)
    z_val = (torch.as_tensor(x_val, dtype=torch.float32) - xt.mean(0)) / xt.std(0).clamp_min(1e-6)
    yt = torch.as_tensor(y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = torch.nn.Linear(x.shape[1], 10)  # digits: 10 classes
    adam = torch.optim.Adam(linear.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    order_rng, out = torch.Generator().manual_seed(seed), []
    for _ in range(epochs):
        order, total = torch.randperm(len(yt), generator=order_rng), 0.0
        for start in range(0, len(yt), cfg["batch_size"]):
            rows = order[start:start + cfg["batch_size"]]
            loss = torch.nn.functional.cross_entropy(linear(z[rows]), yt[rows])
            adam.zero_grad()
            loss.backward()
            adam.step()
            total += loss.item() * len(rows)
        with torch.no_grad():
            out.append((linear.weight.detach().clone(), linear.bias.detach().clone(), total / len(yt),
                        linear(z_val).argmax(1).numpy()))
    return out


def test_both_heads_are_adam_on_their_train_rows_with_the_configured_settings(base_run, arrays):
    """Each epoch's checkpointed heads, train losses and val accuracy against the plain-torch
    reference: the supervised head on all of train from the trial's seed, the stacker's on the
    rest of its holdout split from its own seed. Mutations caught: lr, weight decay or batch
    size not reaching the head, gradients accumulated across steps, the loss summed wrongly
    over batches, a head initialised or ordered from another stream, val accuracy inverted."""
    x, y = arrays
    cfg = config()
    fit, _ = train_test_split(np.arange(len(y["train"])), test_size=cfg["stacker_holdout"], stratify=y["train"], random_state=0)
    fit = np.sort(fit)
    rows = {"supervised": (np.arange(len(y["train"])), 0), "stacker_supervised": (fit, cf.STACKER_SEED_OFFSET)}
    for name, (r, seed) in rows.items():
        ref = reference_head(x["train"][r], y["train"][r], cfg, seed, cfg["epochs"], x["val"])
        assert len(base_run) == len(ref) == cfg["epochs"]
        for (metrics, checkpoint), (w, b, loss, val_pred) in zip(base_run, ref):
            state = cf.checkpoint_heads(checkpoint)[name]
            torch.testing.assert_close(state["linear.weight"], w, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(state["linear.bias"], b, rtol=1e-5, atol=1e-6)
            assert metrics[f"train/{name}/loss"] == pytest.approx(loss, rel=1e-6), (name, metrics["epoch"])
            if name == "supervised":
                assert metrics["val/supervised/acc"] == pytest.approx(np.mean(val_pred == y["val"]), abs=1e-12)


def test_without_an_eval_axis_every_alpha_of_the_yaml_grid_is_reported():
    """A config without ``eval`` (train() called outside a study) fuses at the 21 alphas of the
    YAML's grid, 0 to 1 in steps of 0.05."""
    cfg = {k: v for k, v in config(epochs=1, stacker=False).items() if k != "eval"}
    got = run(cfg)[-1][0]
    reported = sorted({float(k.split("/")[1].split(":")[2]) for k in got if k.startswith("test/fusion:alpha:")})
    assert reported == DOC["eval"]["alpha"] == [round(0.05 * i, 2) for i in range(21)]
    assert got["info/fusion_alpha"] in reported


def test_a_text_classifier_is_a_calibrated_source_auto_fusion_and_the_stacker_read(arrays, monkeypatch):
    """The zeroshot source gets a stand-in text tower: one unit vector per class (noisy train
    centroids) over the run's features, handed to train() in place of CLIP's (the only CLIP
    weights this machine can have are random, which classify nothing; the real tower is checked
    in test_clip_fusion.py). Against numpy/scikit-learn: zeroshot = softmax(100 cos / T), T fit on
    val; the stacker reads it beside the other two sources; and ``auto`` with the CLIP encoder
    fuses it (alpha 1) with the supervised head (alpha 0), through the same evaluation."""
    x, y = arrays
    rng = np.random.default_rng(3)
    text = unit(np.stack([unit(x["train"][y["train"] == c]).mean(0) for c in range(10)]) + 0.05 * rng.normal(size=(10, x["train"].shape[1])))
    cfg = config(epochs=1)

    def clip_text_tower(ds, config_seen, device):
        assert ds.classes == [str(c) for c in range(10)] and config_seen is cfg and device == torch.device("cpu")
        return text

    monkeypatch.setattr(cf, "zeroshot_classifier", clip_text_tower)
    reports = run(cfg)
    got, heads = reports[-1][0], cf.checkpoint_heads(reports[-1][1])
    assert got["info/zeroshot_available"] == 1.0
    z = {s: 100.0 * unit(x[s]) @ text.T for s in ("val", "test")}
    t = fit_temperature(z["val"], y["val"])
    assert got["info/zeroshot_temperature"] == pytest.approx(t, rel=1e-4) and t != 1.0
    for split in ("val", "test"):
        assert_reported(got, split, "zeroshot", softmax(z[split] / t, axis=1), y[split], rel=1e-5)
    for split, probs in expected_stacker(cfg, heads["stacker_supervised"], x, y, text).items():
        assert_reported(got, split, "stacker", probs, y[split], rel=1e-4)

    x32 = {s: v.astype(np.float32) for s, v in x.items()}  # as train() hands them over
    head = cf.LinearHead(x["train"].shape[1], 10)
    head.load_state_dict(heads["supervised"])
    fused, test_probs = cf.source_and_fusion_metrics(config(encoder="clip-vit-b32"), x32, y, 10, head, text, ALPHAS)
    assert pick(fused, "test/zeroshot/") == pick(got, "test/zeroshot/")
    np.testing.assert_allclose(test_probs["zeroshot"], softmax(z["test"] / t, axis=1), rtol=1e-4, atol=1e-9)
    for src, alpha in (("zeroshot", 1.0), ("supervised", 0.0)):
        assert pick(fused, f"test/fusion:alpha:{alpha:g}/") == {k.replace(src, f"fusion:alpha:{alpha:g}"): v for k, v in pick(fused, f"test/{src}/").items()}


def test_cache_dir_is_where_the_features_come_from(arrays, tmp_path, monkeypatch):
    """A config's cache_dir is the cache train() reads: with a copy of the session's cache there
    (``arrays`` filled it) and an empty default cache, nothing is built in the default one.
    Mutations caught: the cache_dir key ignored (the default cache used)."""
    shutil.copytree(default_cache_dir(), tmp_path / "cache")
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "default"))
    reports = run(config(epochs=1, stacker=False, cache_dir=str(tmp_path / "cache")))
    assert "test/prototype/acc" in reports[-1][0]
    assert not (tmp_path / "default").exists()
