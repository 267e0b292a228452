"""Attn-KNN (seed 000): does learned attention over retrieved neighbours beat uniform and
distance-weighted kNN in accuracy and calibration, and what does test-time augmentation add?

Model: a backbone (``small_cnn``, or ``resnet18``/``resnet50`` with a CIFAR stem: 3x3 conv1, no
max-pool) gives features f; a linear head on f is the ``cnn`` baseline; an MLP projection of f,
L2-normalised, is the embedding z. A memory bank holds z of every training image (clean view,
eval mode) in a :class:`~trainables.common.knn.KnnIndex`. It is recomputed from scratch before
the first epoch and after every epoch (no momentum bank), so epoch e trains against the
embeddings of the model at the end of epoch e-1.

Methods, all reading the same k retrieved neighbours of z:

- ``uniform_knn``: the fraction of neighbours in each class;
- ``distance_knn``: neighbour weights softmax(sim / temperature) summed per class (DINO's kNN);
- ``attn_knn``: multi-head attention, query z, keys the neighbours' embeddings, values learned
  embeddings of the neighbours' labels; the attended vector -> linear -> class logits;
- ``cnn``: the linear head, trained jointly with the rest (one shared backbone).

Training goes through the retrieval used at evaluation: every batch retrieves its ``k_train``
neighbours from the training-set bank with its own images excluded (both source images when
mixup mixes two). Loss = CE(cnn) + CE(attn_knn) + ``knn_loss_weight`` * NLL(distance_knn vote,
recomputed differentiably from z), the last a neighbourhood-component loss that shapes the
embedding the uniform and distance votes use. The CE terms use ``label_smoothing``; with
``mixup_alpha`` > 0 images are mixed (lambda ~ Beta(a, a)) and every loss mixes its two targets.
AdamW, cosine learning-rate decay over ``epochs``, random translation (+ horizontal flip per
``hflip``) of training images.

Evaluation: view 0 is the clean image, views 1.. are random translations (+ flips); with
``tta_views`` = n the class probabilities of the first n views are averaged. ``k`` and
``tta_views`` are eval axes (``test/attn_knn:k:16:tta_views:5/acc``; ``cnn`` has only
``tta_views``); plain names (``test/attn_knn/acc``) are k = ``k_eval`` without TTA, and
``<method>_tta`` names are k = ``k_eval`` with ``tta_eval`` views. One search at the largest k
serves every k (the index's order is canonical, so a sliced search is the search at that k),
and the attention's keys (of the whole bank) and values (of each class) are projected once per
evaluation rather than once per (query, neighbour) pair. The test split's reliability bins of
every reported ECE go to the trial's ``reliability.json``.

``check`` refuses what ``train`` cannot run before anything starts (heads not dividing
embed_dim, k / k_eval / k_train + excluded own images beyond the training set's size, read
from labels only; ImageNet weights for small_cnn, or missing while ORCHESTRATE_OFFLINE is set).
The trial's seeding, checkpoint, resume and divergence report are
:class:`~trainables.common.lifecycle.Trial`'s; ImageNet weights come from
:func:`~trainables.common.encoders.imagenet_state_dict`, the one resolver every family uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.common.checks import ConfigError, require
from trainables.common.data import DataError, Dataset, augment, load_dataset, train_class_counts, with_imbalance, with_label_noise
from trainables.common.encoders import imagenet_state_dict, imagenet_weights_problem
from trainables.common.knn import KnnIndex, softmax_vote, uniform_vote
from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics, metric_key, prefixed
from trainables.common.training import autocast, is_diverged, minibatches, resolve_device, to_device

KNN_METHODS = ("uniform_knn", "distance_knn", "attn_knn")
EVAL_BATCH = 512


# ---------------------------------------------------------------- model


def small_cnn(channels: int, image_size: int) -> tuple[nn.Module, int]:
    """Three conv-BN-ReLU blocks (32, 64, 128 channels), 2x max-pooled after the first two while
    the map is at least 4 pixels wide (8x8 digits: 8 -> 4 -> 2; 32x32: 32 -> 16 -> 8), then global
    average pooling."""
    layers, size, width_in = [], image_size, channels
    for i, width in enumerate((32, 64, 128)):
        layers += [nn.Conv2d(width_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if i < 2 and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 128


def cifar_resnet(name: str, channels: int, pretrained: str) -> tuple[nn.Module, int]:
    """A torchvision ResNet with a CIFAR stem (3x3 stride-1 conv1, no max-pool) and no fc.
    ``pretrained="imagenet"`` loads the project's one ImageNet checkpoint of ``name``
    (:func:`trainables.common.encoders.imagenet_state_dict`) into every layer but the replaced
    conv1 (and the dropped fc)."""
    from torchvision import models

    net = getattr(models, name)(weights=None)
    if pretrained == "imagenet":
        net.load_state_dict(imagenet_state_dict(name))
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def build_backbone(name: str, channels: int, image_size: int, pretrained: str) -> tuple[nn.Module, int]:
    if name == "small_cnn":
        return small_cnn(channels, image_size)
    return cifar_resnet(name, channels, pretrained)


class NeighbourAttention(nn.Module):
    """Class logits from multi-head attention of a query embedding over its k neighbours:
    keys are the neighbours' embeddings, values embeddings of their labels."""

    def __init__(self, embed_dim: int, heads: int, num_classes: int):
        super().__init__()
        self.label_embedding = nn.Embedding(num_classes, embed_dim)
        self.attention = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
        self.classify = nn.Linear(embed_dim, num_classes)

    def forward(self, z: torch.Tensor, neighbours: torch.Tensor, neighbour_labels: torch.Tensor) -> torch.Tensor:
        """z (B, D), neighbours (B, k, D), neighbour_labels (B, k) -> logits (B, C)."""
        attended, _ = self.attention(z.unsqueeze(1), neighbours, self.label_embedding(neighbour_labels), need_weights=False)
        return self.classify(attended.squeeze(1))

    def project(self, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention's keys of every bank entry (N, D) and values of every class (C, D):
        projected once per evaluation, where ``forward`` projects each (query, neighbour) pair."""
        w_q, w_k, w_v = self.attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attention.in_proj_bias.chunk(3)
        return F.linear(bank, w_k, b_k), F.linear(self.label_embedding.weight, w_v, b_v)

    def scores(self, z: torch.Tensor, keys: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """Scaled attention logits of each query over its neighbours (bank indices, (B, k)) on
        projected keys (:meth:`project`): (B, H, k). Each is a sum over one head's features, the
        same whatever k is, so the first k columns of the scores at a larger k are exactly the
        scores at k (one computation serves every k of an eval axis)."""
        mha, (b, k) = self.attention, neighbours.shape
        heads, d = mha.num_heads, mha.head_dim
        w_q, b_q = mha.in_proj_weight.chunk(3)[0], mha.in_proj_bias.chunk(3)[0]
        q = F.linear(z, w_q, b_q).view(b, heads, 1, d)
        key = keys[neighbours].view(b, k, heads, d).transpose(1, 2)  # (B, H, k, d)
        return (q * key).sum(-1) / math.sqrt(d)

    def combine(self, scores: torch.Tensor, values: torch.Tensor, neighbour_labels: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) from :meth:`scores` (B, H, k) and the projected class values of the
        neighbours' labels (B, k)."""
        (b, heads, k), d = scores.shape, self.attention.head_dim
        value = values[neighbour_labels].view(b, k, heads, d).transpose(1, 2)  # (B, H, k, d)
        attended = (scores.softmax(-1).unsqueeze(-2) @ value).reshape(b, heads * d)
        return self.classify(self.attention.out_proj(attended))

    def attend(self, z: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, neighbours: torch.Tensor,
               neighbour_labels: torch.Tensor) -> torch.Tensor:
        """``forward`` on projected keys and values (:meth:`project`): z (B, D), bank indices and
        labels of the neighbours (B, k) -> logits (B, C). The same function, up to float rounding."""
        return self.combine(self.scores(z, keys, neighbours), values, neighbour_labels)


class AttnKnnNet(nn.Module):
    def __init__(self, cfg: dict, ds: Dataset):
        super().__init__()
        self.backbone, features = build_backbone(cfg["backbone"], ds.channels, ds.image_size, cfg["pretrained"])
        self.cnn_head = nn.Linear(features, ds.num_classes)
        self.projector = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, cfg["embed_dim"]))
        self.attention = NeighbourAttention(cfg["embed_dim"], cfg["heads"], ds.num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cnn logits, L2-normalised embedding)."""
        f = self.backbone(x)
        return self.cnn_head(f), F.normalize(self.projector(f), dim=1)


# ---------------------------------------------------------------- memory bank and predictions


@dataclass
class Memory:
    """Training-set embeddings: searchable (``index``) and gatherable (``bank``), with labels."""

    index: KnnIndex
    bank: torch.Tensor  # (N, D) on the model's device
    labels: torch.Tensor  # (N,) on the model's device


def forward_all(model: AttnKnnNet, ds: Dataset, images: np.ndarray, device, view_generator=None, flip=False):
    """(cnn probabilities, embeddings) of ``images`` in eval mode; with ``view_generator`` an
    augmented view (translation, + flip when ``flip``) instead of the clean one. Both float32,
    also when the forward pass runs in bf16 on CUDA."""
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        model.eval()
        probs, embeddings = [], []
        for start in range(0, len(images), EVAL_BATCH):
            x = ds.to_float(to_device(torch.from_numpy(images[start : start + EVAL_BATCH]), device), device)
            if view_generator is not None:
                x = augment(x, view_generator, flip=flip)
            with autocast(device):
                logits, z = model(x)
            probs.append(logits.float().softmax(1))
            embeddings.append(z.float())
        return torch.cat(probs), torch.cat(embeddings)


def refresh_memory(memory: Memory | None, model: AttnKnnNet, ds: Dataset, device, use_gpu: bool) -> Memory:
    _, bank = forward_all(model, ds, ds.train.images, device)
    if memory is None:
        memory = Memory(KnnIndex(bank.shape[1], use_gpu=use_gpu), bank, torch.as_tensor(ds.train.labels, device=device))
    memory.index.reset()
    memory.index.add(bank)
    memory.bank = bank
    return memory


def attend_all(model: AttnKnnNet, z: torch.Tensor, memory: Memory, neighbours: torch.Tensor, projected=None,
               ks: list[int] | None = None) -> dict[int, torch.Tensor]:
    """attn_knn probabilities of every query for each k in ``ks`` (default: every neighbour in
    ``neighbours``, (B, max k) in the search's order), in batches: the bank's keys and the
    classes' values projected once (``projected``: :meth:`NeighbourAttention.project`), the
    scores over the widest k computed once and each k attending over its first k (copied to
    their own tensor, so each k runs the very computation an evaluation at that k alone runs)."""
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        model.eval()
        ks = ks or [neighbours.shape[1]]
        out: dict[int, list] = {k: [] for k in ks}
        with autocast(z.device):
            keys, values = projected if projected is not None else model.attention.project(memory.bank)
            for s in range(0, len(z), EVAL_BATCH):
                nbr = neighbours[s : s + EVAL_BATCH, : max(ks)]
                scores, labels = model.attention.scores(z[s : s + EVAL_BATCH], keys, nbr), memory.labels[nbr]
                for k in ks:
                    logits = model.attention.combine(scores[..., :k].contiguous(), values, labels[:, :k].contiguous())
                    out[k].append(logits.float().softmax(1))
        return {k: torch.cat(parts) for k, parts in out.items()}


def predict(model, ds, images, memory, ks, views, cfg, device, flip) -> tuple[dict[tuple, np.ndarray], torch.Tensor]:
    """Class probabilities averaged over the first n views for every n in ``views``:
    ``{(method, k, n): probs}`` with k None for cnn, and the clean view's embeddings. One search
    at max(ks) serves every k (the search's order is canonical, so its first k are what a search
    at k returns), one pass per view serves every n, and the attention's keys and values are
    projected once for all of them."""
    view_generator = torch.Generator().manual_seed(cfg["seed"] + 7919)  # the same views for every model
    with torch.no_grad(), autocast(device):
        projected = model.attention.project(memory.bank)
    sums, out, clean = {}, {}, None
    for v in range(max(views)):
        cnn_probs, z = forward_all(model, ds, images, device, view_generator if v else None, flip)
        clean = z if v == 0 else clean
        sims, nbr = memory.index.search(z, max(ks))
        per_view = {("cnn", None): cnn_probs}
        attended = attend_all(model, z, memory, nbr, projected, ks)
        for k in ks:
            s, y = sims[:, :k], memory.labels[nbr[:, :k]]
            per_view["uniform_knn", k] = uniform_vote(s, y, ds.num_classes)
            per_view["distance_knn", k] = softmax_vote(s, y, ds.num_classes, cfg["temperature"])
            per_view["attn_knn", k] = attended[k]
        for key, p in per_view.items():
            sums[key] = sums.get(key, 0) + p.double()
        if v + 1 in views:
            out.update({(*key, v + 1): (total / (v + 1)).cpu().numpy() for key, total in sums.items()})
    return out, clean


def evaluate(model, ds, split_name, memory, cfg, device, flip, ks=None, views=None):
    """Metrics of every method on one split: plain names (k_eval, 1 view), ``<method>_tta``
    (k_eval, tta_eval views), and, when ``ks``/``views`` are given, one entry per eval-axis pair.
    Returns ``(metrics, {method part of the key: probs}, clean-view embeddings)``."""
    split = getattr(ds, split_name)
    all_ks = sorted({cfg["k_eval"], *(ks or [])})
    all_views = sorted({1, cfg["tta_eval"], *views}) if views else [1]
    probs_by_name, clean = predict(model, ds, split.images, memory, all_ks, all_views, cfg, device, flip)
    metrics, named = {}, {}
    for (method, k, n), probs in probs_by_name.items():
        names = []
        if k in (None, cfg["k_eval"]) and n == 1:
            names.append((method, {}))
        if views and k in (None, cfg["k_eval"]) and n == cfg["tta_eval"]:
            names.append((f"{method}_tta", {}))
        if views and n in views and (k is None or k in ks):
            names.append((method, {"tta_views": n} if k is None else {"k": k, "tta_views": n}))
        m = classification_metrics(probs, split.labels) if names else {}
        for name, axes in names:
            metrics.update(prefixed(split_name, name, m, **axes))
            named[metric_key(split_name, name, "", **axes).split("/")[1]] = probs
    return metrics, named, clean


def _synced_ms(device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start)


def timings(model, ds, memory, z, cfg, device) -> dict[str, float]:
    """kNN search ms per query of ``z`` (the test split's clean embeddings), and the extra ms per
    query of the attention head over the distance-weighted vote on the same retrieved
    neighbours (k = k_eval), the head's once-per-evaluation projection of the bank included."""
    n, k = len(z), cfg["k_eval"]
    search_ms = _synced_ms(device, lambda: memory.index.search(z, k))
    sims, nbr = memory.index.search(z, k)
    distance_ms = _synced_ms(device, lambda: softmax_vote(sims, memory.labels[nbr], ds.num_classes, cfg["temperature"]))
    attention_ms = _synced_ms(device, lambda: attend_all(model, z, memory, nbr))
    return {"perf/search_ms_per_query": search_ms / n, "perf/attention_ms_per_query": (attention_ms - distance_ms) / n}


# ---------------------------------------------------------------- training


def _mixed(loss_fn, out, y, y2, lam):
    return loss_fn(out, y) if y2 is None else lam * loss_fn(out, y) + (1 - lam) * loss_fn(out, y2)


def _nll_of_probs(probs, y):
    return F.nll_loss(torch.log(probs.clamp_min(1e-8)), y)


def train_epoch(model, optimizer, ds, memory, cfg, device, flip, gen, np_rng) -> dict[str, float] | None:
    """One pass over the training split; mean losses, or None when the loss diverged. On CUDA the
    forward pass and losses run under bf16 autocast (the kNN search itself stays exact float32)."""
    model.train()
    ce = partial(F.cross_entropy, label_smoothing=cfg["label_smoothing"])
    labels = torch.as_tensor(ds.train.labels)
    totals, batches = {"cnn": 0.0, "attn_knn": 0.0, "distance_knn": 0.0}, 0
    for idx in minibatches(len(ds.train), cfg["batch_size"], gen):
        x = augment(ds.to_float(to_device(torch.from_numpy(ds.train.images[idx.numpy()]), device), device), gen, flip=flip)
        y, y2, lam, exclude = to_device(labels[idx], device), None, 1.0, idx
        if cfg["mixup_alpha"] > 0:
            lam = float(np_rng.beta(cfg["mixup_alpha"], cfg["mixup_alpha"]))
            perm = torch.randperm(len(idx), generator=gen)
            x = lam * x + (1 - lam) * x[perm.to(device)]
            y2, exclude = y[perm.to(device)], torch.stack([idx, idx[perm]], dim=1)
        with autocast(device):
            cnn_logits, z = model(x)
            _, nbr = memory.index.search(z.detach(), cfg["k_train"], exclude=exclude)
            neighbours, neighbour_labels = memory.bank[nbr], memory.labels[nbr]
            attn_logits = model.attention(z, neighbours, neighbour_labels)
            sims = (z.float().unsqueeze(1) * neighbours).sum(-1)  # the retrieved similarities, differentiable in z
            vote = softmax_vote(sims, neighbour_labels, ds.num_classes, cfg["temperature"])
            losses = {"cnn": _mixed(ce, cnn_logits, y, y2, lam), "attn_knn": _mixed(ce, attn_logits, y, y2, lam),
                      "distance_knn": _mixed(_nll_of_probs, vote, y, y2, lam)}
        loss = losses["cnn"] + losses["attn_knn"] + cfg["knn_loss_weight"] * losses["distance_knn"]
        if is_diverged(loss):
            return None
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in losses.items():
            totals[name] += float(value.detach())
        batches += 1
    return {f"train/{name}/loss": total / batches for name, total in totals.items()}


def load_data(cfg: dict) -> Dataset:
    ds = load_dataset(cfg["dataset"], max_train=cfg["max_train"] or None, max_test=cfg["max_test"] or None)
    ds = with_imbalance(ds, cfg["imbalance"], cfg["seed"])
    return with_label_noise(ds, cfg["noise_rate"], cfg["seed"])


def _eval_axes(cfg: dict) -> tuple[list[int], list[int]]:
    axes = cfg.get("eval") or {}
    return list(axes.get("k", [cfg["k_eval"]])), list(axes.get("tta_views", [1, cfg["tta_eval"]]))


# Configs ``check`` must refuse (the conformance suite holds it to them).
INVALID_CONFIGS = [{"embed_dim": 128, "heads": 3}, {"max_train": 5, "k_train": 16}, {"max_train": 20, "k_eval": 21},
                   {"backbone": "small_cnn", "pretrained": "imagenet"}]


def check(config: dict) -> None:
    """Refuse, before anything starts, every config ``train`` cannot run (cheap: no image decoded)."""
    require(config["embed_dim"] % config["heads"] == 0,
            f"embed_dim {config['embed_dim']} must be divisible by heads {config['heads']}")
    if config["backbone"] == "small_cnn":
        require(config["pretrained"] == "none",
                f"backbone small_cnn has no pretrained weights (pretrained {config['pretrained']!r}); use pretrained: none")
    elif config["pretrained"] == "imagenet" and (problem := imagenet_weights_problem(config["backbone"])):
        raise ConfigError(str(problem))
    try:
        n_train = int(train_class_counts(config["dataset"], max_train=config["max_train"] or None,
                                         imbalance=config["imbalance"]).sum())
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    ks, _ = _eval_axes(config)
    own = 2 if config["mixup_alpha"] > 0 else 1  # training excludes its own image(s) from the neighbours
    where = f"the {n_train} training images of {config['dataset']} (max_train {config['max_train']}, imbalance {config['imbalance']})"
    require(max(ks) <= n_train, f"eval k {max(ks)} is more than {where}")
    require(config["k_eval"] <= n_train, f"k_eval {config['k_eval']} is more than {where}")
    require(config["k_train"] + own <= n_train,
            f"k_train {config['k_train']} + {own} own image(s) excluded from the neighbours is more than {where}")


def train(config: dict, report, restore: dict | None = None) -> None:
    cfg = dict(config)
    check(cfg)
    trial = Trial(cfg, report, restore)
    eval_ks, eval_views = _eval_axes(cfg)
    device = resolve_device(cfg.get("device", "auto"))
    np_rng = trial.numpy_rng(3)
    ds = load_data(cfg)
    flip = {"auto": ds.name != "digits", "always": True, "never": False}[cfg["hflip"]]  # digits are not mirror-symmetric
    model = AttnKnnNet(cfg, ds).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"])
    trial.track(model=model, optimizer=optimizer, scheduler=scheduler)
    memory = None
    for epoch in trial.epochs(cfg["epochs"]):
        if memory is None:  # the bank of the model this run's first epoch starts from (restored on resume)
            memory = refresh_memory(None, model, ds, device, use_gpu=device.type == "cuda")
        with trial.timed("epoch"):
            losses = train_epoch(model, optimizer, ds, memory, cfg, device, flip, trial.generator, np_rng)
            if losses is None:
                return trial.diverged(epoch)
            scheduler.step()
            memory = refresh_memory(memory, model, ds, device, use_gpu=device.type == "cuda")
        final = epoch == cfg["epochs"]
        metrics = {**losses, **evaluate(model, ds, "val", memory, cfg, device, flip, *((eval_ks, eval_views) if final else ()))[0]}
        if final:  # the last report holds every final metric
            test_metrics, probs, z = evaluate(model, ds, "test", memory, cfg, device, flip, eval_ks, eval_views)
            for name, p in probs.items():
                trial.reliability("test", name, p, ds.test.labels)
            metrics.update(test_metrics)
            metrics.update(timings(model, ds, memory, z, cfg, device))
            metrics["perf/epoch_ms"] = trial.ms("epoch") / cfg["epochs"]
        trial.report(epoch, metrics, done=final)
