"""attn_knn's wiring, through its real train(): which examples each retrieval sees, what each
split is used for, what each knob changes, that eval-axis values come from the one trained
model, and that every method is what its name says (checked against scikit-learn / numpy
recomputations on the trained model the run ends with).

Spies wrap the family's real functions (they record, never replace): ``refresh_memory`` hands
over the final model, dataset and memory bank; ``minibatches`` + ``KnnIndex.search`` pair each
training batch with the retrieval made for it.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.neighbors import KNeighborsClassifier

import trainables.attn_knn as attn_knn
from trainables.common.data import augment, load_dataset
from trainables.common.knn import KnnIndex
from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)
from test_attn_knn import SPACE

KS, VIEWS = [1, 5], [1, 2]


def config(**overrides):
    smoke = SPACE["studies"]["smoke"]
    cfg = {**SPACE["defaults"], **smoke["set"], "seed": 0, "device": "cpu", "max_train": 200, "max_test": 150,
           "k_eval": 5, "temperature": 0.1, "eval": {"k": KS, "tta_views": VIEWS}}  # not the default 0.07
    return {**cfg, **overrides}


class Recorder:
    """Runs train() with spies on the family's own functions."""

    def __init__(self, monkeypatch):
        self.memories, self.events, self.ms, self.wall_s = [], [], [], None
        real_refresh, real_batches, real_search = attn_knn.refresh_memory, attn_knn.minibatches, KnnIndex.search
        real_ms = Trial.ms

        def refresh(memory, model, ds, *args, **kwargs):
            out = real_refresh(memory, model, ds, *args, **kwargs)
            self.memories.append((out, model, ds))
            return out

        def batches(*args, **kwargs):
            for idx in real_batches(*args, **kwargs):
                self.events.append(("batch", idx.clone()))
                yield idx

        def search(index, q, k, exclude=None):
            sims, idx = real_search(index, q, k, exclude=exclude)
            self.events.append(("search", k, None if exclude is None else torch.as_tensor(exclude).clone(),
                                torch.as_tensor(idx).clone()))
            return sims, idx

        def ms(trial, phase):
            value = real_ms(trial, phase)
            self.ms.append((phase, value))
            return value

        monkeypatch.setattr(attn_knn, "refresh_memory", refresh)
        monkeypatch.setattr(Trial, "ms", ms)
        monkeypatch.setattr(attn_knn, "minibatches", batches)
        monkeypatch.setattr(KnnIndex, "search", search)

    def run(self, cfg):
        reports, began = [], time.perf_counter()
        attn_knn.train(cfg, lambda metrics, checkpoint=None: reports.append(metrics))
        self.wall_s = time.perf_counter() - began
        return reports

    @property
    def final(self):
        return self.memories[-1]

    def training_retrievals(self):
        """(batch indices, search k, exclude, returned neighbour indices) of every training batch."""
        out = []
        for first, second in zip(self.events, self.events[1:]):
            if first[0] == "batch" and second[0] == "search":
                out.append((first[1], *second[1:]))
        return out


def run_recorded(monkeypatch, **overrides):
    rec = Recorder(monkeypatch)
    reports = rec.run(config(**overrides))
    return rec, reports


@pytest.fixture(scope="module")
def recorded():
    mp = pytest.MonkeyPatch()  # undone right after the run, so later tests' trainings are not recorded here
    try:
        return run_recorded(mp, epochs=2)
    finally:
        mp.undo()


def clean_embeddings(model, ds, images):
    """cnn probabilities and embeddings of clean images, computed here (eval mode, no TTA)."""
    model.eval()
    with torch.no_grad():
        features = model.backbone(ds.to_float(images))
        cnn_logits = features @ model.cnn_head.weight.T + model.cnn_head.bias  # a linear head on the backbone
        first, second = model.projector[0], model.projector[2]  # the MLP written out: linear, ReLU, linear
        hidden = torch.relu(features @ first.weight.T + first.bias)
        z = torch.nn.functional.normalize(hidden @ second.weight.T + second.bias, dim=1)
    return softmax(cnn_logits.double().numpy(), axis=1), z.double().numpy()


def close(reported: dict, prefix: str, probs: np.ndarray, labels: np.ndarray, tol=1e-6):
    expected = classification_metrics(probs, labels)
    for metric, value in expected.items():
        assert reported[f"{prefix}/{metric}"] == pytest.approx(value, abs=tol), f"{prefix}/{metric}"


# ---------------------------------------------------------------- which examples each retrieval may see


def test_training_never_retrieves_a_query_among_its_own_neighbours(recorded):
    rec, _ = recorded
    retrievals = rec.training_retrievals()
    cfg = config(epochs=2)
    assert len(retrievals) == 2 * -(-len(rec.final[2].train) // cfg["batch_size"])  # one retrieval per training batch
    for idx, k, _, neighbours in retrievals:
        assert k == cfg["k_train"] and neighbours.shape == (len(idx), cfg["k_train"])
        assert not (neighbours == idx.view(-1, 1)).any(), "a training image retrieved itself"


def test_mixup_excludes_both_source_images(monkeypatch):
    rec, _ = run_recorded(monkeypatch, mixup_alpha=0.4)
    for idx, _, exclude, neighbours in rec.training_retrievals():
        assert exclude.shape == (len(idx), 2) and torch.equal(exclude[:, 0], idx)
        assert sorted(exclude[:, 1].tolist()) == sorted(idx.tolist())  # the partner is another image of the batch
        assert not (neighbours.unsqueeze(2) == exclude.unsqueeze(1)).any()


def test_memory_bank_is_the_training_split_under_the_final_model(recorded):
    rec, _ = recorded
    memory, model, ds = rec.final
    _, z_train = clean_embeddings(model, ds, ds.train.images)
    clean = load_dataset("digits", max_train=200, max_test=150)
    np.testing.assert_array_equal(ds.train.images, clean.train.images)  # the training split, nothing else
    assert len(memory.index) == len(ds.train)
    np.testing.assert_allclose(memory.bank.double().numpy(), z_train, atol=1e-5)
    np.testing.assert_array_equal(memory.labels.numpy(), ds.train.labels)


# ---------------------------------------------------------------- methods are what their names say


def test_every_method_recomputed_independently_on_the_trained_model(recorded):
    """Every reported test metric at one view, every k, from the final model and the
    training bank: uniform and distance votes by scikit-learn / numpy, attention over the
    scikit-learn neighbours, the cnn head as a linear layer on the backbone."""
    rec, reports = recorded
    memory, model, ds = rec.final
    last, cfg = reports[-1], config(epochs=2)
    clean = load_dataset("digits", max_train=200, max_test=150)
    np.testing.assert_array_equal(ds.test.labels, clean.test.labels)
    cnn_probs, z_test = clean_embeddings(model, ds, ds.test.images)
    bank = memory.bank.double().numpy()
    close(last, "test/cnn:tta_views:1", cnn_probs, ds.test.labels)
    for k in KS:
        knn = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(bank, ds.train.labels)
        close(last, f"test/uniform_knn:k:{k}:tta_views:1", knn.predict_proba(z_test), ds.test.labels)
        nbr = knn.kneighbors(z_test, return_distance=False)
        sims = np.take_along_axis(z_test @ bank.T, nbr, 1)
        weights = softmax(sims / cfg["temperature"], axis=1)
        votes = np.zeros((len(z_test), ds.num_classes))
        np.add.at(votes, (np.arange(len(z_test))[:, None], ds.train.labels[nbr]), weights)
        close(last, f"test/distance_knn:k:{k}:tta_views:1", votes, ds.test.labels, tol=1e-5)
        with torch.no_grad():
            logits = model.attention(torch.from_numpy(z_test).float(), memory.bank[torch.from_numpy(nbr)],
                                     memory.labels[torch.from_numpy(nbr)])
        close(last, f"test/attn_knn:k:{k}:tta_views:1", softmax(logits.double().numpy(), axis=1), ds.test.labels, tol=1e-5)


def test_uniform_knn_is_uniform_and_attention_at_k1_reads_only_the_neighbours_label(recorded):
    rec, reports = recorded
    memory, model, ds = rec.final
    probs, _ = attn_knn.predict(model, ds, ds.test.images, memory, [1, 5], [1], config(epochs=2), torch.device("cpu"), False)
    uniform = probs["uniform_knn", 5, 1]
    np.testing.assert_allclose(uniform * 5, np.round(uniform * 5), atol=1e-9)  # fractions of 5 votes
    _, z = clean_embeddings(model, ds, ds.test.images)
    nearest_label = ds.train.labels[np.argmax(z @ memory.bank.double().numpy().T, axis=1)]
    attn1 = probs["attn_knn", 1, 1]
    for c in np.unique(nearest_label):  # one key: the attention output is a function of its label only
        rows = attn1[nearest_label == c]
        np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-6)
    np.testing.assert_array_equal(probs["uniform_knn", 1, 1].argmax(1), nearest_label)


def test_evaluation_attention_is_the_trained_attention_module(recorded):
    """The evaluation's once-projected keys and values give the module's own forward pass on the
    same neighbours, probability by probability (after a short training the attention is close
    to uniform, so the metrics alone would hide a wrong projection)."""
    rec, _ = recorded
    memory, model, ds = rec.final
    probs, z = attn_knn.predict(model, ds, ds.test.images, memory, [5], [1], config(epochs=2), torch.device("cpu"), False)
    _, nbr = memory.index.search(z, 5)
    with torch.no_grad():
        reference = model.attention(z, memory.bank[nbr], memory.labels[nbr]).double().softmax(1).numpy()
    np.testing.assert_allclose(probs["attn_knn", 5, 1], reference, atol=1e-6, rtol=0)


def test_tta_views_average_the_clean_view_and_seeded_translations(recorded):
    rec, reports = recorded
    memory, model, ds = rec.final
    last, cfg = reports[-1], config(epochs=2)
    cnn_clean, _ = clean_embeddings(model, ds, ds.test.images)
    x = ds.to_float(ds.test.images)
    view = augment(x, torch.Generator().manual_seed(cfg["seed"] + 7919), flip=False)  # digits: no flips
    with torch.no_grad():
        cnn_view = model.cnn_head(model.backbone(view)).double().softmax(1).numpy()
    close(last, "test/cnn:tta_views:2", (cnn_clean + cnn_view) / 2, ds.test.labels)
    assert last["test/cnn_tta/nll"] == last["test/cnn:tta_views:2/nll"]


def test_tta_names_are_tta_eval_views_of_one_seeded_stream_of_translations(recorded):
    """evaluate() with three views and tta_eval 2: the ``_tta`` names are the 2-view cell (not the
    widest one), and the 3-view cell averages the clean view with the first two draws of one
    generator seeded once (view 3 is a new translation, not view 2 again)."""
    rec, _ = recorded
    memory, model, ds = rec.final
    cfg = config(epochs=2, tta_eval=2)
    metrics, _, _ = attn_knn.evaluate(model, ds, "test", memory, cfg, torch.device("cpu"), False, ks=[5], views=[1, 2, 3])
    for method in ("cnn", "attn_knn", "distance_knn"):
        cell = "tta_views:{}" if method == "cnn" else "k:5:tta_views:{}"
        assert metrics[f"test/{method}_tta/nll"] == metrics[f"test/{method}:{cell.format(2)}/nll"], method
        assert metrics[f"test/{method}_tta/nll"] != metrics[f"test/{method}:{cell.format(3)}/nll"], method
    x, views = ds.to_float(ds.test.images), torch.Generator().manual_seed(cfg["seed"] + 7919)
    probs = [clean_embeddings(model, ds, ds.test.images)[0]]
    with torch.no_grad():
        for _ in range(2):
            probs.append(model.cnn_head(model.backbone(augment(x, views, flip=False))).double().softmax(1).numpy())
    assert not np.allclose(probs[1], probs[2])
    close(metrics, "test/cnn:tta_views:3", np.mean(probs, axis=0), ds.test.labels)


def test_predict_hands_back_the_clean_views_embeddings(recorded):
    """The embeddings the perf figures time the search with are the clean view's, not the last TTA view's."""
    rec, _ = recorded
    memory, model, ds = rec.final
    _, clean = attn_knn.predict(model, ds, ds.test.images, memory, [5], [1, 2], config(epochs=2), torch.device("cpu"), False)
    _, z = clean_embeddings(model, ds, ds.test.images)
    np.testing.assert_allclose(clean.double().numpy(), z, atol=1e-5)


# ---------------------------------------------------------------- splits: fit, select, report


def test_test_split_is_reported_once_and_never_shapes_training(recorded, monkeypatch):
    _, reports = recorded
    assert not any(key.startswith("test/") for key in reports[0])  # only the final report holds test metrics
    assert SPACE["objective"]["metric"].startswith("val/")
    other = Recorder(monkeypatch).run(config(epochs=2, max_test=60))  # another test split, same train and val
    for a, b in zip(reports, other):
        for key in a:
            if key.startswith(("train/", "val/")):
                assert a[key] == b[key], key


def test_noise_and_imbalance_touch_the_training_split_only(monkeypatch):
    rec, reports = run_recorded(monkeypatch, epochs=1, noise_rate=0.3, imbalance=5.0, max_train=0)
    memory, model, ds = rec.final
    clean = load_dataset("digits", max_test=150)
    np.testing.assert_array_equal(ds.val.labels, clean.val.labels)
    np.testing.assert_array_equal(ds.test.labels, clean.test.labels)
    np.testing.assert_array_equal(ds.test.images, clean.test.images)
    counts = np.bincount(ds.train.labels, minlength=10)
    assert len(ds.train) < len(clean.train)
    true_label = {image.tobytes(): label for image, label in zip(clean.train.images, clean.train.labels)}
    flipped = np.mean([true_label[image.tobytes()] != label for image, label in zip(ds.train.images, ds.train.labels)])
    assert 0.2 < flipped < 0.4  # noise_rate 0.3 reaches the training labels (each flip is to another class)
    np.testing.assert_array_equal(memory.labels.numpy(), ds.train.labels)  # the bank carries the noisy labels
    # the evaluation scores against the clean test labels
    cnn_probs, _ = clean_embeddings(model, ds, ds.test.images)
    close(reports[-1], "test/cnn:tta_views:1", cnn_probs, clean.test.labels)
    assert counts.max() > 2 * counts.min()


# ---------------------------------------------------------------- knobs change what they should, nothing else


def test_temperature_changes_only_the_distance_vote_when_it_is_not_a_loss(monkeypatch):
    base = Recorder(monkeypatch).run(config(knn_loss_weight=0.0, temperature=0.07))[-1]
    warm = Recorder(monkeypatch).run(config(knn_loss_weight=0.0, temperature=5.0))[-1]
    for key in base:
        if key.startswith("perf/"):
            continue
        if "distance_knn" in key and ":k:1:" not in key:  # its vote (and its loss, reported at weight 0)
            continue
        assert base[key] == warm[key], key  # training and every other method untouched
    assert base["test/distance_knn:k:5:tta_views:1/nll"] != warm["test/distance_knn:k:5:tta_views:1/nll"]
    # limits: a high temperature is the uniform vote, a tiny one the nearest neighbour's
    hot = Recorder(monkeypatch).run(config(knn_loss_weight=0.0, temperature=1e6))[-1]
    cold = Recorder(monkeypatch).run(config(knn_loss_weight=0.0, temperature=1e-6))[-1]
    for metric in ("acc", "nll", "brier"):
        assert hot[f"test/distance_knn:k:5:tta_views:1/{metric}"] == pytest.approx(
            hot[f"test/uniform_knn:k:5:tta_views:1/{metric}"], abs=1e-4)
    assert cold["test/distance_knn:k:5:tta_views:1/acc"] == cold["test/uniform_knn:k:1:tta_views:1/acc"]


def test_the_temperature_of_the_knn_loss_is_the_configured_one(monkeypatch):
    a = Recorder(monkeypatch).run(config(temperature=0.07))[-1]
    b = Recorder(monkeypatch).run(config(temperature=0.5))[-1]
    assert a["train/distance_knn/loss"] != b["train/distance_knn/loss"]
    off = Recorder(monkeypatch).run(config(knn_loss_weight=0.0))[-1]
    assert off["train/cnn/loss"] != a["train/cnn/loss"]  # the weight reaches the loss


def test_heads_k_train_and_embed_dim_reach_the_model_and_the_retrieval(monkeypatch):
    rec, _ = run_recorded(monkeypatch, heads=2, embed_dim=64, k_train=7)
    _, model, _ = rec.final
    assert model.attention.attention.num_heads == 2 and model.attention.attention.embed_dim == 64
    assert {k for _, k, _, _ in rec.training_retrievals()} == {7}


def test_k_eval_and_tta_eval_pick_the_plain_and_tta_names(recorded, monkeypatch):
    _, reports = recorded
    last = reports[-1]
    for method in ("uniform_knn", "distance_knn", "attn_knn"):
        assert last[f"test/{method}/acc"] == last[f"test/{method}:k:5:tta_views:1/acc"]
    other = Recorder(monkeypatch).run(config(epochs=2, k_eval=1, tta_eval=1, eval={"k": KS, "tta_views": [1]}))[-1]
    for method in ("uniform_knn", "distance_knn", "attn_knn"):
        assert other[f"test/{method}/nll"] == last[f"test/{method}:k:1:tta_views:1/nll"]
        assert other[f"test/{method}_tta/nll"] == other[f"test/{method}/nll"]


# ---------------------------------------------------------------- eval axes: one trained model


def test_eval_axis_values_come_from_one_model_and_equal_the_naive_runs(recorded, monkeypatch):
    """Every (k, views) cell of the eval-axes run equals a run that trains for that one cell."""
    _, reports = recorded
    last = reports[-1]
    assert [r["epoch"] for r in reports] == [1, 2]  # one training
    for k, n in ((1, 2), (5, 2)):
        naive = Recorder(monkeypatch).run(config(epochs=2, k_eval=k, tta_eval=n, eval={"k": [k], "tta_views": [n]}))[-1]
        for method in ("uniform_knn", "distance_knn", "attn_knn"):
            for metric in ("acc", "nll", "ece"):
                assert naive[f"test/{method}_tta/{metric}"] == last[f"test/{method}:k:{k}:tta_views:{n}/{metric}"]


# ---------------------------------------------------------------- training: the documented loss, AdamW, every batch


class TrainingSpy:
    """Records, without replacing anything, what one epoch of train() did: the model and memory
    bank it started from (copied at the first refresh, before any step), each batch's indices,
    augmented images, the images the model was fed (after mixup), and the total loss it stepped on."""

    def __init__(self, monkeypatch):
        self.start, self.final, self.recording = None, None, True
        self.batches, self.augmented, self.fed, self.excluded, self.totals = [], [], [], [], []
        self.betas = []  # ((a, b), draw) of every Beta draw of the trial's numpy streams
        real_refresh, real_batches, real_augment = attn_knn.refresh_memory, attn_knn.minibatches, attn_knn.augment
        real_forward, real_diverged, real_search = attn_knn.AttnKnnNet.forward, attn_knn.is_diverged, KnnIndex.search

        def refresh(memory, model, ds, *args, **kwargs):
            out = real_refresh(memory, model, ds, *args, **kwargs)
            if self.start is None:
                self.start = (copy.deepcopy(model.state_dict()), out.bank.clone(), out.labels.clone())
            self.final = (model, ds)
            return out

        def batches(*args, **kwargs):
            for idx in real_batches(*args, **kwargs):
                self.batches.append(idx.clone())
                yield idx

        def augment(x, generator, **kwargs):
            out = real_augment(x, generator, **kwargs)
            self.augmented.append(out.clone())
            return out

        def forward(model, x):
            if model.training and self.recording:
                self.fed.append(x.detach().clone())
            return real_forward(model, x)

        def search(index, q, k, exclude=None):
            if exclude is not None:  # training's searches: evaluation excludes nothing
                self.excluded.append(torch.as_tensor(exclude).clone())
            return real_search(index, q, k, exclude=exclude)

        def diverged(loss):
            self.totals.append(float(loss.detach()))
            return real_diverged(loss)

        for name, spy in (("refresh_memory", refresh), ("minibatches", batches), ("augment", augment), ("is_diverged", diverged)):
            monkeypatch.setattr(attn_knn, name, spy)
        monkeypatch.setattr(attn_knn.AttnKnnNet, "forward", forward)
        monkeypatch.setattr(KnnIndex, "search", search)
        real_numpy_rng, betas = Trial.numpy_rng, self.betas

        class BetaSpy:  # the trial's numpy generator, its Beta draws recorded
            def __init__(self, rng):
                self.rng = rng

            def beta(self, a, b, *args, **kwargs):
                draw = self.rng.beta(a, b, *args, **kwargs)
                betas.append(((a, b), draw))
                return draw

            def __getattr__(self, name):
                return getattr(self.rng, name)

        monkeypatch.setattr(Trial, "numpy_rng", lambda trial, *stream: BetaSpy(real_numpy_rng(trial, *stream)))

    def run(self, cfg):
        reports = []
        attn_knn.train(cfg, lambda metrics, checkpoint=None: reports.append(metrics))
        self.recording = False
        return reports


def smoothed_ce(logits, y, eps):
    """Cross-entropy against (1 - eps) one-hot + eps uniform, written out."""
    logp = torch.log_softmax(logits, 1)
    return -((1 - eps) * logp.gather(1, y.view(-1, 1)).squeeze(1) + eps * logp.mean(1)).mean()


def nearest_excluding(z, bank, own, k):
    """The k most similar bank rows of each query, its own row(s) ``own`` (B, m) left out (numpy)."""
    sims = z @ bank.T
    np.put_along_axis(sims, own, -np.inf, 1)
    order = np.lexsort((np.broadcast_to(np.arange(len(bank)), sims.shape), -sims), axis=1)
    return order[:, :k]


def mixing_weight(fed, a, b):
    """(w_a, w_b) of fed = w_a * a + w_b * b, by least squares over every pixel."""
    design = np.stack([a.double().numpy().ravel(), b.double().numpy().ravel()], 1)
    (w_a, w_b), *_ = np.linalg.lstsq(design, fed.double().numpy().ravel(), rcond=None)
    return w_a, w_b


def assert_same_weights(trained, ref, embed_dim):
    """Every weight and BatchNorm statistic the same, up to Adam's view of float noise: it scales
    each gradient by its own running size, so a gradient that is zero in exact arithmetic (the
    attention's key bias: softmax ignores a shift shared by all scores) takes a full-size step
    from rounding alone. Those entries are left out, and at most 0.5% of a tensor's entries (other
    near-zero gradients) may differ by more than 1e-5."""
    expected = ref.state_dict()
    for name, value in trained.state_dict().items():
        a, b = value.double().flatten(), expected[name].double().flatten()
        if name == "attention.attention.in_proj_bias":
            keep = torch.ones(len(a), dtype=torch.bool)
            keep[embed_dim : 2 * embed_dim] = False
            a, b = a[keep], b[keep]
        off = ((a - b).abs() > 1e-5 + 1e-4 * b.abs()).double().mean()
        assert off <= 0.005, f"{name}: {float(off):.1%} of the entries differ"


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_training_steps_are_the_documented_loss_under_adamw(monkeypatch, mixup):
    """One epoch of two batches replayed by hand from the recorded start: retrieval of k_train
    neighbours from the start's bank without the own image(s) (numpy), the loss written out
    (smoothed CE of the cnn head and of the attention, knn_loss_weight x the NLL of the
    softmax(sim / T) vote; with mixup each term mixed by the fitted lambda, the step's draw from
    Beta(mixup_alpha, mixup_alpha)), stepped by torch's
    AdamW with the config's lr and weight decay. The reported mean losses, each step's total and
    the trained weights must all match."""
    cfg = config(max_train=40, max_test=30, batch_size=20, epochs=1, k_train=6, lr=0.01, weight_decay=0.2,
                 knn_loss_weight=0.5, label_smoothing=0.2, mixup_alpha=mixup, tta_eval=1, eval={"k": [5], "tta_views": [1]})
    spy = TrainingSpy(monkeypatch)
    reports = spy.run(cfg)
    (model, ds), (state, bank, labels) = spy.final, spy.start
    steps = list(zip(spy.batches, spy.augmented, spy.fed, spy.excluded, spy.totals))
    assert len(steps) == len(spy.batches) == len(spy.totals) == 2  # 40 images, batches of 20: one step each
    ref = attn_knn.AttnKnnNet(cfg, ds)
    ref.load_state_dict(state)
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    eps, train_labels = cfg["label_smoothing"], torch.as_tensor(ds.train.labels)
    sums = {"cnn": 0.0, "attn_knn": 0.0, "distance_knn": 0.0}
    for idx, x, fed, exclude, total in steps:
        y = train_labels[idx]
        if mixup:
            partner = torch.tensor([int((idx == j).nonzero()) for j in exclude[:, 1]])  # position in the batch
            w_a, w_b = mixing_weight(fed, x, x[partner])
            assert 0 < w_a < 1 and w_b == pytest.approx(1 - w_a, abs=1e-6)
            shape, lam = spy.betas.pop(0)  # this step's draw: lambda ~ Beta(mixup_alpha, mixup_alpha)
            assert shape == (mixup, mixup) and w_a == pytest.approx(lam, abs=1e-5)
            targets, own = [(y, w_a), (y[partner], 1 - w_a)], torch.stack([idx, idx[partner]], 1)
        else:
            torch.testing.assert_close(fed, x, rtol=0, atol=0)  # no mixup: the augmented batch itself
            targets, own = [(y, 1.0)], idx.view(-1, 1)
        cnn_logits, z = ref(fed)
        nbr = torch.from_numpy(nearest_excluding(z.detach().double().numpy(), bank.double().numpy(), own.numpy(), cfg["k_train"]))
        attn_logits = ref.attention(z, bank[nbr], labels[nbr])
        weights = torch.softmax((z.unsqueeze(1) * bank[nbr]).sum(-1) / cfg["temperature"], 1)
        vote = torch.zeros(len(z), ds.num_classes).scatter_add(1, labels[nbr], weights)
        terms = {"cnn": sum(w * smoothed_ce(cnn_logits, t, eps) for t, w in targets),
                 "attn_knn": sum(w * smoothed_ce(attn_logits, t, eps) for t, w in targets),
                 "distance_knn": sum(w * -torch.log(vote.gather(1, t.view(-1, 1)).clamp_min(1e-8)).mean() for t, w in targets)}
        loss = terms["cnn"] + terms["attn_knn"] + cfg["knn_loss_weight"] * terms["distance_knn"]
        assert total == pytest.approx(loss.item(), rel=1e-5)
        for name, term in terms.items():
            sums[name] += term.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert spy.betas == []  # one draw per mixed step, none without mixup
    for name, value in sums.items():
        assert reports[-1][f"train/{name}/loss"] == pytest.approx(value / 2, rel=1e-5), name
    assert_same_weights(model, ref, cfg["embed_dim"])


# ---------------------------------------------------------------- perf figures: what is timed, per what


def test_timings_are_per_query_and_the_attention_net_of_the_distance_vote(recorded, monkeypatch):
    """On a fake clock that each timed call advances by a known amount (the calls themselves run
    for real): search ms per query, and attention ms minus distance-vote ms per query, both on the
    k_eval neighbours of the given queries."""
    rec, _ = recorded
    memory, model, ds = rec.final
    cfg, clock, calls = config(epochs=2), [100.0], []
    z = torch.nn.functional.normalize(torch.randn(40, memory.bank.shape[1], generator=torch.Generator().manual_seed(1)), dim=1)

    def ticking(name, fn, seconds):
        def timed(*args, **kwargs):
            clock[0] += seconds
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return timed

    monkeypatch.setattr(attn_knn, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(memory.index, "search", ticking("search", memory.index.search, 0.003))
    monkeypatch.setattr(attn_knn, "softmax_vote", ticking("vote", attn_knn.softmax_vote, 0.002))
    monkeypatch.setattr(attn_knn, "attend_all", ticking("attend", attn_knn.attend_all, 0.007))
    out = attn_knn.timings(model, ds, memory, z, cfg, torch.device("cpu"))
    assert out["perf/search_ms_per_query"] == pytest.approx(3.0 / 40)
    assert out["perf/attention_ms_per_query"] == pytest.approx((7.0 - 2.0) / 40)
    (_, (q, k), _), nbr = calls[0], calls[-1][1][3]
    assert q is z and k == cfg["k_eval"] and nbr.shape == (40, cfg["k_eval"])
    assert calls[2][1][3] == cfg["temperature"]  # the vote timed is the distance-weighted one


def test_epoch_ms_is_the_timed_epochs_over_their_count(recorded):
    rec, reports = recorded
    assert [phase for phase, _ in rec.ms] == ["epoch"]  # read once, for the final report
    total = rec.ms[0][1]
    assert reports[-1]["perf/epoch_ms"] == total / 2 and 0 < total < 1000 * rec.wall_s


# ---------------------------------------------------------------- hflip reaches training and the TTA views


@pytest.mark.parametrize("hflip,name,flip", [("always", "digits", True), ("never", "digits", False),
                                             ("auto", "digits", False), ("auto", "cifar10", True)])
def test_hflip_reaches_the_training_batches_and_the_tta_views(monkeypatch, hflip, name, flip):
    """auto: flips for every dataset but digits (not mirror-symmetric); here digits' images under
    another dataset's name stand in for it."""
    seen, real, load = [], attn_knn.augment, attn_knn.load_data
    monkeypatch.setattr(attn_knn, "augment", lambda x, generator, **kw: seen.append(kw) or real(x, generator, **kw))
    monkeypatch.setattr(attn_knn, "load_data", lambda cfg: dataclasses.replace(load(cfg), name=name))
    Recorder(monkeypatch).run(config(max_train=30, max_test=20, epochs=1, hflip=hflip))
    assert seen == [{"flip": flip}] * 3  # one training batch, then view 2 of val and of test
