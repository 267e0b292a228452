"""set_anomaly's wiring, through its real ``train()`` on digits: which split each step may see
(sets, standardisation, early stopping, report), that each knob reaches what it names and
nothing else, and that the baselines are what their names say (against numpy
reimplementations). Each test fails when that choice is broken (see the mutations named in
the docstrings)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from scipy.special import log_softmax, softmax
from scipy.stats import binomtest, chisquare
from torch import nn

from trainables import set_anomaly as sa
from trainables.common.cache import default_cache_dir
from trainables.common.data import load_dataset
from trainables.common.features import extract_features
from trainables.common.lifecycle import capture_rng
from trainables.common.training import EarlyStopping

from wiring_helpers import assert_same_outside_test, pick, with_mirrored_val

SPEC = yaml.safe_load(open("search_spaces/set_anomaly.yaml"))
# 400 training images: own-cnn trains in seconds, once per test session (the session cache);
# 600 test sets: more than one evaluation batch (512)
BASE = {**SPEC["defaults"], "seed": 0, "device": "cpu", "max_train": 400, "n_classes": 10, "n_train_sets": 200,
        "n_val_sets": 100, "n_test_sets": 600, "epochs": 2, "patience": 50, "mlp_hidden": 32, "lr": 3e-3}


def config(**overrides) -> dict:
    return {**BASE, **overrides}


def run(cfg: dict, restore=None) -> list[tuple[dict, dict]]:
    reports, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sa.train(cfg, lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)), restore=restore)
    finally:
        torch.set_num_threads(threads)
    return reports


def final(cfg: dict) -> dict:
    return run(cfg)[-1][0]


def features(cfg: dict):
    ds = sa.load_data(cfg)
    return ds, extract_features(ds, cfg["encoder"], device="cpu", progress=False)


@pytest.fixture(scope="module")
def base_run():
    return run(config())


# ---------------------------------------------------------------- the sets


@pytest.mark.parametrize("set_size", [10, 5])
def test_sets_hold_one_anomaly_of_another_class_at_the_target_in_shuffled_positions(set_size):
    """Mutations caught: anomaly of the same class, target off by one, no shuffle, n_classes or
    set_size ignored."""
    cfg = config(n_classes=4, n_train_sets=2000, set_size=set_size)
    ds = sa.load_data(cfg)
    sets = sa.build_sets(ds, cfg, sa.effective_classes(ds, cfg["n_classes"]))
    for split, (idx, target) in sets.items():
        labels = getattr(ds, split).labels[idx]
        assert idx.shape == (cfg[f"n_{split}_sets"], cfg["set_size"])
        anomaly = labels[np.arange(len(idx)), target]
        rest = labels[np.arange(len(idx))[:, None], [np.delete(np.arange(cfg["set_size"]), t) for t in target]]
        assert (rest == rest[:, :1]).all(), split  # set_size - 1 images of class A ...
        assert (anomaly != rest[:, 0]).all(), split  # ... and the one at the target is of another class
        assert set(np.unique(labels)) == set(range(4)), split  # the first n_classes classes, all of them
    _, target = sets["train"]
    assert chisquare(np.bincount(target, minlength=cfg["set_size"])).pvalue > 1e-3  # positions shuffled


# ---------------------------------------------------------------- baselines


def _ranking(scores: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    true = scores[np.arange(len(target)), target]
    higher = (scores > true[:, None]).sum(1)
    return float(np.mean(scores.argmax(1) == target)), float(np.mean(higher < 5))


def test_farthest_from_mean_is_the_argmax_cosine_distance_to_the_set_mean():
    """Against a numpy reimplementation on the raw cached features of the sets train() draws
    (n_classes 4, so the sets' classes are wired too). Mutations caught: argmin, Euclidean
    distance, the val sets scored as test, n_classes not reaching the sets."""
    cfg = config(n_classes=4, epochs=1)
    got = final(cfg)
    ds, fs = features(cfg)
    sets = sa.build_sets(ds, cfg, 4)
    for split in ("val", "test"):
        idx, target = sets[split]
        x = np.asarray(fs.split(split), dtype=np.float64)[idx]  # (n, S, D)
        mean = x.mean(1, keepdims=True)
        cos = (x * mean).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(mean, axis=-1))
        acc, top5 = _ranking(1.0 - cos, target)
        assert got[f"{split}/farthest_from_mean/acc"] == pytest.approx(acc, abs=1e-12)
        assert got[f"{split}/farthest_from_mean/top5"] == pytest.approx(top5, abs=1e-12)


def test_random_baseline_is_chance():
    """Mutations caught: random scores that read the features or the target (that they do not
    move with a model knob: test_each_model_knob_changes_its_nets_and_nothing_else)."""
    got = final(config(n_test_sets=3000, epochs=1))
    for metric, chance in (("acc", 1 / 10), ("top5", 5 / 10)):
        hits = round(got[f"test/random/{metric}"] * 3000)
        assert binomtest(hits, 3000, chance).pvalue > 1e-3, metric


def test_flat_mlp_reads_the_concatenated_set_and_attention_is_permutation_equivariant():
    """The two nets are what their names say (no positional encoding in attention)."""
    cfg, dim = config(), 16
    torch.manual_seed(0)
    flat, attention = sa.FlatMLP(dim, cfg).eval(), sa.SetAttention(dim, cfg).eval()
    first = next(m for m in flat.modules() if isinstance(m, nn.Linear))
    assert first.in_features == cfg["set_size"] * dim
    x = torch.randn(3, cfg["set_size"], dim)
    perm = torch.randperm(cfg["set_size"])
    with torch.no_grad():
        torch.testing.assert_close(attention(x[:, perm]), attention(x)[:, perm])
        assert flat(x).shape == (3, cfg["set_size"])
        assert not torch.allclose(flat(x[:, perm]), flat(x)[:, perm])


def _layer_norm(h: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    centred = h - h.mean(-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * weight + bias


def reference_set_attention(state: dict, cfg: dict, x: np.ndarray) -> np.ndarray:
    """The attention net as the module doc declares it, in numpy (float64, eval mode): optional
    projection, per layer multi-head self-attention over the set's positions (scaled dot
    product, softmax over the keys) added to its input then LayerNorm, then the per-position
    scorer Linear -> ReLU -> Linear."""
    p = {k: v.double().numpy() for k, v in state.items()}
    h = x @ p["proj.weight"].T + p["proj.bias"] if cfg["model_dim"] else x
    heads = cfg["heads"]
    for i in range(cfg["layers"]):
        q, k, v = np.split(h @ p[f"blocks.{i}.attn.in_proj_weight"].T + p[f"blocks.{i}.attn.in_proj_bias"], 3, axis=-1)
        split = lambda t: t.reshape(*t.shape[:2], heads, -1).transpose(0, 2, 1, 3)  # (B, heads, S, d)
        q, k, v = split(q), split(k), split(v)
        weights = softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]), axis=-1)
        attended = (weights @ v).transpose(0, 2, 1, 3).reshape(h.shape)
        out = attended @ p[f"blocks.{i}.attn.out_proj.weight"].T + p[f"blocks.{i}.attn.out_proj.bias"]
        h = _layer_norm(h + out, p[f"blocks.{i}.norm.weight"], p[f"blocks.{i}.norm.bias"])
    hidden = np.maximum(h @ p["score.0.weight"].T + p["score.0.bias"], 0)
    return (hidden @ p["score.3.weight"].T + p["score.3.bias"])[..., 0]


@pytest.mark.parametrize("heads,layers,model_dim", [(2, 2, 0), (4, 1, 24)])
def test_the_nets_compute_what_the_module_doc_declares(heads, layers, model_dim):
    """Both nets against numpy reimplementations from their own weights (eval mode), and
    dropout where the doc puts it. Mutations caught: attention over the batch instead of the
    set (batch_first), a residual subtracted, a projection with model_dim 0, a ReLU or a
    dropout left out."""
    cfg, dim = config(heads=heads, layers=layers, model_dim=model_dim, dropout=0.2), 16
    torch.manual_seed(0)
    attention, flat = sa.SetAttention(dim, cfg).eval(), sa.FlatMLP(dim, cfg).eval()
    x = torch.randn(3, cfg["set_size"], dim)
    with torch.no_grad():
        got_attention, got_flat = attention(x).double().numpy(), flat(x).double().numpy()
    np.testing.assert_allclose(got_attention, reference_set_attention(attention.state_dict(), cfg, x.double().numpy()),
                               rtol=1e-4, atol=1e-5)
    p = {k: v.double().numpy() for k, v in flat.state_dict().items()}
    hidden = np.maximum(x.double().numpy().reshape(3, -1) @ p["net.1.weight"].T + p["net.1.bias"], 0)
    np.testing.assert_allclose(got_flat, hidden @ p["net.4.weight"].T + p["net.4.bias"], rtol=1e-4, atol=1e-5)
    assert [type(m) for m in attention.score] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert [type(m) for m in flat.net] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert all(isinstance(block.drop, nn.Dropout) and block.drop.p == 0.2 for block in attention.blocks)


# ---------------------------------------------------------------- knobs


@pytest.mark.parametrize("heads,layers,dropout,model_dim", [(1, 1, 0.0, 0), (4, 3, 0.3, 0), (2, 2, 0.5, 24)])
def test_heads_layers_dropout_model_dim_reach_the_attention_block(heads, layers, dropout, model_dim):
    cfg = config(heads=heads, layers=layers, dropout=dropout, model_dim=model_dim)
    model = sa.SetAttention(256, cfg)
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == layers
    assert all(m.num_heads == heads and m.dropout == dropout and m.embed_dim == (model_dim or 256) for m in attn)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == dropout for m in drops)
    assert all(m.p == dropout for m in sa.FlatMLP(256, cfg).modules() if isinstance(m, nn.Dropout))


@pytest.mark.parametrize("knob,value,changes", [
    ("heads", 2, ("attention",)),
    ("layers", 2, ("attention",)),
    ("model_dim", 32, ("attention",)),
    ("dropout", 0.3, ("attention", "flat_mlp")),
    ("mlp_hidden", 16, ("attention", "flat_mlp")),
    ("batch_size", 16, ("attention", "flat_mlp")),
])
def test_each_model_knob_changes_its_nets_and_nothing_else(base_run, knob, value, changes):
    """Through train(): a knob that does not reach its net (hard-coded heads, dropout kept out of
    the attention path) or that leaks into another method fails here."""
    base, other = base_run[-1][0], final(config(**{knob: value}))
    for method in ("attention", "flat_mlp", "farthest_from_mean", "random"):
        a, b = pick(base, f"test/{method}/"), pick(other, f"test/{method}/")
        if method in changes:
            assert a != b, (knob, method)
        else:
            assert a == b, (knob, method)


def test_optimiser_settings_and_the_train_loss_are_what_the_config_says():
    """lr 0 and dropout 0: the weights stay at their initialisation, so epoch 1's train loss of
    each net is the mean cross-entropy of its initial weights over every training set (192 sets,
    6 full batches of 32: the mean of batch means whatever the order), recomputed here on
    train-standardised features. Mutations caught: the loss summed or taken from one batch, the
    optimiser's lr or weight decay not the config's, the training sets not the train split's."""
    cfg = config(lr=0.0, dropout=0.0, epochs=1, n_train_sets=192, batch_size=32, weight_decay=0.25)
    (metrics, checkpoint), = run(cfg)
    ds, fs = features(cfg)
    raw = {s: np.asarray(fs.split(s), dtype=np.float64) for s in ("train",)}
    idx, target = sa.build_sets(ds, cfg, 10)["train"]
    x = torch.as_tensor((raw["train"][idx] - raw["train"].mean(0)) / raw["train"].std(0), dtype=torch.float32)
    for net, cls in (("attention", sa.SetAttention), ("flat_mlp", sa.FlatMLP)):
        group = checkpoint["tracked"][f"optimizer:{net}"]["param_groups"][0]
        assert (group["lr"], group["weight_decay"]) == (0.0, 0.25), net
        model = cls(fs.dim, cfg)
        model.load_state_dict(checkpoint["tracked"][f"model:{net}"])
        with torch.no_grad():
            logits = model.eval()(x).double().numpy()
        expected = -log_softmax(logits, axis=1)[np.arange(len(target)), target].mean()
        assert metrics[f"train/{net}/loss"] == pytest.approx(expected, rel=1e-4), net


def test_each_epoch_draws_new_dropout_masks():
    """One training set, lr 0, dropout 0.5: the weights and the batch never change, so a
    net's train loss differs between epochs only through its dropout masks. Mutations caught:
    the dropout stream reseeded the same way every epoch."""
    reports = run(config(lr=0.0, dropout=0.5, epochs=3, n_train_sets=1, batch_size=1))
    for net in sa.NETS:
        losses = [m[f"train/{net}/loss"] for m, _ in reports]
        assert len(set(losses)) == 3, (net, losses)


# ---------------------------------------------------------------- which split does what


LONG = 7  # epochs of the early-stopping runs: both nets' val top-1 peaks before the last one


@pytest.fixture(scope="module")
def long_run():
    return run(config(epochs=LONG))


def test_early_stopping_selects_on_val_and_reports_the_val_best_model(long_run):
    """The final report holds, per net, the model of the first epoch with the best val top-1:
    its val metrics are that epoch's, and its val and test metrics are those of a run that
    ended there. Mutations caught: selection on test, no restore of the best model."""
    epochs = LONG
    reports = long_run
    assert [m["epoch"] for m, _ in reports] == list(range(1, epochs + 1))
    last = reports[-1][0]  # its val figures are the restored best model's, not epoch 7's
    checked = 0
    for net in ("attention", "flat_mlp"):
        accs = [m[f"val/{net}/acc"] for m, _ in reports[:-1]]
        assert last[f"val/{net}/acc"] >= max(accs), net
        if last[f"val/{net}/acc"] > max(accs):
            continue  # the last epoch was the best one
        best_epoch = int(np.argmax(accs)) + 1
        assert pick(reports[best_epoch - 1][0], f"val/{net}/") == pick(last, f"val/{net}/")
        stopped = final(config(epochs=best_epoch))
        assert pick(last, f"test/{net}/") == pick(stopped, f"test/{net}/"), (net, best_epoch)
        checked += 1
    assert checked  # the config keeps at least one net's best epoch before the last


def test_reported_net_metrics_are_the_val_best_weights_on_train_standardised_sets():
    """Every net's final val and test acc, top5 and loss, recomputed from the final checkpoint's
    best weights on the raw cached features standardised here with the train split's mean and
    std (numpy, float64), softmax and cross-entropy by scipy. Mutations caught: another
    split's statistics, scores softmaxed over the wrong axis, a top-k other than 5, the loss of
    one batch only or not averaged over sets (that the best weights are the val-best epoch's:
    test_early_stopping_selects_on_val_and_reports_the_val_best_model). Its own run, not a
    shared fixture: mutmut runs for a mutant only the tests that themselves reach the mutated
    code, and a fixture's run counts for the first test that uses it."""
    cfg = config(epochs=3)
    metrics, checkpoint = run(cfg)[-1]
    ds, fs = features(cfg)
    raw = {s: np.asarray(fs.split(s), dtype=np.float64) for s in ("train", "val", "test")}
    mean, std = raw["train"].mean(0), raw["train"].std(0)
    sets = sa.build_sets(ds, cfg, 10)
    assert len(sets["test"][0]) > 512  # two evaluation batches
    for net, cls in (("attention", sa.SetAttention), ("flat_mlp", sa.FlatMLP)):
        model = cls(fs.dim, cfg)
        model.load_state_dict(checkpoint["values"]["best"][net])
        model.eval()
        for split in ("val", "test"):
            idx, target = sets[split]
            x = torch.as_tensor((raw[split][idx] - mean) / std, dtype=torch.float32)
            with torch.no_grad():
                logits = model(x).double().numpy()
            log_p = log_softmax(logits, axis=1)
            acc, top5 = _ranking(logits, target)
            assert metrics[f"{split}/{net}/acc"] == pytest.approx(acc), (net, split)
            assert metrics[f"{split}/{net}/top5"] == pytest.approx(top5), (net, split)
            assert metrics[f"{split}/{net}/loss"] == pytest.approx(-log_p[np.arange(len(target)), target].mean(), rel=1e-4)


def test_patience_stops_each_net_on_its_own_val_curve(long_run):
    """With patience 2 each net stops after 2 epochs without a better val top-1, read off the
    val curves of a run that never stops, and the other net trains on as if nothing stopped.
    Mutations caught: patience ignored, a stopped net still trained (its train loss reported), a
    stopped net moving the other's results, a net stopped before the end reported at its last
    weights rather than its best."""
    curves = {net: [m[f"val/{net}/acc"] for m, _ in long_run[:-1]] for net in sa.NETS}
    stop = {}
    for net, accs in curves.items():
        stopper = EarlyStopping(2)
        stop[net] = next((e for e, acc in enumerate(accs, 1) if stopper.step(acc)), LONG)
    short = run(config(epochs=LONG, patience=2))
    last = max(stop.values())
    assert [m["epoch"] for m, _ in short] == list(range(1, last + 1))
    assert last < LONG  # this config stops early
    assert [c["done"] for _, c in short] == [False] * (last - 1) + [True]
    assert run(config(epochs=LONG, patience=2), restore=short[-1][1]) == []  # a stopped trial stays stopped
    for e, (metrics, _) in enumerate(short[:-1], 1):
        for net in sa.NETS:
            assert (f"val/{net}/acc" in metrics) == (e <= stop[net]), (net, e)
            if e <= stop[net]:
                assert metrics[f"val/{net}/acc"] == curves[net][e - 1]
                assert metrics[f"train/{net}/loss"] == long_run[e - 1][0][f"train/{net}/loss"]
    for e, (metrics, _) in enumerate(short, 1):  # the last report too: the net that stopped first trains no more in it
        for net in sa.NETS:
            assert (f"train/{net}/loss" in metrics) == (e <= stop[net]), (net, e)  # a stopped net trains no more
    for net in sa.NETS:  # each net, stopped early or at the end, is reported at its best val epoch's weights
        best_epoch = int(np.argmax(curves[net][:stop[net]])) + 1
        assert pick(short[-1][0], f"val/{net}/") == pick(short[best_epoch - 1][0], f"val/{net}/"), (net, best_epoch)


def test_max_train_and_max_test_0_mean_the_whole_split():
    """0 is the YAML's 'the whole split' for both caps. Mutations caught: 0 handed to
    load_dataset as a size."""
    whole = load_dataset("digits")
    assert len(sa.load_data(config(max_train=0)).train.labels) == len(whole.train.labels)
    assert len(sa.load_data(config(max_test=0)).test.labels) == len(whole.test.labels)
    assert len(sa.load_data(config(max_test=200)).test.labels) == 200


def test_test_split_changes_only_test_metrics(base_run):
    """max_test changes only the test split (val and train are carved first): every train, val
    and info figure of every report must stay the same. Mutations caught: standardising with
    test statistics, selecting on test, test sets drawn into training."""
    assert_same_outside_test(base_run, run(config(max_test=200)))  # the whole test split vs 200 images


def test_val_split_is_used_for_selection_and_reporting_only(base_run, monkeypatch):
    """A different val split (its images mirrored) leaves training untouched: every epoch's
    train loss and the test baselines stay the same. Mutations caught: standardising with val
    statistics, val sets trained on."""
    cfg, plain = config(), base_run
    load = sa.load_data

    def mirrored_val(c):
        return with_mirrored_val(load(c))

    monkeypatch.setattr(sa, "load_data", mirrored_val)
    other = run(cfg)
    for (ma, _), (mb, _) in zip(plain, other):
        assert pick(ma, "train/") == pick(mb, "train/")
    assert pick(plain[-1][0], "val/farthest_from_mean/") != pick(other[-1][0], "val/farthest_from_mean/")
    for method in ("random", "farthest_from_mean"):
        assert pick(plain[-1][0], f"test/{method}/") == pick(other[-1][0], f"test/{method}/")


def test_cache_dir_is_where_the_features_come_from(tmp_path, monkeypatch):
    """A config's cache_dir is the cache train() reads: with a copy of the session's cache there
    and an empty default cache, nothing is built in the default one. Mutations caught: the
    cache_dir key ignored (the default cache used)."""
    shutil.copytree(default_cache_dir(), tmp_path / "cache")
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "default"))
    reports = run(config(epochs=1, cache_dir=str(tmp_path / "cache")))
    assert "test/attention/acc" in reports[-1][0]
    assert not (tmp_path / "default").exists()


def test_the_feature_cache_leaves_every_rng_as_it_found_it(tmp_path):
    """Cold (own-cnn trained, encoder built: both draw from and reseed torch) and warm: a family
    that draws from the global RNGs after fetching its features must report the same either way."""
    ds = load_dataset("digits", max_train=100, max_test=50)
    for _ in ("cold", "warm"):
        before = capture_rng()
        extract_features(ds, "own-cnn", device="cpu", cache_dir=tmp_path, progress=False)
        after = capture_rng()
        assert torch.equal(before["torch"], after["torch"])
        assert after["python"] == before["python"]
        assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"]))
