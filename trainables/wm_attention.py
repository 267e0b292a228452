"""Working memory with task-guided attention (seed 004): N-back tasks over quadrant stimuli.

One trial trains ONE model, named in metrics by its method:

* ``baseline``:  CNN front end -> global average pool -> [context, task] -> RNN -> 3-way head
* ``attention``: CNN front end -> :class:`TaskGuidedAttention` (task vector -> query, each
  position of the spatial map -> key, softmax over positions) -> [context, task] -> RNN -> head

Stimuli, tasks, scenarios (STSF / STMF / MTMF) and splits are built in ``trainables.wm_tasks``.
After training, the best (early-stopped) model is evaluated on test sequences and analysed on
its hidden states; every analysis is a ``test/<method>/<metric>`` metric:

* ``acc`` etc. (decision steps t >= N only), ``acc_all_steps``, ``acc_<task>`` (e.g.
  ``acc_2back_identity``), and ``gen_acc`` / ``gen_acc_<task>`` on the generalisation split
  (held-out view or identities) when the split is not ``random``.
* ``decode_relevant`` / ``decode_irrelevant``: mean cross-validated accuracy of linear decoders
  (z-scored hidden state -> feature of the stimulus shown at that step), over steps and tasks,
  for the task's own feature vs the other two; ``decode_<feature>_relevant|irrelevant`` split
  them by feature (the features have different chance levels: 1/4, 1/(classes*identities),
  1/classes).
* ``orthogonality_rnn`` / ``orthogonality_cnn``: 1 - mean |cos| between the hyperplane normals
  (rows of ``coef_``) of decoders of *different* features, averaged over feature pairs (and
  over steps and tasks for the RNN). 1 = the features are read out along orthogonal axes.
  CNN features are the globally pooled front-end maps of every stimulus the test shows.
* ``procrustes_disparity``: scipy's Procrustes disparity between the centroids (one per value
  of the task feature, in the top V - 1 principal components of the hidden states) of the
  stimulus shown at step s as represented at steps t and t + 1, averaged over s <= t and tasks;
  ``swap_disparity``: the same after applying the transform fitted for one (s, t) to another
  (s', t') -- close to ``procrustes_disparity`` means one shared, time-invariant
  transformation moves memories along; much larger means each step transforms differently.
* attention only: ``attn_entropy`` (nats), ``attn_sparsity`` (Hoyer: 0 uniform, 1 one-hot),
  ``attn_on_stimulus`` (weight mass on the stimulus's quadrant), each also per task.

Artifacts (when ``config["artifact_dir"]`` is set): ``analysis.json`` (every number, with the
per-step decoding curves), ``decoding.png`` and, for the attention model,
``attention_heatmaps.png`` (one test sequence per task, weights over the input canvas).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.spatial import procrustes
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from trainables.common.checks import require
from trainables.common.data import load_dataset, train_class_counts
from trainables.common.encoders import IMAGENET_WEIGHTS, imagenet_state_dict, imagenet_weights_problem
from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics, prefixed
from trainables.common.training import EarlyStopping, is_diverged, resolve_device
from trainables.wm_tasks import (
    FEATURES,
    N_LOCATIONS,
    N_VIEWS,
    NO_ACTION,
    RESPONSES,
    SCENARIOS,
    SPLITS,
    Sequences,
    Task,
    generate,
    pick_identities,
    render_stimuli,
    scenario_tasks,
    split_pools,
)

# ---------------------------------------------------------------- front ends


class SmallCNN(nn.Module):
    """Three 3x3 conv-BatchNorm-ReLU blocks, two 2x2 max-pools: a (C, 4h, 4w) canvas -> a
    (channels, h, w) map. BatchNorm matters: without it the pooled features of stimuli differ
    by ~1% of their size and the recurrent network sits at chance for thousands of steps."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.out_channels = channels

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.net = nn.Sequential(*block(in_channels, channels // 2), nn.MaxPool2d(2),
                                 *block(channels // 2, channels), nn.MaxPool2d(2), *block(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet cut before its global pool; grey images are repeated to 3 channels.
    ``pretrained: imagenet`` loads the weights of the one resolver every family uses
    (``trainables.common.encoders.imagenet_state_dict``: missing weights are an error, never a
    random init); ``none`` trains it from a random init."""

    def __init__(self, name: str, pretrained: str):
        super().__init__()
        from torchvision import models

        net = getattr(models, name)(weights=None)
        if pretrained == "imagenet":
            net.load_state_dict(imagenet_state_dict(name))
        self.trunk = nn.Sequential(*list(net.children())[:-2])
        self.out_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.trunk(x)


def build_frontend(name: str, in_channels: int, pretrained: str, cnn_channels: int) -> nn.Module:
    """``cnn`` (trained from scratch) or a ResNet trunk (``check`` refuses any other name)."""
    return SmallCNN(in_channels, cnn_channels) if name == "cnn" else ResNetTrunk(name, pretrained)


# ---------------------------------------------------------------- the model


class TaskGuidedAttention(nn.Module):
    """Multiplicative spatial attention whose query comes from the task vector.

    score(p) = key(f_p) . query(task) / sqrt(hidden), softmax over the h*w positions p, context
    = sum_p weight_p f_p. ``forward(maps (N, C, h, w), task (N, D))`` -> ``(context (N, C),
    weights (N, h*w))``; the returned weights are the softmax (they sum to 1), dropout applies
    only to the copy used for the weighted sum. The keys are never materialised:
    key(f) . q = f . (W_k^T q) + b_k . q, which is the same number at 1/hidden of the cost."""

    def __init__(self, task_dim: int, feature_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.query = nn.Linear(task_dim, hidden)
        self.key = nn.Linear(feature_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, maps: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = maps.flatten(2).transpose(1, 2)  # (N, P, C)
        q = self.query(task)  # (N, hidden)
        scores = torch.einsum("npc,nc->np", feats, q @ self.key.weight) + (q @ self.key.bias)[:, None]
        weights = (scores * self.scale).softmax(-1)
        context = torch.einsum("np,npc->nc", self.dropout(weights), feats)
        return context, weights


class WorkingMemoryNet(nn.Module):
    RNNS = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}

    def __init__(self, frontend: nn.Module, task_dim: int, *, attention: bool, attention_hidden: int,
                 attention_dropout: float, rnn: str, hidden_size: int, freeze_frontend: bool, input_size: int):
        super().__init__()
        self.frontend, self.freeze_frontend, self.input_size = frontend, freeze_frontend, input_size
        if freeze_frontend:
            frontend.requires_grad_(False)
        feat = frontend.out_channels
        self.attention = TaskGuidedAttention(task_dim, feat, attention_hidden, attention_dropout) if attention else None
        self.rnn = self.RNNS[rnn](feat + task_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, len(RESPONSES))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_frontend:
            self.frontend.eval()  # a frozen front end keeps its BatchNorm statistics
        return self

    def encode(self, stimuli: torch.Tensor) -> torch.Tensor:
        """Front-end feature maps (S, C, h, w) of canvases (S, C, H, W)."""
        if self.input_size and stimuli.shape[-1] != self.input_size:
            stimuli = F.interpolate(stimuli, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_frontend):
            return self.frontend(stimuli)

    def forward(self, stimuli: torch.Tensor, index: torch.Tensor, task: torch.Tensor) -> dict[str, torch.Tensor]:
        """``stimuli``: every canvas (S, C, H, W); ``index`` (B, T) into it; ``task`` (B, D) one-hot.
        The front end runs once per distinct stimulus of the batch (same result, fewer convs)."""
        b, t = index.shape
        uniq, inverse = index.unique(return_inverse=True)
        maps = self.encode(stimuli[uniq])[inverse.flatten()]  # (B*T, C, h, w)
        task_steps = task.repeat_interleave(t, 0)
        out = {"pooled": maps.mean((-2, -1)).view(b, t, -1)}
        if self.attention is not None:
            context, weights = self.attention(maps, task_steps)
            out["attention"] = weights.view(b, t, *maps.shape[-2:])
        else:
            context = out["pooled"].flatten(0, 1)
        hidden, _ = self.rnn(torch.cat([context, task_steps], -1).view(b, t, -1))
        out["hidden"], out["logits"] = hidden, self.head(hidden)
        return out


# ---------------------------------------------------------------- data for one trial


class Stimuli:
    """The rendered canvases of one trial (uint8 for plots, float on the device for the model)."""

    def __init__(self, config: dict, device: torch.device):
        ds = load_dataset(config["dataset"])
        self.n_categories, self.n_identities = config["n_categories"], config["n_identities"]
        objects = pick_identities(ds.train.images, ds.train.labels, self.n_categories, self.n_identities)
        self.canvas = render_stimuli(objects)
        self.tensor = ds.to_float(self.canvas, device)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _batch_tensors(seqs: Sequences, n_tasks: int, n_identities: int, device) -> tuple[torch.Tensor, ...]:
    index = torch.as_tensor(seqs.stimulus_index(n_identities), device=device)
    task = F.one_hot(torch.as_tensor(seqs.task, device=device), n_tasks).float()
    return index, task, torch.as_tensor(seqs.target, device=device)


def _weighted_loss(logits: torch.Tensor, target: torch.Tensor, no_action_weight: float) -> torch.Tensor:
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    w = torch.where(target.flatten() == NO_ACTION, no_action_weight, 1.0)
    return (ce * w).sum() / w.sum()


def run_model(model: WorkingMemoryNet, stim: Stimuli, seqs: Sequences, n_tasks: int, batch_size: int) -> dict[str, np.ndarray]:
    """Eval-mode outputs for every sequence: logits (B, T, 3), hidden, pooled, attention."""
    with torch.no_grad():  # not @torch.no_grad(): mutmut never mutates a decorated function
        model.eval()
        outs: dict[str, list] = {}
        for start in range(0, len(seqs), batch_size):
            part = seqs.subset(np.arange(start, min(start + batch_size, len(seqs))))
            index, task, _ = _batch_tensors(part, n_tasks, stim.n_identities, stim.tensor.device)
            out = model(stim.tensor, index, task)
            for key, value in out.items():
                outs.setdefault(key, []).append(value.cpu().numpy())
        result = {key: np.concatenate(value) for key, value in outs.items()}
        result["probs"] = torch.as_tensor(result["logits"]).softmax(-1).numpy()
        return result


def response_metrics(out: dict[str, np.ndarray], seqs: Sequences, tasks: list[Task], no_action_weight: float,
                     prefix: str = "") -> dict[str, float]:
    """Contract metrics over decision steps (t >= N), the training loss, all-step and per-task accuracy."""
    probs = out["probs"]
    decision = seqs.target != NO_ACTION
    m = classification_metrics(probs[decision], seqs.target[decision])
    m.pop("top5")  # three responses: top-5 is always 1
    m["loss"] = float(_weighted_loss(torch.as_tensor(out["logits"]), torch.as_tensor(seqs.target), no_action_weight))
    pred = probs.argmax(-1)
    m["acc_all_steps"] = float(np.mean(pred == seqs.target))
    for k, task in enumerate(tasks):
        rows = decision & (seqs.task == k)[:, None]
        if rows.any():
            m[f"acc_{task.name}"] = float(np.mean(pred[rows] == seqs.target[rows]))
    return {f"{prefix}{name}": value for name, value in m.items()}


# ---------------------------------------------------------------- analyses


def decode(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[float, np.ndarray] | None:
    """Cross-validated accuracy of a linear decoder (z-score -> logistic regression) of ``y`` from
    ``x``, and the hyperplane normals (``coef_``, one row per class or one for two classes) of
    the decoder fitted on all of it. Classes with fewer than ``folds`` samples are left out;
    None when fewer than two classes remain."""
    values, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, values[counts >= folds])
    if len(np.unique(y[keep])) < 2:
        return None
    x, y = x[keep], y[keep]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200, tol=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        acc = float(np.mean(cross_val_score(clf, x, y, cv=cv)))
        clf.fit(x, y)
    return acc, clf[-1].coef_


def orthogonality(normals: list[np.ndarray]) -> float:
    """1 - mean |cos| between the normals of decoders of different features (mean over pairs)."""
    unit = [w / np.linalg.norm(w, axis=1, keepdims=True) for w in normals]
    cos = [np.abs(a @ b.T).mean() for i, a in enumerate(unit) for b in unit[i + 1 :]]
    return float(1.0 - np.mean(cos))


def _standardize(m: np.ndarray) -> np.ndarray:
    m = m - m.mean(0)
    return m / np.linalg.norm(m)


def fit_procrustes(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
    """Rotation R and scale s mapping standardised ``src`` onto standardised ``dst``
    (scipy.spatial.procrustes' convention: centre, unit Frobenius norm, then rotate and scale)."""
    r, s = orthogonal_procrustes(_standardize(dst), _standardize(src))
    return r, s


def transfer_disparity(src: np.ndarray, dst: np.ndarray, transform: tuple[np.ndarray, float]) -> float:
    """Disparity between standardised ``dst`` and standardised ``src`` moved by ``transform``."""
    r, s = transform
    return float(np.sum((_standardize(dst) - _standardize(src) @ r.T * s) ** 2))


def procrustes_analysis(hidden: np.ndarray, values: np.ndarray) -> tuple[float, float] | None:
    """Own and swapped Procrustes disparities of centroid configurations across steps.

    ``hidden`` (B, T, H); ``values`` (B, T) the analysed feature (V values). M(s, t) holds, per
    value of the feature of the stimulus shown at step s, the mean hidden state at step t, in
    the top V - 1 principal components of all of ``hidden``: V centred points span at most
    V - 1 dimensions, and a rotation fitted in more would be arbitrary off that span, which
    makes the swap meaningless. Each consecutive pair (M(s, t), M(s, t+1)), s <= t, gets scipy's
    disparity and a fitted transform; the swap disparity applies each pair's transform to every
    other pair."""
    b, t_len, dim = hidden.shape
    shared = set(np.unique(values[:, 0]))
    for s in range(1, t_len):
        shared &= set(np.unique(values[:, s]))
    rows = sorted(shared)
    if len(rows) < 3:
        return None
    flat = hidden.reshape(-1, dim)
    basis = np.linalg.svd(flat - flat.mean(0), full_matrices=False)[2][: len(rows) - 1].T
    projected = hidden @ basis

    def centroids(s: int, t: int) -> np.ndarray:
        return np.stack([projected[values[:, s] == v, t].mean(0) for v in rows])

    pairs = [(centroids(s, t), centroids(s, t + 1)) for s in range(t_len - 1) for t in range(s, t_len - 1)]
    own = [procrustes(dst, src)[2] for src, dst in pairs]
    transforms = [fit_procrustes(src, dst) for src, dst in pairs]
    swap = [transfer_disparity(src, dst, transforms[j]) for i, (src, dst) in enumerate(pairs)
            for j in range(len(pairs)) if j != i]
    return float(np.mean(own)), float(np.mean(swap))


def attention_stats(weights: np.ndarray, location: np.ndarray) -> dict[str, float]:
    """Entropy (nats), Hoyer sparsity and mass on the stimulus's quadrant of attention weights
    (N, h, w) whose stimuli sit in quadrants ``location`` (N,)."""
    n, h, w = weights.shape
    flat = weights.reshape(n, -1)
    entropy = -(flat * np.log(np.clip(flat, 1e-12, None))).sum(1)
    p = flat.shape[1]
    ratio = np.abs(flat).sum(1) / np.linalg.norm(flat, axis=1)
    sparsity = (math.sqrt(p) - ratio) / (math.sqrt(p) - 1) if p > 1 else np.zeros(n)
    out = {"attn_entropy": float(entropy.mean()), "attn_sparsity": float(np.mean(sparsity))}
    if h >= 2 and w >= 2:
        quadrant = (np.arange(h)[:, None] >= h / 2) * 2 + (np.arange(w)[None, :] >= w / 2)
        on = (weights * (quadrant[None] == location[:, None, None])).sum((1, 2))
        out["attn_on_stimulus"] = float(on.mean())
    return out


def analyse(model: WorkingMemoryNet, stim: Stimuli, seqs: Sequences, out: dict, tasks: list[Task], config: dict) -> tuple[dict, dict]:
    """Every representational analysis of the module docstring on test sequences ``seqs`` and
    the model's outputs on them ``out``; returns (metrics, details for analysis.json)."""
    folds, seed, n_id = config["decode_folds"], config["seed"], stim.n_identities
    rng = _rng(seed, 7)
    hidden = out["hidden"]
    samples: dict[str, list[float]] = defaultdict(list)
    curves: dict[str, dict[str, list]] = {}
    for k, task in enumerate(tasks):
        mine = seqs.task == k
        rows = rng.permutation(np.flatnonzero(mine))[: config["decode_max_samples"]]
        curves[task.name] = {f: [] for f in FEATURES}
        for t in range(hidden.shape[1]):
            normals = []
            for f in FEATURES:
                result = decode(hidden[rows, t], seqs.feature(f, n_id)[rows, t], folds, seed)
                curves[task.name][f].append(None if result is None else result[0])
                if result is not None:
                    kind = "relevant" if f == task.feature else "irrelevant"
                    samples[f"decode_{kind}"].append(result[0])
                    samples[f"decode_{f}_{kind}"].append(result[0])
                    normals.append(result[1])
            if len(normals) > 1:
                samples["orthogonality_rnn"].append(orthogonality(normals))
        disparities = procrustes_analysis(hidden[mine], seqs.feature(task.feature, n_id)[mine])
        if disparities is not None:
            samples["procrustes_disparity"].append(disparities[0])
            samples["swap_disparity"].append(disparities[1])
    metrics = {name: float(np.mean(values)) for name, values in samples.items()}
    # CNN features: the pooled front-end map of every stimulus the test sequences show
    shown = np.unique(seqs.stimulus_index(n_id))
    with torch.no_grad():
        cnn = model.encode(stim.tensor[torch.as_tensor(shown, device=stim.tensor.device)]).mean((-2, -1)).cpu().numpy()
    obj = shown // (N_LOCATIONS * N_VIEWS)
    labels = {"location": shown % N_LOCATIONS, "identity": obj, "category": obj // n_id}
    normals = [r[1] for r in (decode(cnn, labels[f], folds, seed) for f in FEATURES) if r is not None]
    if len(normals) > 1:
        metrics["orthogonality_cnn"] = orthogonality(normals)
    if "attention" in out:
        weights = out["attention"]
        metrics.update(attention_stats(weights.reshape(-1, *weights.shape[2:]), seqs.location.reshape(-1)))
        for k, task in enumerate(tasks):
            mine = seqs.task == k
            stats = attention_stats(weights[mine].reshape(-1, *weights.shape[2:]), seqs.location[mine].reshape(-1))
            metrics.update({f"{name}_{task.name}": value for name, value in stats.items()})
    return metrics, {"decoding_by_step": curves}


# ---------------------------------------------------------------- artifacts


def save_artifacts(directory: str, method: str, metrics: dict, details: dict, stim: Stimuli, seqs: Sequences,
                   out: dict, tasks: list[Task]) -> list[str]:
    """Write analysis.json, decoding.png and (attention model) attention_heatmaps.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / "analysis.json").write_text(json.dumps({"method": method, "metrics": metrics, **details}, indent=2))
    figures = {"decoding.png": _plot_decoding(plt, method, details["decoding_by_step"])}
    if "attention" in out:
        figures["attention_heatmaps.png"] = _plot_attention(plt, stim, seqs, out, tasks)
    for name, fig in figures.items():
        fig.savefig(path / name, dpi=110)
        plt.close(fig)
    return ["analysis.json", *figures]


def _plot_decoding(plt, method: str, curves: dict[str, dict[str, list]]):
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False, sharey=True)
    for ax, (name, by_feat) in zip(axes[0], curves.items()):
        for f, accs in by_feat.items():
            relevant = name.endswith(f)
            ax.plot(range(len(accs)), accs, "-" if relevant else "--", marker="o", label=f + (" (task)" if relevant else ""))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("decoding accuracy (CV)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{method}: decoding of the current stimulus from the RNN state", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_attention(plt, stim: Stimuli, seqs: Sequences, out: dict, tasks: list[Task]):
    """The first test sequence of each task: canvases with the attention weights over them."""
    t_len = seqs.target.shape[1]
    fig, axes = plt.subplots(len(tasks), t_len, figsize=(1.6 * t_len, 1.8 * len(tasks)), squeeze=False)
    index = seqs.stimulus_index(stim.n_identities)
    pred = out["probs"].argmax(-1)
    shown = {k: int(np.flatnonzero(seqs.task == k)[0]) for k in range(len(tasks)) if (seqs.task == k).any()}
    vmax = float(out["attention"][list(shown.values())].max())  # one colour scale for every panel
    for k, b in shown.items():
        for t in range(t_len):
            ax = axes[k][t]
            canvas = stim.canvas[index[b, t]]
            extent = (0, canvas.shape[1], canvas.shape[0], 0)
            ax.imshow(canvas.squeeze(-1) if canvas.shape[-1] == 1 else canvas, cmap="gray", extent=extent)
            ax.imshow(out["attention"][b, t], cmap="inferno", alpha=0.55, extent=extent, interpolation="nearest",
                      vmin=0.0, vmax=vmax)
            ax.set_title(f"{RESPONSES[seqs.target[b, t]]}\n-> {RESPONSES[pred[b, t]]}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[k][0].set_ylabel(tasks[k].name, fontsize=7)
    fig.suptitle(f"attention over the canvas (target -> response); colour 0 to {vmax:.2f}", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- training

# configs ``check`` refuses, as overrides of the smoke study (the conformance suite holds it to them)
INVALID_CONFIGS = [{"scenario": "mtmf", "seq_len": 3}, {"scenario": "stsf", "n_back": 3, "seq_len": 3},
                   {"split": "novel_identity", "heldout_identities": 5, "n_identities": 5}, {"n_categories": 11},
                   {"n_identities": 200}, {"rnn": "transformer"}, {"frontend": "vgg"}, {"pretrained": "random"},
                   {"scenario": "sequential"}]


def check(config: dict) -> None:
    """The cross-field rules ``train`` relies on, from the config and the dataset's labels only."""
    scenario, split = config["scenario"], config["split"]
    require(scenario in SCENARIOS, f"scenario {scenario!r} must be one of {', '.join(SCENARIOS)}")
    require(split in SPLITS, f"split {split!r} must be one of {', '.join(SPLITS)}")
    longest = 3 if scenario == "mtmf" else config["n_back"]
    require(config["seq_len"] > longest,
            f"seq_len {config['seq_len']} must exceed the largest N of scenario {scenario} "
            f"({'its 3-back tasks' if scenario == 'mtmf' else 'n_back'} {longest}): steps before N have no decision")
    n_id, held = config["n_identities"], config["heldout_identities"]
    require(split != "novel_identity" or 1 <= held < n_id,
            f"heldout_identities {held} must be in [1, n_identities {n_id}) for split novel_identity")
    require(config["frontend"] in ("cnn", *IMAGENET_WEIGHTS), f"frontend {config['frontend']!r} must be cnn, resnet18 or resnet50")
    require(config["rnn"] in WorkingMemoryNet.RNNS, f"rnn {config['rnn']!r} must be one of {', '.join(WorkingMemoryNet.RNNS)}")
    require(config["pretrained"] in ("imagenet", "none"), f"pretrained {config['pretrained']!r} must be imagenet or none")
    if config["frontend"] != "cnn" and config["pretrained"] == "imagenet":
        problem = imagenet_weights_problem(config["frontend"])
        require(problem is None, str(problem))
    counts = train_class_counts(config["dataset"])
    require(config["n_categories"] <= len(counts),
            f"n_categories {config['n_categories']} exceeds the {len(counts)} classes of {config['dataset']}")
    fewest = int(counts[: config["n_categories"]].min())
    require(fewest >= n_id, f"n_identities {n_id} exceeds the {fewest} training images of the smallest of the "
                            f"first {config['n_categories']} classes of {config['dataset']}")


def train(config: dict, report, restore: dict | None = None) -> None:
    trial = Trial(config, report, restore)
    if trial.finished:
        return  # the final report went out with that checkpoint
    check(config)
    seed, device = trial.seed, resolve_device(config.get("device", "auto"))
    method = "attention" if config["attention"] else "baseline"
    tasks = scenario_tasks(config["scenario"], config["n_back"], config["feature"])
    pool, gen_pool = split_pools(config["split"], config["n_identities"], config["heldout_identities"])
    stim = Stimuli(config, device)
    gen_kw = dict(n_categories=stim.n_categories, seq_len=config["seq_len"], match_prob=config["match_prob"])
    val_seqs = generate(_rng(seed, 1), config["val_sequences"], tasks, pool, **gen_kw)

    frontend = build_frontend(config["frontend"], stim.tensor.shape[1], config["pretrained"], config["cnn_channels"])
    model = WorkingMemoryNet(
        frontend, len(tasks), attention=bool(config["attention"]), attention_hidden=config["attention_hidden"],
        attention_dropout=config["attention_dropout"], rnn=config["rnn"], hidden_size=config["hidden_size"],
        freeze_frontend=bool(config["freeze_frontend"]), input_size=config["input_size"]).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config["lr"],
                                  weight_decay=config["weight_decay"])
    stopper = EarlyStopping(config["patience"], mode="max")
    trial.track(model=model, optimizer=optimizer, early_stopping=stopper)
    trial.value("best_model", copy.deepcopy(model.state_dict()))

    bs, n_tasks = config["batch_size"], len(tasks)
    for epoch in trial.epochs(config["epochs"]):
        before = trial.ms("train")
        with trial.timed("train"):
            model.train()
            seqs = generate(_rng(seed, 0, epoch), config["train_sequences"], tasks, pool, **gen_kw)
            index, task, target = _batch_tensors(seqs, n_tasks, stim.n_identities, device)
            losses, correct, count = [], 0, 0
            for start_row in range(0, len(seqs), bs):
                rows = slice(start_row, start_row + bs)
                out = model(stim.tensor, index[rows], task[rows])
                loss = _weighted_loss(out["logits"], target[rows], config["no_action_weight"])
                if is_diverged(loss):
                    return trial.diverged(epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
                optimizer.step()
                losses.append(loss.item())
                decision = target[rows] != NO_ACTION
                correct += int((out["logits"].argmax(-1) == target[rows])[decision].sum())
                count += int(decision.sum())
            val = response_metrics(run_model(model, stim, val_seqs, n_tasks, bs), val_seqs, tasks, config["no_action_weight"])
        if stopper.improved(val["acc"]):
            trial.values["best_model"] = copy.deepcopy(model.state_dict())
        # N-back training sits at chance for hundreds of steps before it takes off: no early stop
        # before min_epochs, or a plateau would end the trial
        stop = stopper.step(val["acc"]) and epoch >= config["min_epochs"]
        done = stop or epoch == config["epochs"]
        metrics = {**prefixed("train", method, {"loss": float(np.mean(losses)), "acc": correct / max(count, 1)}),
                   **prefixed("val", method, val), "perf/epoch_ms": trial.ms("train") - before}
        if done:  # the final report describes the early-stopped (best-val) model, val included
            model.load_state_dict(trial.values["best_model"])
            best_val = response_metrics(run_model(model, stim, val_seqs, n_tasks, bs), val_seqs, tasks, config["no_action_weight"])
            metrics.update(prefixed("val", method, best_val))
            metrics.update(final_metrics(trial, model, stim, tasks, pool, gen_pool, gen_kw, method, config))
            metrics["perf/train_ms"] = trial.ms("train")
        trial.report(epoch, metrics, done=done)
        if done:
            return


def final_metrics(trial: Trial, model, stim, tasks, pool, gen_pool, gen_kw, method: str, config: dict) -> dict[str, float]:
    """Test metrics (in-distribution and generalisation), analyses, artifacts and timings; the
    reliability bins of the test ECE (decision steps)."""
    seed, bs, n_tasks = config["seed"], config["batch_size"], len(tasks)
    test_seqs = generate(_rng(seed, 2), config["test_sequences"], tasks, pool, **gen_kw)
    tic = time.perf_counter()
    out = run_model(model, stim, test_seqs, n_tasks, bs)
    infer_ms = (time.perf_counter() - tic) * 1000 / len(test_seqs)
    test = response_metrics(out, test_seqs, tasks, config["no_action_weight"])
    decision = test_seqs.target != NO_ACTION
    trial.reliability("test", method, out["probs"][decision], test_seqs.target[decision])
    if gen_pool is not None:
        gen_seqs = generate(_rng(seed, 3), config["test_sequences"], tasks, gen_pool, **gen_kw)
        gen_out = run_model(model, stim, gen_seqs, n_tasks, bs)
        test.update(response_metrics(gen_out, gen_seqs, tasks, config["no_action_weight"], prefix="gen_"))
    tic = time.perf_counter()
    analysis, details = analyse(model, stim, test_seqs, out, tasks, config)
    test.update(analysis)
    analysis_ms = (time.perf_counter() - tic) * 1000
    if config.get("artifact_dir"):
        save_artifacts(config["artifact_dir"], method, test, details, stim, test_seqs, out, tasks)
    return {**prefixed("test", method, test), "perf/infer_per_sequence_ms": infer_ms, "perf/analysis_ms": analysis_ms}
