"""Subtask heads + meta-learner over frozen embeddings, with calibration (seed 003).

One trial:

1. Frozen features of every split from the shared cache (``trainables.common.features``),
   standardised with train statistics.
2. Subtask labels computed from the images: ``superclass`` (a class -> superclass map: built in
   for CIFAR-10, vehicle vs animal; ``superclass_map`` from the config otherwise), ``brightness``
   (mean grey level) and ``complexity`` (Sobel edge density), both binned low/medium/high by
   fixed thresholds or by percentiles of the TRAIN split.
3. One linear head per subtask on the embedding, fit full-batch with L-BFGS to its optimum: no
   lr or batch size enters, so every cell of the lr_scaling study sees the same heads for a
   given seed.
   The meta-learner trains on the heads' outputs for the very images they were fit on (no
   cross-fitting, as in the seed); linear heads on a few hundred dimensions overfit little.
4. The meta-learner, 4 x [Linear 384, BatchNorm, ReLU, Dropout 0.3] -> classes, on the
   embedding concatenated with the heads' probabilities (``use_subtasks: false``: the embedding
   alone); Adam with the trial's ``lr`` and ``batch_size``, early stopping on val NLL (``monitor:
   nll``, default: accuracy saturates on small val sets such as digits' 142 images, and a tie
   keeps the first epoch to reach it) or val accuracy (``monitor: acc``).
5. Methods evaluated on the best epoch's weights: ``meta`` (eval mode, deterministic),
   ``meta_ts`` (temperature fit on val NLL), ``meta_mc`` (MC-dropout: dropout on, BatchNorm in
   eval mode, mean of ``mc_samples`` softmax passes; eval axis) with ``pred_std``, the mean over
   images of the across-pass std of the predicted class's probability.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from trainables.common.calibration import fit_temperature
from trainables.common.checks import require
from trainables.common.data import Dataset, load_dataset
from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics, metric_key, prefixed
from trainables.common.training import EarlyStopping, is_diverged, minibatches, resolve_device

SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
SUBTASK_METRICS = ("acc", "balanced_acc", "nll", "ece")  # a head's own accuracy and calibration
SUBTASKS = ("superclass", "brightness", "complexity")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SUPERCLASS = (0, 0, 1, 1, 1, 1, 1, 1, 0, 0)  # 0 = vehicle, 1 = animal
DEFAULT_MC_SAMPLES = 25  # the value reported under the plain ``meta_mc`` name when evaluated


def _log(message: str) -> None:
    print(f"[subtask_meta] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- subtask labels from images


LUMA_PER_MILLE = np.array([299, 587, 114], dtype=np.int64)  # ITU-R 601 weights, as PIL's ``convert('L')``


def _luma_weights(channels: int) -> np.ndarray:
    """Thousandths of a grey level per channel value: the luma weights (a 4th channel, alpha,
    weighs 0), or 1000 for a single grey channel."""
    return np.array([1000]) if channels == 1 else np.concatenate([LUMA_PER_MILLE, np.zeros(channels - 3, np.int64)])


def grey_levels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float64 (N, H, W) grey levels in [0, 255]. Weighted in integers, so
    a grey pixel (v, v, v) is exactly v and lands on the side of a cut the seed's ``< 85`` rule
    says; float weights miss v for 6 of the 256 grey values in float32 (119 -> 119.0000076) and
    70 in float64 (1 -> 0.9999999999999999)."""
    return (images.astype(np.int64) @ _luma_weights(images.shape[-1])) / 1000


def mean_brightness(images: np.ndarray) -> np.ndarray:
    """Each image's mean grey level, from exact integer channel sums: one rounding, at the
    division, and no (N, H, W) array (50,000 CIFAR images)."""
    totals = images.sum(axis=(1, 2), dtype=np.int64) @ _luma_weights(images.shape[-1])
    return totals / (1000 * images.shape[1] * images.shape[2])


def sobel_magnitude(grey: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of each (H, W) image of a (N, H, W) stack, edges replicated."""
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = grey.shape[1:]

    def at(dy: int, dx: int) -> np.ndarray:  # the stack shifted by (dy, dx)
        return p[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    return np.hypot(gx, gy)


def edge_density(images: np.ndarray, edge_threshold: float, chunk: int = 4096) -> np.ndarray:
    """Fraction of each image's pixels whose Sobel magnitude (grey levels 0-255) exceeds
    ``edge_threshold`` (an ideal step of height h has magnitude 4h), in float64: a fraction such
    as 70/100 is then the number a cut of 0.7 is (float32 stores 0.69999999)."""
    out = np.empty(len(images))
    for start in range(0, len(images), chunk):
        mag = sobel_magnitude(grey_levels(images[start : start + chunk]))
        out[start : start + chunk] = (mag > edge_threshold).mean(axis=(1, 2))
    return out


def bin_thresholds(train_values: np.ndarray, mode: str, fixed: list[float], percentiles: list[float]) -> np.ndarray:
    """Two cut points for three bins: the fixed ones, or percentiles of the TRAIN values."""
    if mode == "fixed":
        cuts = np.asarray(fixed, dtype=np.float64)
    elif mode == "percentile":
        cuts = np.percentile(np.asarray(train_values, dtype=np.float64), percentiles)
    else:
        raise ValueError(f"thresholds must be 'fixed' or 'percentile', got {mode!r}")
    if cuts.shape != (2,) or not cuts[0] <= cuts[1]:
        raise ValueError(f"need two increasing cut points, got {cuts.tolist()}")
    return cuts


def three_bins(values: np.ndarray, cuts: np.ndarray, upper_closed: bool = False) -> np.ndarray:
    """0 below ``cuts[0]``, 1 below ``cuts[1]``, else 2 (the seed's ``< 85 / < 170`` rule).
    ``upper_closed`` puts a value equal to a cut in the lower bin, as percentiles define it (at
    least p% of the values are <= the p-th percentile), so tied values are not pushed up."""
    return np.digitize(values, cuts, right=upper_closed).astype(np.int64)


def superclass_map_for(classes: list[str], configured: list[int] | None) -> list[int] | None:
    """CIFAR-10 (recognised by its class names) -> vehicle/animal; else ``configured`` when it
    has one entry per class; else None (the subtask is skipped)."""
    if tuple(c.lower() for c in classes) == CIFAR10_CLASSES:
        return list(CIFAR10_SUPERCLASS)
    if configured is not None and len(configured) == len(classes):
        return [int(s) for s in configured]
    return None


@dataclass
class Subtask:
    name: str
    num_classes: int
    labels: dict[str, np.ndarray]  # split -> int64 (N,)


def build_subtasks(ds: Dataset, config: dict) -> list[Subtask]:
    """The configured subtasks' labels for every split (bins decided on TRAIN only)."""
    names = list(config.get("subtasks", SUBTASKS))
    splits = {s: getattr(ds, s) for s in SPLITS}
    mode = config.get("thresholds", "percentile")
    percentiles = config.get("bin_percentiles", [100 / 3, 200 / 3])
    out = []
    for name in names:
        if name == "superclass":
            mapping = superclass_map_for(ds.classes, config.get("superclass_map"))
            if mapping is None:
                _log(f"superclass subtask skipped: no superclass_map with {ds.num_classes} entries for {ds.name}")
                continue
            table = np.asarray(mapping, dtype=np.int64)
            out.append(Subtask(name, int(table.max()) + 1, {s: table[sp.labels] for s, sp in splits.items()}))
            continue
        if name == "brightness":
            values = {s: mean_brightness(sp.images) for s, sp in splits.items()}
            fixed = config.get("brightness_thresholds", [85.0, 170.0])
        else:
            values = {s: edge_density(sp.images, config.get("edge_threshold", 300.0)) for s, sp in splits.items()}
            fixed = config.get("complexity_thresholds", [0.05, 0.15])
        cuts = bin_thresholds(values["train"], mode, fixed, percentiles)
        labels = {s: three_bins(v, cuts, upper_closed=mode == "percentile") for s, v in values.items()}
        counts = np.bincount(labels["train"], minlength=3).tolist()
        _log(f"{name}: {mode} cuts {np.round(cuts, 4).tolist()}, train bins {counts}")
        out.append(Subtask(name, 3, labels))
    return out


# ---------------------------------------------------------------- models


def fit_linear_head(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                    tolerance: float = 1e-6, max_iter: int = 1000) -> nn.Linear:
    """Multinomial logistic regression (L2 ``weight_decay`` on the weights), full-batch L-BFGS in
    float64 until no gradient entry exceeds ``tolerance``. The objective is strictly convex, so
    the head is its one optimum, not where an iteration budget ran out: the former budget of 100
    float32 iterations left digits' brightness and complexity heads up to 0.04 away in predicted
    probability; at 1e-6 they are within 1e-4 of scikit-learn's (after 260-290 iterations)."""
    head = nn.Linear(x.shape[1], num_classes).to(device=x.device, dtype=torch.float64)
    x = x.double()
    # tolerance_change 0: stop on the gradient alone (torch's default also stops when the loss
    # moves less than 1e-9, which float32 did after 175-200 iterations, short of the optimum)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=max_iter, tolerance_grad=tolerance, tolerance_change=0.0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    closure()  # the gradient at the weights returned, not at the last line-search trial point
    gradient = max(p.grad.abs().max().item() for p in head.parameters())
    if gradient > tolerance:
        _log(f"warning: a linear head's L-BFGS fit stopped at gradient {gradient:.1e} > {tolerance:g} (at most {max_iter} iterations)")
    return head.float().eval()


def meta_learner(in_dim: int, num_classes: int, hidden: int = 384, layers: int = 4, dropout: float = 0.3) -> nn.Sequential:
    """``layers`` x [Linear ``hidden``, BatchNorm, ReLU, Dropout] -> Linear ``num_classes``."""
    blocks: list[nn.Module] = []
    for i in range(layers):
        blocks += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
    blocks.append(nn.Linear(hidden if layers else in_dim, num_classes))
    return nn.Sequential(*blocks)


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Deterministic logits: the whole model in eval mode (BatchNorm running stats, no dropout)."""
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        model.eval()
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def enable_mc_dropout(model: nn.Module) -> None:
    """Eval mode everywhere except the Dropout layers (BatchNorm keeps its running statistics)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()


def mc_dropout_predict(model: nn.Module, x: torch.Tensor, sample_counts: list[int], seed: int,
                       batch_size: int = 4096) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each n in ``sample_counts``: (mean softmax over the first n dropout passes, per-image
    std across those passes of the mean-predicted class's probability). The passes are nested,
    so n = 50 extends n = 25 rather than redrawing it."""
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        enable_mc_dropout(model)
        torch.manual_seed(seed)
        wanted = sorted(set(int(n) for n in sample_counts))
        out = {}
        s1 = s2 = None
        for n in range(1, wanted[-1] + 1):
            p = torch.cat([F.softmax(model(x[i : i + batch_size]), 1) for i in range(0, len(x), batch_size)]).double().cpu()
            s1 = p if s1 is None else s1 + p
            s2 = p * p if s2 is None else s2 + p * p
            if n in wanted:
                mean = s1 / n
                std = (s2 / n - mean * mean).clamp_min(0).sqrt()
                top = mean.argmax(1, keepdim=True)
                out[n] = (mean.numpy(), std.gather(1, top).squeeze(1).numpy())
        model.eval()
        return out


# ---------------------------------------------------------------- the trial


def _two_increasing(value) -> bool:
    """Two numeric cuts (YAML's true/false are not: Python counts them as ints), the first below
    the second: equal cuts would leave the middle bin empty."""
    return isinstance(value, (list, tuple)) and len(value) == 2 \
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and value[0] < value[1]


# configs ``check`` refuses, as overrides of the smoke study (the conformance suite holds it to them)
INVALID_CONFIGS = [{"subtasks": ["colourfulness"]}, {"thresholds": "adaptive"}, {"brightness_thresholds": [170.0, 85.0]},
                   {"complexity_thresholds": [0.05]}, {"complexity_thresholds": [0.1, 0.1]}, {"bin_percentiles": [50, 120]},
                   {"bin_percentiles": [-10, 50]}, {"bin_percentiles": [50, 50]}, {"superclass_map": [1, 0, -1]},
                   {"monitor": "loss"}, {"batch_size": 1}, {"eval": {"mc_samples": [0, 5]}},
                   {"brightness_thresholds": [False, True]}]


def check(config: dict) -> None:
    """The cross-field rules ``train`` relies on (single values are the YAML ``params``' job)."""
    names = list(config.get("subtasks", SUBTASKS))
    unknown = sorted(set(names) - set(SUBTASKS))
    require(not unknown, f"subtasks {unknown} unknown: choose from {list(SUBTASKS)}")
    mode = config.get("thresholds", "percentile")
    require(mode in ("fixed", "percentile"), f"thresholds {mode!r} must be fixed or percentile")
    for key in ("brightness_thresholds", "complexity_thresholds"):
        if key in config:
            require(_two_increasing(config[key]), f"{key} {config[key]} must be two increasing cut points")
    percentiles = config.get("bin_percentiles", [100 / 3, 200 / 3])
    require(_two_increasing(percentiles) and 0 <= percentiles[0] and percentiles[1] <= 100,
            f"bin_percentiles {percentiles} must be two increasing percentiles in [0, 100]")
    mapping = config.get("superclass_map")
    require(mapping is None or (isinstance(mapping, list) and all(isinstance(v, int) and v >= 0 for v in mapping)),
            f"superclass_map {mapping} must list one superclass index >= 0 per class")
    monitor = config.get("monitor", "nll")
    require(monitor in ("nll", "acc"), f"monitor {monitor!r} must be nll or acc")
    require(int(config["batch_size"]) >= 2, f"batch_size {config['batch_size']} must be >= 2 (BatchNorm trains on batches of 2 or more)")
    counts = (config.get("eval") or {}).get("mc_samples") or [DEFAULT_MC_SAMPLES]
    require(all(isinstance(n, int) and n >= 1 for n in counts), f"eval mc_samples {counts} must be integers >= 1")



def _features(ds: Dataset, config: dict) -> dict[str, torch.Tensor]:
    """Frozen features of every split, standardised with the train mean/std."""
    from trainables.common.features import extract_features

    fs = extract_features(ds, config["encoder"], device=config.get("device", "auto"),
                          batch_size=int(config.get("feature_batch_size", 256)), progress=False)
    feats = {s: torch.from_numpy(np.array(getattr(fs, s), dtype=np.float32)) for s in SPLITS}
    mu, sd = feats["train"].mean(0), feats["train"].std(0)
    return {s: (f - mu) / (sd + 1e-6) for s, f in feats.items()}


def _mc_counts(config: dict) -> list[int]:
    return sorted(set(int(n) for n in (config.get("eval") or {}).get("mc_samples") or [DEFAULT_MC_SAMPLES]))


def _subtask_heads(trial: Trial, ds: Dataset, x: dict[str, torch.Tensor], config: dict) -> tuple[list[Subtask], dict[str, nn.Linear]]:
    """The subtask labels and one linear head per subtask, fit on train once per trial (a resumed
    trial takes the fitted heads from its checkpoint rather than refitting them)."""
    if not config.get("use_subtasks", True):
        return [], {}  # the embedding-only ablation
    with trial.timed("subtask_labels"):
        subtasks = build_subtasks(ds, config)
    heads: dict[str, nn.Linear] = {}
    fitted = trial.value("heads", {})
    with trial.timed("subtask_heads"):
        for st in subtasks:
            if st.name in fitted:
                heads[st.name] = nn.Linear(x["train"].shape[1], st.num_classes)
                heads[st.name].load_state_dict(fitted[st.name])
            else:
                heads[st.name] = fit_linear_head(x["train"], torch.as_tensor(st.labels["train"]), st.num_classes,
                                                 float(config.get("head_weight_decay", 1e-3)))
                fitted[st.name] = copy.deepcopy(heads[st.name].state_dict())
            heads[st.name].eval()
    return subtasks, heads


def train(config: dict, report, restore: dict | None = None) -> None:
    trial = Trial(config, report, restore)
    if trial.finished:
        return  # the final report went out with that checkpoint
    check(config)
    t_start = time.perf_counter()
    device = resolve_device(config.get("device", "auto"))
    ds = load_dataset(config["dataset"], max_train=config.get("max_train"), max_test=config.get("max_test"))
    with trial.timed("features"):  # extract_features leaves every RNG as it found it, cold cache or warm
        x = _features(ds, config)
    subtasks, heads = _subtask_heads(trial, ds, x, config)
    with torch.no_grad():
        inputs = {s: torch.cat([x[s]] + [F.softmax(heads[st.name](x[s]), 1) for st in subtasks], 1).to(device) for s in SPLITS}
    y = {s: torch.as_tensor(getattr(ds, s).labels).to(device) for s in SPLITS}

    model = meta_learner(inputs["train"].shape[1], ds.num_classes, int(config.get("hidden_dim", 384)),
                         int(config.get("num_layers", 4)), float(config.get("dropout", 0.3))).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(config["lr"]), weight_decay=float(config.get("weight_decay", 0.0)))
    monitor = config.get("monitor", "nll")
    stopper = EarlyStopping(int(config.get("patience", 4)), mode="min" if monitor == "nll" else "max")
    trial.track(model=model, optimizer=opt, early_stopping=stopper)
    trial.value("best_state", copy.deepcopy(model.state_dict()))

    epochs, batch_size = int(config["epochs"]), int(config["batch_size"])
    for epoch in trial.epochs(epochs):
        with trial.timed("train"):
            model.train()
            total, seen = torch.zeros((), device=device), 0  # summed on the device: no sync per step
            for idx in minibatches(len(inputs["train"]), batch_size, trial.generator):
                if len(idx) < 2:  # BatchNorm needs two samples in training mode
                    continue
                idx = idx.to(device)
                loss = F.cross_entropy(model(inputs["train"][idx]), y["train"][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, seen = total + loss.detach() * len(idx), seen + len(idx)
        if is_diverged(total):  # a NaN/inf step poisons the sum
            return trial.diverged(epoch)
        val_logits = predict_logits(model, inputs["val"])
        val = {"acc": float((val_logits.argmax(1) == y["val"]).float().mean()),
               "nll": float(F.cross_entropy(val_logits, y["val"]))}
        metrics = {metric_key("train", "meta", "loss"): float(total) / max(seen, 1),
                   metric_key("val", "meta", "acc"): val["acc"], metric_key("val", "meta", "loss"): val["nll"]}
        if stopper.improved(val[monitor]):
            trial.values["best_state"] = copy.deepcopy(model.state_dict())
        done = stopper.step(val[monitor]) or epoch == epochs
        if done:  # evaluated on a copy: the checkpoint keeps the weights training ended with
            best = copy.deepcopy(model)
            best.load_state_dict(trial.values["best_state"])
            metrics.update(_final_metrics(trial, best, inputs, y, heads, subtasks, x, config))
            metrics["info/best_epoch"] = epoch - stopper.bad_epochs
            metrics["perf/total_ms"] = 1e3 * (time.perf_counter() - t_start)
        trial.report(epoch, metrics, done=done)
        if done:
            return


def _final_metrics(trial: Trial, model, inputs, y, heads, subtasks, x, config) -> dict[str, float]:
    """Every method's val and test metrics on the best epoch's weights, plus the subtask heads';
    the test split's reliability bins of each method that reports an ECE."""
    logits = {s: predict_logits(model, inputs[s]) for s in EVAL_SPLITS}
    with trial.timed("ts_fit"):
        temperature = fit_temperature(logits["val"], y["val"])
    counts = _mc_counts(config)
    headline = DEFAULT_MC_SAMPLES if DEFAULT_MC_SAMPLES in counts else counts[-1]
    with trial.timed("mc_dropout"):
        mc = {s: mc_dropout_predict(model, inputs[s], counts, seed=int(config["seed"]) + 1) for s in EVAL_SPLITS}

    out: dict[str, float] = {metric_key("val", "meta_ts", "temperature"): temperature}
    for s in EVAL_SPLITS:
        labels = y[s].cpu().numpy()
        # (method, its eval axes, probabilities, labels, extra metrics)
        evaluated = [("meta", {}, F.softmax(logits[s], 1).cpu().numpy(), labels, {}),
                     ("meta_ts", {}, F.softmax(logits[s] / temperature, 1).cpu().numpy(), labels, {})]
        for n, (mean, std) in mc[s].items():
            evaluated += [("meta_mc", axes, mean, labels, {"pred_std": float(std.mean())})
                          for axes in ({"mc_samples": n}, *([{}] if n == headline else []))]
        with torch.no_grad():
            evaluated += [(f"subtask_{st.name}", {}, F.softmax(heads[st.name](x[s]), 1).numpy(), st.labels[s], {})
                          for st in subtasks]
        for method, axes, probs, truth, extra in evaluated:
            metrics = classification_metrics(probs, truth)
            if method.startswith("subtask_"):
                metrics = {k: metrics[k] for k in SUBTASK_METRICS}
            out.update(prefixed(s, method, {**metrics, **extra}, **axes))
            if s == "test":
                trial.reliability(s, metric_key(s, method, "ece", **axes).split("/")[1], probs, truth)  # axes included
    out.update(trial.perf())
    return out
