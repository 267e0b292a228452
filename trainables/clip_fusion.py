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

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainables.common import training
from trainables.common.data import load_dataset
from trainables.common.metrics import classification_metrics, metric_key, negative_log_likelihood, prefixed

DEFAULT_ALPHAS = [round(0.05 * i, 2) for i in range(21)]
PROMPTS_PATH = Path(__file__).parent / "prompts" / "clip_prompts.json"
TEMPERATURE_BOUNDS = (1e-2, 1e2)
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


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return negative_log_likelihood(softmax(np.asarray(logits, np.float64) / temperature, axis=1), labels)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The scalar T minimising the NLL of softmax(logits / T) on (val) labels: a bounded Brent
    search over log T (the NLL is unimodal in it), kept only when it beats T = 1, so scaling
    never raises the NLL it was fit on. When every label is already the argmax the NLL falls
    without limit as T -> 0: nothing identifies a temperature, and T = 1 is kept (a T at the
    search bound would make every later mistake cost ~log 1e12)."""
    logits = np.asarray(logits, np.float64)
    if np.all(logits.argmax(1) == labels):
        return 1.0
    res = minimize_scalar(lambda log_t: temperature_nll(logits, labels, np.exp(log_t)),
                          bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-5})
    t = float(np.exp(res.x))
    return t if temperature_nll(logits, labels, t) < temperature_nll(logits, labels, 1.0) else 1.0


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


@torch.no_grad()
def head_logits(head: LinearHead, x: np.ndarray) -> np.ndarray:
    head.eval()
    device = head.mean.device
    return head(torch.as_tensor(x, device=device)).double().cpu().numpy()


def load_supervised_head(path: str, dim: int, num_classes: int, device: torch.device) -> LinearHead:
    """A head from ``path``: this family's checkpoint dict (its ``heads.supervised``) or a bare
    :class:`LinearHead` state dict, saved with ``torch.save``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ValueError(f"supervised_checkpoint {path!r} cannot be read: {exc}") from None
    if "heads" in state:
        state = state["heads"].get("supervised", {})
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


def fusion_pair(config: dict, zeroshot_available: bool) -> tuple[str, str]:
    a = config["fusion_a"]
    if a == "auto":
        a = "zeroshot" if zeroshot_available else "prototype"
    b = config["fusion_b"]
    for name in (a, b):
        if name == "zeroshot" and not zeroshot_available:
            raise ValueError("the zeroshot source needs encoder clip-vit-b32 with open_clip and its weights cached")
    if a == b:
        raise ValueError(f"fusion_a and fusion_b must differ, both are {a!r}")
    return a, b


def evaluate(config: dict, x: dict, y: dict, num_classes: int, heads: dict[str, LinearHead],
             text: np.ndarray | None, alphas: list[float]) -> dict[str, float]:
    """Every final metric: the sources, fusion per alpha and at the val-chosen alpha, the stacker."""
    out: dict[str, float] = {"info/zeroshot_available": float(text is not None)}
    start = time.perf_counter()
    out.update(source_and_fusion_metrics(config, x, y, num_classes, heads["supervised"], text, alphas))
    out["perf/eval_ms"] = 1000 * (time.perf_counter() - start)
    if "stacker_supervised" in heads:
        start = time.perf_counter()
        out.update(stacker_metrics(config, x, y, num_classes, heads["stacker_supervised"], text))
        out["perf/stacker_ms"] = 1000 * (time.perf_counter() - start)
    return out


def source_and_fusion_metrics(config: dict, x: dict, y: dict, num_classes: int, head: LinearHead,
                              text: np.ndarray | None, alphas: list[float]) -> dict[str, float]:
    shot_idx = sample_shots(y["train"], config["shots"], np.random.default_rng([config["seed"], 0]))
    evals = {"val": x["val"], "test": x["test"]}
    probs, temps = calibrated(source_logits(x["train"], y["train"], shot_idx, head, evals, config, num_classes, text),
                              y["val"], config["calibrate"])
    out = {}
    for src in probs:
        out[f"info/{src}_temperature"] = temps[src]
        for split in evals:
            out.update(prefixed(split, src, classification_metrics(probs[src][split], y[split])))

    a, b = fusion_pair(config, text is not None)
    per_alpha = {alpha: {split: classification_metrics(fuse(probs[a][split], probs[b][split], alpha), y[split]) for split in evals}
                 for alpha in alphas}
    best = select_alpha({alpha: m["val"] for alpha, m in per_alpha.items()}, config["alpha_metric"])
    out["info/fusion_alpha"] = best
    for split in evals:
        for alpha, m in per_alpha.items():
            out.update(prefixed(split, "fusion", m[split], alpha=alpha))
        out.update(prefixed(split, "fusion", per_alpha[best][split]))
    return out


def stacker_metrics(config: dict, x: dict, y: dict, num_classes: int, head: LinearHead, text: np.ndarray | None) -> dict[str, float]:
    """The stacker learns on a stratified holdout of train from sources fit on the rest of it
    (``head`` was trained on that rest). With own-cnn the encoder itself saw the holdout images:
    its train-split features are fitted features whichever part of train they come from."""
    seed = int(config["seed"])
    fit_idx, hold_idx = stratified_holdout(y["train"], config["stacker_holdout"], seed)
    fit_x, fit_y = x["train"][fit_idx], y["train"][fit_idx]
    shot_idx = sample_shots(fit_y, config["shots"], np.random.default_rng([seed, 1]))
    evals = {"holdout": x["train"][hold_idx], "val": x["val"], "test": x["test"]}
    probs, _ = calibrated(source_logits(fit_x, fit_y, shot_idx, head, evals, config, num_classes, text), y["val"], config["calibrate"])
    inputs = {split: [probs[src][split] for src in sorted(probs)] for split in evals}
    model = fit_stacker(inputs["holdout"], y["train"][hold_idx], config["stacker_C"], seed)
    out = {}
    for split in ("val", "test"):
        out.update(prefixed(split, "stacker", classification_metrics(stacker_probs(model, inputs[split], num_classes), y[split])))
    return out


# ---------------------------------------------------------------- the family


def make_checkpoint(epoch: int, train_ms: float, fits: dict[str, HeadFit]) -> dict:
    """Copies (not live references) of everything a resumed trial needs."""
    return {
        "epoch": epoch,
        "train_ms": train_ms,
        "heads": {name: {k: v.detach().cpu().clone() for k, v in fit.head.state_dict().items()} for name, fit in fits.items()},
        "optimizers": {name: copy.deepcopy(fit.optimizer.state_dict()) for name, fit in fits.items()},
        "generators": {name: fit.generator.get_state() for name, fit in fits.items()},
    }


def train(config: dict, report, restore: dict | None = None) -> None:
    from trainables.common.features import extract_features

    seed = int(config["seed"])
    training.seed_everything(seed)
    device = training.resolve_device(config.get("device", "auto"))
    alphas = [float(a) for a in (config.get("eval") or {}).get("alpha", DEFAULT_ALPHAS)]
    ds = load_dataset(config["dataset"], max_train=config["max_train"] or None, max_test=config["max_test"] or None)
    start = time.perf_counter()
    fs = extract_features(ds, config["encoder"], device=str(device), cache_dir=config.get("cache_dir") or None, progress=False)
    features_ms = 1000 * (time.perf_counter() - start)
    x = {s: np.array(getattr(fs, s), dtype=np.float32) for s in ("train", "val", "test")}
    y = {s: getattr(ds, s).labels for s in ("train", "val", "test")}
    text = zeroshot_classifier(ds, config, device)
    fusion_pair(config, text is not None)  # a bad pair fails before any training

    heads: dict[str, LinearHead] = {}
    fits: dict[str, HeadFit] = {}
    if config.get("supervised_checkpoint"):
        heads["supervised"] = load_supervised_head(config["supervised_checkpoint"], fs.dim, ds.num_classes, device)
    else:
        fits["supervised"] = HeadFit.create(x["train"], y["train"], ds.num_classes, config, device, seed)
    if config["stacker"]:
        fit_idx, _ = stratified_holdout(y["train"], config["stacker_holdout"], seed)
        fits["stacker_supervised"] = HeadFit.create(x["train"][fit_idx], y["train"][fit_idx], ds.num_classes, config, device,
                                                    seed + STACKER_SEED_OFFSET)
    heads.update({name: fit.head for name, fit in fits.items()})

    first_epoch, train_ms = 1, 0.0
    if restore is not None:
        for name, fit in fits.items():
            fit.head.load_state_dict(restore["heads"][name])
            fit.optimizer.load_state_dict(restore["optimizers"][name])
            fit.generator.set_state(restore["generators"][name])
        first_epoch, train_ms = restore["epoch"] + 1, restore["train_ms"]
    last_epoch = config["epochs"] if fits else 1  # nothing to train: one report with the results

    with single_thread_on_cpu(device):
        for epoch in range(first_epoch, last_epoch + 1):
            metrics: dict[str, float] = {"epoch": epoch}
            start = time.perf_counter()
            for name, fit in fits.items():
                loss = fit.epoch(config["batch_size"])
                if training.is_diverged(loss):
                    report({"diverged": 1.0, "epoch": epoch})
                    return
                metrics[metric_key("train", name, "loss")] = loss
            train_ms += 1000 * (time.perf_counter() - start)
            if "supervised" in fits:
                val_pred = head_logits(fits["supervised"].head, x["val"]).argmax(1)
                metrics[metric_key("val", "supervised", "acc")] = float(np.mean(val_pred == y["val"]))
            if epoch == last_epoch:
                metrics.update(evaluate(config, x, y, ds.num_classes, heads, text, alphas))
                metrics.update({"perf/features_ms": features_ms, "perf/supervised_train_ms": train_ms})
            report(metrics, checkpoint=make_checkpoint(epoch, train_ms, fits))
