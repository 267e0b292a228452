"""clip_fusion (seed 002): class probabilities from frozen image embeddings, and their fusion.

Sources (each gives logits; its probabilities are softmax(logits / T)):

* ``prototype``  cosine similarity of the L2-normalised embedding to each class centroid of
  L2-normalised training embeddings, divided by ``proto_temperature``. The centroids use every
  training image (``shots: 0``) or ``shots`` images per class drawn with the trial's seed
  (``shots`` changes only the prototypes; the supervised head always learns from all of train).
* ``supervised`` a linear head on the frozen, standardised features, trained on the train split
  (``epochs`` of Adam, the trial's seed), or loaded from ``supervised_checkpoint``.
* ``zeroshot``   CLIP's text classifier: per class, the normalised mean of the prompt pool's
  text embeddings. Only with the ``clip-vit-b32`` encoder when open_clip and its cached weights
  are present; ``info/zeroshot_available`` says whether it ran.

With ``calibrate`` each source's temperature T is fit on val by NLL (never worse than T = 1).
Combinations:

* ``fusion``  p = alpha * p_a + (1 - alpha) * p_b for every value of the ``alpha`` eval axis
  (``test/fusion:alpha:0.35/acc``); alpha is picked on val by ``alpha_metric`` (ties go to the
  lower val NLL) and its metrics are reported under the plain ``fusion`` name.
* ``stacker`` logistic regression (class_weight='balanced') on the concatenated source
  probabilities, trained on a stratified ``stacker_holdout`` part of train. The sources it reads
  are refit on the rest of train (their own prototypes and linear head) so that its inputs are
  not overfit to the rows it learns from.
"""

from __future__ import annotations

import json
import math
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainables.common import training
from trainables.common.calibration import fit_temperature
from trainables.common.checks import ConfigError, require
from trainables.common.data import DataError, load_dataset, train_class_counts
from trainables.common.features import FEATURE_DIMS, extract_features
from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics, metric_key, prefixed

DEFAULT_ALPHAS = [round(0.05 * i, 2) for i in range(21)]
PROMPTS_PATH = Path(__file__).parent / "prompts" / "clip_prompts.json"
LOWER_IS_BETTER = ("nll", "ece", "brier")
STACKER_SEED_OFFSET = 7919  # the stacker's own head: a different stream from the main head's
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned logit scale saturates at 100


# ---------------------------------------------------------------- prototypes


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sample_shots(labels: np.ndarray, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``shots`` images per class drawn without replacement (all of a class
    that has fewer); ``shots <= 0`` means every index."""
    if shots <= 0:
        return np.arange(len(labels))
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=min(shots, len(idx)), replace=False))
    return np.sort(np.concatenate(picked))


def class_prototypes(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) L2-normalised centroids of L2-normalised features (a class with no image: zeros)."""
    z = l2_normalize(features)
    sums = np.zeros((num_classes, z.shape[1]))
    np.add.at(sums, labels, z)
    return l2_normalize(sums)


def prototype_logits(features: np.ndarray, prototypes: np.ndarray, temperature: float) -> np.ndarray:
    return l2_normalize(features) @ prototypes.T / temperature


# ---------------------------------------------------------------- calibration and fusion


def fuse(p_a: np.ndarray, p_b: np.ndarray, alpha: float) -> np.ndarray:
    return alpha * p_a + (1.0 - alpha) * p_b


def select_alpha(val_metrics: dict[float, dict[str, float]], metric: str) -> float:
    """The alpha whose val ``metric`` is best (nll/ece/brier: lowest; others: highest); ties
    go to the lower val NLL, then to the smaller alpha."""
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    return min(val_metrics, key=lambda a: (sign * val_metrics[a][metric], val_metrics[a]["nll"], a))


# ---------------------------------------------------------------- stacker


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, holdout) sorted index arrays; the holdout is a stratified ``fraction`` of ``labels``."""
    fit, hold = train_test_split(np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=seed)
    return np.sort(fit), np.sort(hold)


def fit_stacker(inputs: list[np.ndarray], labels: np.ndarray, C: float, seed: int) -> LogisticRegression:
    """Logistic regression on the concatenated probability matrices ``inputs``."""
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=5000, random_state=seed)
    return model.fit(np.hstack(inputs), labels)


def stacker_probs(model: LogisticRegression, inputs: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities, zero for a class the stacker never saw."""
    out = np.zeros((len(inputs[0]), num_classes))
    out[:, model.classes_] = model.predict_proba(np.hstack(inputs))
    return out


# ---------------------------------------------------------------- supervised linear head


class LinearHead(torch.nn.Module):
    """A linear classifier on standardised frozen features; the statistics are buffers, so a
    checkpoint of the head carries them."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = torch.nn.Linear(dim, num_classes)

    def set_statistics(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@dataclass
class HeadFit:
    """One linear head, its optimiser, its batch-order generator and the rows it learns from.
    Each head draws from its own generator and initialises from its own seed, so the main head
    trains the same whether or not the stacker's head trains beside it."""

    head: LinearHead
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    x: torch.Tensor
    y: torch.Tensor

    @classmethod
    def create(cls, x: np.ndarray, y: np.ndarray, num_classes: int, config: dict, device: torch.device, seed: int) -> "HeadFit":
        xt, yt = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = LinearHead(x.shape[1], num_classes).to(device)
        head.set_statistics(xt)
        optimizer = torch.optim.Adam(head.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        return cls(head, optimizer, torch.Generator().manual_seed(seed), xt, yt)

    def epoch(self, batch_size: int) -> float:
        """One pass over the rows in a fresh random order; the mean training loss."""
        self.head.train()
        total = 0.0
        for idx in training.minibatches(len(self.y), batch_size, self.generator):
            idx = idx.to(self.x.device)
            loss = F.cross_entropy(self.head(self.x[idx]), self.y[idx])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx)
        return total / len(self.y)


@contextmanager
def single_thread_on_cpu(device: torch.device):
    """Run torch single-threaded on CPU, then restore. A linear head gains nothing from
    intra-op threads, and on shared cores their barriers cost a lot: 20 epochs on digits took
    10 s with 2 threads and 0.6 s with 1 on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def head_logits(head: LinearHead, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        head.eval()
        device = head.mean.device
        return head(torch.as_tensor(x, device=device)).double().cpu().numpy()


def checkpoint_heads(checkpoint: dict) -> dict[str, dict]:
    """Head name -> state dict of the linear heads in one of this family's checkpoints (the
    Trial's tracked ``head:<name>`` entries; checkpoints written before it keep them in ``heads``)."""
    if "heads" in checkpoint:
        return checkpoint["heads"]
    return {name.split(":", 1)[1]: state for name, state in checkpoint["tracked"].items() if name.startswith("head:")}


def load_supervised_head(path: str, dim: int, num_classes: int, device: torch.device) -> LinearHead:
    """A head from ``path``: one of this family's checkpoints (its supervised head) or a bare
    :class:`LinearHead` state dict, saved with ``torch.save``."""
    try:
        # a family checkpoint also holds the numpy RNG state: allow exactly the numpy types it needs
        with torch.serialization.safe_globals([np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ValueError(f"supervised_checkpoint {path!r} cannot be read: {exc}") from None
    if "heads" in state or "tracked" in state:
        state = checkpoint_heads(state).get("supervised", {})
    weight = state.get("linear.weight")
    if weight is None or tuple(weight.shape) != (num_classes, dim):
        found = "no linear head" if weight is None else f"a head of shape {tuple(weight.shape)}"
        raise ValueError(f"supervised_checkpoint {path!r}: expected a linear head for {num_classes} classes x "
                         f"{dim} features, found {found}")
    head = LinearHead(dim, num_classes)
    head.load_state_dict(state)
    return head.to(device)


# ---------------------------------------------------------------- zero-shot text classifier


def load_prompts(path: str | Path = "") -> list[str]:
    """The prompt templates of a pool file (``{"templates": ["a photo of a {}.", ...]}``)."""
    path = Path(path or PROMPTS_PATH)
    templates = json.loads(path.read_text())["templates"]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"prompt pool {path}: every template needs exactly one '{{}}' (bad: {bad[:3]})")
    return templates


def text_classifier(encode_text, classes: list[str], templates: list[str]) -> np.ndarray:
    """(C, D) zero-shot classifier: per class, the L2-normalised mean of the L2-normalised text
    embeddings of every template filled with the class name (CLIP's prompt ensembling)."""
    return l2_normalize(np.stack([l2_normalize(encode_text([t.format(name) for t in templates])).mean(0) for name in classes]))


def zeroshot_classifier(dataset, config: dict, device: torch.device) -> np.ndarray | None:
    """The prompt pool's text classifier for ``dataset.classes``, or None when no CLIP model is
    available (another encoder, open_clip missing, or its weights not cached)."""
    if config["encoder"] != "clip-vit-b32":
        return None
    from trainables.common.encoders import EncoderUnavailable, get_encoder

    try:
        encoder = get_encoder("clip-vit-b32", dataset, device, config.get("cache_dir") or None, progress=False)
    except EncoderUnavailable:
        return None
    return text_classifier(encoder.encode_text, dataset.classes, load_prompts(config.get("prompts", "")))


# ---------------------------------------------------------------- evaluation


def source_logits(fit_x: np.ndarray, fit_y: np.ndarray, shot_idx: np.ndarray, head: LinearHead,
                  evals: dict[str, np.ndarray], config: dict, num_classes: int,
                  text: np.ndarray | None) -> dict[str, dict[str, np.ndarray]]:
    """source -> split -> logits on each array of ``evals``; prototypes from ``shot_idx`` rows."""
    protos = class_prototypes(fit_x[shot_idx], fit_y[shot_idx], num_classes)
    out = {
        "prototype": {s: prototype_logits(x, protos, config["proto_temperature"]) for s, x in evals.items()},
        "supervised": {s: head_logits(head, x) for s, x in evals.items()},
    }
    if text is not None:
        out["zeroshot"] = {s: CLIP_LOGIT_SCALE * l2_normalize(x) @ text.T for s, x in evals.items()}
    return out


def calibrated(logits: dict[str, dict[str, np.ndarray]], val_labels: np.ndarray, calibrate: bool):
    """(source -> split -> probabilities, source -> temperature fit on the ``val`` logits)."""
    temps = {src: fit_temperature(split["val"], val_labels) if calibrate else 1.0 for src, split in logits.items()}
    probs = {src: {s: softmax(z / temps[src], axis=1) for s, z in split.items()} for src, split in logits.items()}
    return probs, temps


def fusion_pair(config: dict) -> tuple[str, str]:
    """The two fused sources; ``auto`` is zeroshot with the CLIP encoder (the only one with a text
    tower: its features need open_clip and the weights, which the zeroshot source needs too)."""
    a = config["fusion_a"]
    if a == "auto":
        a = "zeroshot" if config["encoder"] == "clip-vit-b32" else "prototype"
    return a, config["fusion_b"]


def source_and_fusion_metrics(config: dict, x: dict, y: dict, num_classes: int, head: LinearHead,
                              text: np.ndarray | None, alphas: list[float]) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(metrics, method -> test probabilities) of the sources, fusion per alpha and at the
    val-chosen alpha."""
    shot_idx = sample_shots(y["train"], config["shots"], np.random.default_rng([config["seed"], 0]))
    evals = {"val": x["val"], "test": x["test"]}
    probs, temps = calibrated(source_logits(x["train"], y["train"], shot_idx, head, evals, config, num_classes, text),
                              y["val"], config["calibrate"])
    out, test_probs = {}, {src: p["test"] for src, p in probs.items()}
    for src in probs:
        out[f"info/{src}_temperature"] = temps[src]
        for split in evals:
            out.update(prefixed(split, src, classification_metrics(probs[src][split], y[split])))

    a, b = fusion_pair(config)
    fused = {alpha: {split: fuse(probs[a][split], probs[b][split], alpha) for split in evals} for alpha in alphas}
    per_alpha = {alpha: {split: classification_metrics(p[split], y[split]) for split in evals} for alpha, p in fused.items()}
    best = select_alpha({alpha: m["val"] for alpha, m in per_alpha.items()}, config["alpha_metric"])
    out["info/fusion_alpha"] = best
    for split in evals:
        for alpha, m in per_alpha.items():
            out.update(prefixed(split, "fusion", m[split], alpha=alpha))
        out.update(prefixed(split, "fusion", per_alpha[best][split]))
    for alpha, p in fused.items():
        test_probs[_method("fusion", alpha=alpha)] = p["test"]
    test_probs["fusion"] = fused[best]["test"]
    return out, test_probs


def _method(name: str, **axes) -> str:
    """The method part of a metric key, axes included (``fusion:alpha:0.35``)."""
    return metric_key("test", name, "_", **axes).split("/")[1]


def stacker_metrics(config: dict, x: dict, y: dict, num_classes: int, head: LinearHead,
                    text: np.ndarray | None) -> tuple[dict[str, float], np.ndarray]:
    """(metrics, test probabilities) of the stacker. It learns on a stratified holdout of train
    from sources fit on the rest of it (``head`` was trained on that rest). With own-cnn the
    encoder itself saw the holdout images: its train-split features are fitted features
    whichever part of train they come from."""
    seed = int(config["seed"])
    fit_idx, hold_idx = stratified_holdout(y["train"], config["stacker_holdout"], seed)
    fit_x, fit_y = x["train"][fit_idx], y["train"][fit_idx]
    shot_idx = sample_shots(fit_y, config["shots"], np.random.default_rng([seed, 1]))
    evals = {"holdout": x["train"][hold_idx], "val": x["val"], "test": x["test"]}
    probs, _ = calibrated(source_logits(fit_x, fit_y, shot_idx, head, evals, config, num_classes, text), y["val"], config["calibrate"])
    inputs = {split: [probs[src][split] for src in sorted(probs)] for split in evals}
    model = fit_stacker(inputs["holdout"], y["train"][hold_idx], config["stacker_C"], seed)
    out, stacked = {}, {}
    for split in ("val", "test"):
        stacked[split] = stacker_probs(model, inputs[split], num_classes)
        out.update(prefixed(split, "stacker", classification_metrics(stacked[split], y[split])))
    return out, stacked["test"]


# ---------------------------------------------------------------- the family


INVALID_CONFIGS = [{"fusion_a": "prototype", "fusion_b": "prototype"}, {"fusion_a": "auto", "fusion_b": "prototype"},
                   {"fusion_b": "zeroshot"}, {"supervised_checkpoint": "/nonexistent/head.pt"}, {"stacker_holdout": 0.001}]


def check(config: dict) -> None:
    """Refuse, before anything starts, every config ``train`` cannot run (no image decoded, no
    encoder built)."""
    a, b = fusion_pair(config)
    for field, name in (("fusion_a", a), ("fusion_b", b)):
        require(name != "zeroshot" or config["encoder"] == "clip-vit-b32",
                f"{field} zeroshot needs encoder clip-vit-b32 (its text tower), not {config['encoder']}")
    require(a != b, f"fusion_a {config['fusion_a']!r} and fusion_b {config['fusion_b']!r} are both the {a} source")
    if config["encoder"] == "clip-vit-b32":
        try:
            load_prompts(config.get("prompts", ""))
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"prompts {config.get('prompts', '')!r}: {exc}") from None
    try:
        counts = train_class_counts(config["dataset"], max_train=config["max_train"] or None)
    except DataError as exc:
        raise ConfigError(str(exc)) from None
    if config.get("supervised_checkpoint"):
        try:
            load_supervised_head(config["supervised_checkpoint"], FEATURE_DIMS[config["encoder"]], len(counts), torch.device("cpu"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if config["stacker"]:
        n, classes, frac = int(counts.sum()), len(counts), config["stacker_holdout"]
        where = f"stacker_holdout {frac} of the {n} training images of {config['dataset']} (max_train {config['max_train']})"
        require(counts.min() >= 2, f"the stacker's stratified holdout needs 2 training images per class; "
                                   f"{config['dataset']} (max_train {config['max_train']}) has a class with {counts.min()}")
        held = math.ceil(frac * n)  # how scikit-learn's train_test_split sizes a float test_size
        require(held >= classes and n - held >= classes,
                f"{where}: the holdout and the rest must each hold one image of each of the {classes} classes")


def train(config: dict, report, restore: dict | None = None) -> None:
    check(config)
    trial = Trial(config, report, restore)
    device = training.resolve_device(config.get("device", "auto"))
    alphas = [float(a) for a in (config.get("eval") or {}).get("alpha", DEFAULT_ALPHAS)]
    ds = load_dataset(config["dataset"], max_train=config["max_train"] or None, max_test=config["max_test"] or None)
    with trial.timed("features"):
        fs = extract_features(ds, config["encoder"], device=str(device), cache_dir=config.get("cache_dir") or None, progress=False)
    x = {s: np.array(fs.split(s), dtype=np.float32) for s in ("train", "val", "test")}
    y = {s: getattr(ds, s).labels for s in ("train", "val", "test")}
    text = zeroshot_classifier(ds, config, device)

    heads, fits = {}, {}
    if config.get("supervised_checkpoint"):
        heads["supervised"] = load_supervised_head(config["supervised_checkpoint"], fs.dim, ds.num_classes, device)
    else:
        fits["supervised"] = HeadFit.create(x["train"], y["train"], ds.num_classes, config, device, trial.seed)
    if config["stacker"]:
        fit_idx, _ = stratified_holdout(y["train"], config["stacker_holdout"], trial.seed)
        fits["stacker_supervised"] = HeadFit.create(x["train"][fit_idx], y["train"][fit_idx], ds.num_classes, config, device,
                                                    trial.seed + STACKER_SEED_OFFSET)
    for name, fit in fits.items():
        heads[name] = fit.head
        trial.track(**{f"head:{name}": fit.head, f"optimizer:{name}": fit.optimizer, f"generator:{name}": fit.generator})

    last_epoch = config["epochs"] if fits else 1  # nothing to train: one report with the results
    with single_thread_on_cpu(device):
        for epoch in trial.epochs(last_epoch):
            metrics: dict[str, float] = {}
            for name, fit in fits.items():
                with trial.timed("supervised_train"):
                    metrics[metric_key("train", name, "loss")] = loss = fit.epoch(config["batch_size"])
                if training.is_diverged(loss):
                    return trial.diverged(epoch)
            if "supervised" in fits:
                val_pred = head_logits(fits["supervised"].head, x["val"]).argmax(1)
                metrics[metric_key("val", "supervised", "acc")] = float(np.mean(val_pred == y["val"]))
            if epoch == last_epoch:
                metrics.update(final_metrics(trial, config, x, y, ds.num_classes, heads, text, alphas))
            trial.report(epoch, metrics, done=epoch == last_epoch)


def final_metrics(trial: Trial, config: dict, x: dict, y: dict, num_classes: int, heads: dict[str, LinearHead],
                  text: np.ndarray | None, alphas: list[float]) -> dict[str, float]:
    """Every final metric (sources, fusion per alpha and at the val-chosen alpha, the stacker),
    and the reliability bins of every test probability matrix behind an ECE."""
    out: dict[str, float] = {"info/zeroshot_available": float(text is not None)}
    with trial.timed("eval"):
        metrics, test_probs = source_and_fusion_metrics(config, x, y, num_classes, heads["supervised"], text, alphas)
    out.update(metrics)
    if "stacker_supervised" in heads:
        with trial.timed("stacker"):
            metrics, test_probs["stacker"] = stacker_metrics(config, x, y, num_classes, heads["stacker_supervised"], text)
        out.update(metrics)
        out["perf/stacker_ms"] = trial.ms("stacker")
    for method, probs in test_probs.items():
        trial.reliability("test", method, probs, y["test"])
    out.update({"perf/eval_ms": trial.ms("eval"), "perf/features_ms": trial.ms("features"),
                "perf/supervised_train_ms": trial.ms("supervised_train")})
    return out
