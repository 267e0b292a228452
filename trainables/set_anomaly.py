"""Set anomaly detection over frozen encoder features (seed 001).

A set holds ``set_size`` images: ``set_size - 1`` of class A and one of class B != A, in shuffled
positions; the target is the anomaly's position. Classes are the first ``n_classes`` of the
dataset. Train, val and test sets are drawn from the dataset's disjoint train, val and test
images, fixed per seed.

Methods, all reported by one trial:

* ``attention``: (linear projection when ``model_dim`` > 0) -> ``layers`` x [multi-head
  self-attention over the set, dropout, residual, LayerNorm] -> a shared per-position MLP
  (dim -> ``mlp_hidden`` -> 1) -> softmax over positions; cross-entropy. No positional encoding,
  so the scores are permutation-equivariant.
* ``flat_mlp``: an MLP over the concatenated set (trained with the same recipe).
* ``farthest_from_mean``: the position with the largest cosine distance to the set's mean feature.
* ``random``: uniformly random scores.

The nets see features standardised with the train split's statistics, gathered per batch
from the shared read-only memmap (no per-trial copy of the features). Each net draws its
initial weights and its dropout masks from its own stream, so a knob of one net (heads,
layers, model_dim) never moves the other's results. Early stopping, per net, keeps the
weights of its best val top-1 epoch; the final report evaluates those.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.common.checks import require
from trainables.common.data import Dataset, load_dataset
from trainables.common.features import FEATURE_DIMS, extract_features
from trainables.common.lifecycle import Trial, cpu_copy
from trainables.common.metrics import accuracy, metric_key, prefixed, top_k_accuracy
from trainables.common.training import EarlyStopping, forked_rng, is_diverged, minibatches, resolve_device

SPLITS = ("train", "val", "test")
NETS = ("attention", "flat_mlp")


# ---------------------------------------------------------------- sets


def effective_classes(dataset: Dataset, n_classes: int) -> int:
    """``n_classes`` capped at the dataset's class count (with a note on stderr when capped)."""
    if n_classes > dataset.num_classes:
        print(f"set_anomaly: n_classes {n_classes} capped at {dataset.name}'s {dataset.num_classes} classes", file=sys.stderr)
    return min(n_classes, dataset.num_classes)


def make_sets(labels: np.ndarray, n_classes: int, n_sets: int, set_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_sets`` sets over images with ``labels < n_classes``: (indices (n_sets, set_size) into
    ``labels``, anomaly position (n_sets,)). Class A and B != A are uniform; the ``set_size - 1``
    A images are distinct when class A has that many, else drawn with replacement."""
    pools = [np.flatnonzero(labels == c) for c in range(n_classes)]
    if any(len(p) == 0 for p in pools):
        raise ValueError(f"every one of the first {n_classes} classes needs images in each split")
    short = [c for c, p in enumerate(pools) if len(p) < set_size - 1]
    if short:
        print(f"set_anomaly: classes {short} have fewer than {set_size - 1} images in a split of {len(labels)}; "
              "their sets repeat images", file=sys.stderr)
    idx = np.empty((n_sets, set_size), dtype=np.int64)
    target = rng.integers(0, set_size, size=n_sets)
    class_a = rng.integers(0, n_classes, size=n_sets)
    class_b = (class_a + rng.integers(1, n_classes, size=n_sets)) % n_classes
    for i in range(n_sets):
        pool = pools[class_a[i]]
        members = rng.choice(pool, size=set_size - 1, replace=len(pool) < set_size - 1)
        idx[i] = np.insert(members, target[i], rng.choice(pools[class_b[i]]))
    return idx, target


def build_sets(dataset: Dataset, cfg: dict, n_classes: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split -> (indices into that split, anomaly positions), fixed by ``cfg["seed"]``."""
    out = {}
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([cfg["seed"], 1001, k])
        out[split] = make_sets(getattr(dataset, split).labels, n_classes, cfg[f"n_{split}_sets"], cfg["set_size"], rng)
    return out


# ---------------------------------------------------------------- models and baselines


class AttentionBlock(nn.Module):
    """Self-attention over set positions; dropout, residual, then LayerNorm (post-norm)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.drop(self.attn(x, x, x, need_weights=False)[0]))


class SetAttention(nn.Module):
    def __init__(self, feature_dim: int, cfg: dict):
        super().__init__()
        dim = cfg["model_dim"] or feature_dim
        self.proj = nn.Linear(feature_dim, dim) if cfg["model_dim"] else nn.Identity()
        self.blocks = nn.Sequential(*(AttentionBlock(dim, cfg["heads"], cfg["dropout"]) for _ in range(cfg["layers"])))
        self.score = nn.Sequential(nn.Linear(dim, cfg["mlp_hidden"]), nn.ReLU(), nn.Dropout(cfg["dropout"]), nn.Linear(cfg["mlp_hidden"], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, D) -> (B, S) logits
        return self.score(self.blocks(self.proj(x))).squeeze(-1)


class FlatMLP(nn.Module):
    def __init__(self, feature_dim: int, cfg: dict):
        super().__init__()
        size, hidden = cfg["set_size"], cfg["mlp_hidden"]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size * feature_dim, hidden), nn.ReLU(), nn.Dropout(cfg["dropout"]), nn.Linear(hidden, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def farthest_from_mean_scores(sets: np.ndarray) -> np.ndarray:
    """(n, S, D) -> (n, S): cosine distance of each member to its set's mean feature."""
    x = sets / np.maximum(np.linalg.norm(sets, axis=-1, keepdims=True), 1e-12)
    mean = sets.mean(1, keepdims=True)
    mean = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)
    return 1.0 - (x * mean).sum(-1)


def ranking_metrics(scores: np.ndarray, target: np.ndarray) -> dict[str, float]:
    return {"acc": accuracy(scores, target), "top5": top_k_accuracy(scores, target, 5)}


class SetFeatures:
    """Batches of sets gathered from one split's (read-only, shared) feature array."""

    def __init__(self, features: np.ndarray, idx: np.ndarray, target: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device):
        self.features, self.idx, self.target = features, idx, torch.as_tensor(target)
        self.mean, self.std, self.device = mean, std, device

    def __len__(self) -> int:
        return len(self.idx)

    def raw(self, rows) -> np.ndarray:
        return np.asarray(self.features[self.idx[rows].ravel()]).reshape(len(rows), self.idx.shape[1], -1)

    def batch(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        x = (torch.from_numpy(self.raw(rows)) - self.mean) / self.std
        return x.to(self.device), self.target[rows].to(self.device)


def net_scores(model: nn.Module, data: SetFeatures) -> tuple[np.ndarray, float]:
    """(softmax scores (n, S), mean cross-entropy) of ``model`` over every set of ``data``."""
    model.eval()
    out, loss = [], 0.0
    with torch.inference_mode():
        for rows in minibatches(len(data), 512, shuffle=False):
            x, y = data.batch(rows.numpy())
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            out.append(logits.softmax(-1).cpu().numpy())
    return np.concatenate(out), loss / len(data)


def evaluate_nets(models: dict[str, nn.Module], data: SetFeatures, split: str) -> dict[str, float]:
    metrics = {}
    for name, model in models.items():
        scores, loss = net_scores(model, data)
        metrics.update(prefixed(split, name, {**ranking_metrics(scores, data.target.numpy()), "loss": loss}))
    return metrics


def evaluate_baselines(data: SetFeatures, split: str, seed: int) -> dict[str, float]:
    target = data.target.numpy()
    rows = np.arange(len(data))
    random_scores = np.random.default_rng([seed, 1002, SPLITS.index(split)]).random(data.idx.shape)
    return {**prefixed(split, "random", ranking_metrics(random_scores, target)),
            **prefixed(split, "farthest_from_mean", ranking_metrics(farthest_from_mean_scores(data.raw(rows)), target))}


# ---------------------------------------------------------------- training


def load_data(cfg: dict) -> Dataset:
    return load_dataset(cfg["dataset"], max_train=cfg["max_train"] or None, max_test=cfg["max_test"] or None)


@contextmanager
def own_stream(seed: int, net: str, *step: int, device: torch.device):
    """Run a block on the net's own torch stream (``[seed, net, *step]``), then put the global RNG
    back: each net's initial weights and dropout masks are then the same whatever the other net
    is (a knob of the attention block must not move the flat MLP's results) and whichever nets
    still train."""
    with forked_rng(device):
        torch.manual_seed(stream_seed(seed, net, *step))
        yield


def stream_seed(seed: int, net: str, *step: int) -> int:
    """The torch seed of the net's own stream ``[seed, net, *step]`` (outside :func:`own_stream`,
    a decorated function, which mutmut does not mutate)."""
    return int(np.random.SeedSequence([seed, 1003, NETS.index(net), *step]).generate_state(1)[0])


def build_models(feature_dim: int, cfg: dict, device: torch.device) -> dict[str, nn.Module]:
    models = {}
    for name, cls in (("attention", SetAttention), ("flat_mlp", FlatMLP)):
        with own_stream(cfg["seed"], name, device=device):
            models[name] = cls(feature_dim, cfg).to(device)
    return models


def train_epoch(models, optimizers, active, data: SetFeatures, batch_size: int, gen, seed: int, epoch: int) -> dict[str, float] | None:
    """One pass over the training sets (one batch order for every net) for every still-active
    net, each on its own dropout stream; None when a loss diverged."""
    batches = list(minibatches(len(data), batch_size, gen))
    out = {}
    for name in active:
        model, total = models[name].train(), 0.0
        with own_stream(seed, name, epoch, device=data.device):
            for rows in batches:
                x, y = data.batch(rows.numpy())
                loss = F.cross_entropy(model(x), y)
                if is_diverged(loss):
                    return None
                optimizers[name].zero_grad(set_to_none=True)
                loss.backward()
                optimizers[name].step()
                total += loss.item()
        out[metric_key("train", name, "loss")] = total / len(batches)
    return out


def train_statistics(train_features: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std (floored at 1e-6) of the train split: the nets' standardisation."""
    x = np.asarray(train_features)
    mean, std = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    return torch.from_numpy(mean.astype(np.float32)), torch.from_numpy(std.astype(np.float32)).clamp_min(1e-6)


INVALID_CONFIGS = [{"heads": 3}, {"model_dim": 30, "heads": 4}, {"n_classes": 1}, {"set_size": 1}]


def check(config: dict) -> None:
    """Refuse, before anything starts, every config ``train`` cannot run (no data loaded)."""
    require(config["n_classes"] >= 2, f"n_classes {config['n_classes']} must be at least 2 (one class for the set, another for the anomaly)")
    require(config["set_size"] >= 2, f"set_size {config['set_size']} must be at least 2")
    width, where = config["model_dim"], f"model_dim {config['model_dim']}"
    if not width:
        width, where = FEATURE_DIMS[config["encoder"]], f"the {config['encoder']} feature width {FEATURE_DIMS[config['encoder']]} (model_dim 0)"
    require(width % config["heads"] == 0, f"{where} must be divisible by heads {config['heads']}")


def train(config: dict, report, restore: dict | None = None) -> None:
    cfg = dict(config)
    check(cfg)
    trial = Trial(cfg, report, restore)
    device = resolve_device(cfg.get("device", "auto"))
    ds = load_data(cfg)
    n_classes = effective_classes(ds, cfg["n_classes"])
    with trial.timed("features"):
        fs = extract_features(ds, cfg["encoder"], device=str(device), cache_dir=cfg.get("cache_dir") or None, progress=False)
    mean, std = train_statistics(fs.train)
    data = {split: SetFeatures(fs.split(split), *sets, mean, std, device) for split, sets in build_sets(ds, cfg, n_classes).items()}

    models = build_models(fs.dim, cfg, device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"]) for name, m in models.items()}
    stoppers = {name: EarlyStopping(cfg["patience"]) for name in NETS}
    for name in NETS:
        trial.track(**{f"model:{name}": models[name], f"optimizer:{name}": optimizers[name], f"stopper:{name}": stoppers[name]})
    best = trial.value("best", {name: cpu_copy(m.state_dict()) for name, m in models.items()})  # per net: weights of its best val epoch
    active = trial.value("active", list(NETS))  # the nets early stopping has not stopped yet

    for epoch in trial.epochs(cfg["epochs"]):
        with trial.timed("epoch"):
            losses = train_epoch(models, optimizers, active, data["train"], cfg["batch_size"], trial.generator, cfg["seed"], epoch)
        if losses is None:
            return trial.diverged(epoch)
        metrics = {**losses, **evaluate_nets({n: models[n] for n in active}, data["val"], "val")}
        for name in list(active):
            acc = metrics[metric_key("val", name, "acc")]
            if stoppers[name].improved(acc):
                best[name] = cpu_copy(models[name].state_dict())
            if stoppers[name].step(acc):
                active.remove(name)
        final = not active or epoch == cfg["epochs"]
        if final:  # the last report holds every final metric, of each net's best val epoch
            for name in NETS:
                models[name].load_state_dict(best[name])
            for split in ("val", "test"):
                metrics.update(evaluate_nets(models, data[split], split))
                metrics.update(evaluate_baselines(data[split], split, cfg["seed"]))
            metrics.update({"perf/features_ms": trial.ms("features"), "perf/epoch_ms": trial.ms("epoch") / epoch})
        trial.report(epoch, metrics, done=final)
        if final:
            return
