"""Wiring of wm_attention: each scientific choice between the family's parts, checked through its
real ``train()`` on tiny runs (digits, a few epochs of a hundred sequences).

Every run is traced: the sequences ``train()`` generates are recorded as it draws them (the real
generator, called through), and the models are rebuilt from the checkpoints it reports, so the
tests can recompute what each reported number should be with code of their own: the N-back
targets, the task-guided attention, the pooled baseline, the early-stopping choice on val, the
analyses of the best-val model's hidden states, and which identities each split may show.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.special import log_softmax
from scipy.stats import binomtest

from one_thread import one_thread  # noqa: F401
from trainables import wm_attention as wm
from trainables.wm_tasks import FEATURES, MATCH, NO_ACTION, NON_MATCH, N_LOCATIONS, N_VIEWS, Task

SPACE = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / "wm_attention.yaml").read_text())
# distinct sizes tell the generated sets apart: train (each epoch), val, test and generalisation
TINY = dict(train_sequences=128, val_sequences=96, test_sequences=112, decode_max_samples=20, hidden_size=32,
            cnn_channels=8, attention_hidden=16, device="cpu")


def config(**overrides) -> dict:
    smoke = SPACE["studies"]["smoke"]
    return {**SPACE["defaults"], **smoke["set"], **TINY, "seed": 0, "eval": {}, **overrides}


@dataclass
class Trace:
    """One ``train()`` run: its config, reports, checkpoints and the sequences it generated."""

    config: dict
    reports: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    generated: list = field(default_factory=list)  # (n_sequences, tasks, pool, match_prob, Sequences)
    wall_ms: float = 0.0  # of the whole train() call
    timed: list = field(default_factory=list)  # (function name, n_sequences, ms) of each run_model / analyse call

    def sets(self, n: int) -> list:
        return [seqs for size, *_, seqs in self.generated if size == n]

    @property
    def train(self) -> list:
        return self.sets(self.config["train_sequences"])

    @property
    def val(self):
        (seqs,) = self.sets(self.config["val_sequences"])
        return seqs

    @property
    def test(self):
        return self.sets(self.config["test_sequences"])[0]

    @property
    def gen(self):
        later = self.sets(self.config["test_sequences"])[1:]
        return later[0] if later else None

    @property
    def final(self) -> dict:
        return self.reports[-1]

    @property
    def method(self) -> str:
        return "attention" if self.config["attention"] else "baseline"

    @property
    def tasks(self) -> list[Task]:
        return self.generated[0][1]


def trace(**overrides) -> Trace:
    return record(Trace(config(**overrides)))


def record(run: Trace) -> Trace:
    """``run`` after ``train()`` on its config, with what it generated, reported and took."""
    real = wm.generate

    def recording(rng, n_sequences, tasks, pool, **kwargs):
        seqs = real(rng, n_sequences, tasks, pool, **kwargs)
        run.generated.append((n_sequences, list(tasks), pool, kwargs["match_prob"], seqs))
        return seqs

    def report(metrics, checkpoint=None):
        run.reports.append(dict(metrics))
        run.checkpoints.append(checkpoint)

    def timing(name: str):
        real_fn = getattr(wm, name)

        def timed(model, stim, seqs, *args, **kwargs):
            began = time.perf_counter()
            result = real_fn(model, stim, seqs, *args, **kwargs)
            run.timed.append((name, len(seqs), 1000 * (time.perf_counter() - began)))
            return result

        return timed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wm, "generate", recording)  # records and calls through: the real generator runs
        for name in ("run_model", "analyse"):  # timed from outside, called through
            mp.setattr(wm, name, timing(name))
        began = time.perf_counter()
        wm.train(run.config, report)
        run.wall_ms = 1000 * (time.perf_counter() - began)
    return run


def weights(checkpoint: dict, which: str) -> dict:
    """``which``: "model" (the weights at that epoch) or "best" (the best-val weights so far)."""
    return checkpoint["tracked"]["model"] if which == "model" else checkpoint["values"]["best_model"]


def rebuild(run: Trace, state: dict) -> tuple[wm.WorkingMemoryNet, wm.Stimuli]:
    """The trial's network with ``state`` loaded (strictly: no missing or unexpected weights)."""
    cfg = run.config
    stim = wm.Stimuli(cfg, torch.device("cpu"))
    frontend = wm.build_frontend(cfg["frontend"], stim.tensor.shape[1], cfg["pretrained"], cfg["cnn_channels"])
    model = wm.WorkingMemoryNet(frontend, len(run.tasks), attention=bool(cfg["attention"]),
                                attention_hidden=cfg["attention_hidden"], attention_dropout=cfg["attention_dropout"],
                                rnn=cfg["rnn"], hidden_size=cfg["hidden_size"], freeze_frontend=bool(cfg["freeze_frontend"]),
                                input_size=cfg["input_size"])
    model.load_state_dict(state)
    return model.eval(), stim


def outputs(run: Trace, model, stim, seqs) -> dict:
    return wm.run_model(model, stim, seqs, len(run.tasks), run.config["batch_size"])


def decision_accuracy(out: dict, seqs) -> float:
    decision = seqs.target != NO_ACTION
    return float(np.mean(out["probs"].argmax(-1)[decision] == seqs.target[decision]))


# ---------------------------------------------------------------- independent reimplementations


def expected_targets(seqs, tasks: list[Task], n_identities: int) -> np.ndarray:
    """N-back by the definition, one step at a time: no_action before step N, then match when
    the task feature equals the one N steps back (identity: same class and same image)."""
    out = np.empty(seqs.target.shape, dtype=np.int64)
    for b in range(len(seqs.task)):
        task = tasks[seqs.task[b]]
        for t in range(seqs.target.shape[1]):
            if t < task.n:
                out[b, t] = NO_ACTION
                continue
            then, now = t - task.n, t
            if task.feature == "location":
                same = seqs.location[b, now] == seqs.location[b, then]
            elif task.feature == "category":
                same = seqs.category[b, now] == seqs.category[b, then]
            else:
                same = (seqs.category[b, now], seqs.identity[b, now]) == (seqs.category[b, then], seqs.identity[b, then])
            out[b, t] = MATCH if same else NON_MATCH
    return out


def one_hot_tasks(seqs, n_tasks: int) -> torch.Tensor:
    return torch.eye(n_tasks)[torch.as_tensor(seqs.task)]


def front_end_maps(model, stim, seqs) -> torch.Tensor:
    """(B, T, C, h, w) front-end maps of the stimulus shown at each step."""
    index = torch.as_tensor(seqs.stimulus_index(stim.n_identities))
    with torch.no_grad():
        maps = model.encode(stim.tensor[index.flatten()])
    return maps.view(*index.shape, *maps.shape[1:])


@torch.no_grad()
def task_guided_attention(model, maps: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_p(key(f_p) . query(task) / sqrt(hidden)) and the weighted sum of the features,
    with the keys materialised (the family never builds them)."""
    att = model.attention
    b, t = maps.shape[:2]
    feats = maps.flatten(3).transpose(2, 3)  # (B, T, P, C)
    query = att.query(task)[:, None, None, :]  # (B, 1, 1, hidden): one query per sequence
    scores = (att.key(feats) * query).sum(-1) / math.sqrt(att.query.out_features)
    w = scores.softmax(-1)
    return w, (w[..., None] * feats).sum(2)


@torch.no_grad()
def recurrent_logits(model, context: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """RNN over [context, task one-hot] at every step, then the response head."""
    steps = context.shape[1]
    hidden, _ = model.rnn(torch.cat([context, task[:, None, :].expand(-1, steps, -1)], -1))
    return model.head(hidden)


def entropy(weights: np.ndarray) -> float:
    flat = weights.reshape(-1, weights.shape[-1])
    return float(np.mean(-(flat * np.log(np.clip(flat, 1e-12, None))).sum(1)))


# ---------------------------------------------------------------- runs shared by several tests


@pytest.fixture(scope="module")
def stmf(tmp_path_factory):
    """Attention model, three tasks, one epoch, with its artifacts."""
    return trace(scenario="stmf", epochs=1, artifact_dir=str(tmp_path_factory.mktemp("stmf")))


@pytest.fixture(scope="module")
def stopped():
    """A run whose best val epoch (3) is neither the first nor the last (stopped at 5 of 6), and
    whose best test epoch (2) is another."""
    return trace(n_back=1, lr=1e-2, seed=3, epochs=6, min_epochs=1, patience=2)


# ---------------------------------------------------------------- the task vector and the attention


def test_the_task_vector_reaches_the_attention_and_the_rnn(stmf):
    model, stim = rebuild(stmf, weights(stmf.checkpoints[-1], "best"))
    seqs = stmf.test
    out = outputs(stmf, model, stim, seqs)
    task = one_hot_tasks(seqs, len(stmf.tasks))
    expected_w, context = task_guided_attention(model, front_end_maps(model, stim, seqs), task)
    np.testing.assert_allclose(out["attention"].reshape(expected_w.shape), expected_w.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["logits"], recurrent_logits(model, context, task).numpy(), atol=1e-4)
    # the reported statistic is the one of the task-guided weights on the test sequences
    assert stmf.final["test/attention/attn_entropy"] == pytest.approx(entropy(expected_w.numpy()), abs=1e-5)


def test_the_task_changes_the_attention_on_the_same_stimuli(stmf):
    model, stim = rebuild(stmf, weights(stmf.checkpoints[-1], "best"))
    seqs = stmf.test
    per_task = []
    for k in range(len(stmf.tasks)):
        seqs_k = seqs.subset(np.arange(len(seqs)))
        seqs_k.task = np.full_like(seqs.task, k)
        per_task.append(outputs(stmf, model, stim, seqs_k))
    for a, b in [(0, 1), (1, 2), (0, 2)]:
        assert np.abs(per_task[a]["attention"] - per_task[b]["attention"]).max() > 1e-3, (a, b)
        assert np.abs(per_task[a]["logits"] - per_task[b]["logits"]).max() > 1e-3, (a, b)


def test_attention_false_has_no_attention_and_feeds_the_pooled_map_with_the_task():
    run = trace(attention=False, epochs=1)
    best = weights(run.checkpoints[-1], "best")
    assert not any(key.startswith("attention.") for key in best), "the baseline carries attention weights"
    assert not any("attn_" in key or "/attention/" in key for key in run.final)
    model, stim = rebuild(run, best)
    assert model.attention is None
    seqs = run.test
    out = outputs(run, model, stim, seqs)
    assert "attention" not in out
    pooled = front_end_maps(model, stim, seqs).mean((-2, -1))
    expected = recurrent_logits(model, pooled, one_hot_tasks(seqs, len(run.tasks)))
    np.testing.assert_allclose(out["logits"], expected.numpy(), atol=1e-4)
    assert run.final["test/baseline/acc"] == pytest.approx(decision_accuracy(out, seqs))


# ---------------------------------------------------------------- tasks and targets


SCENARIO_TASKS = {
    "stsf": lambda n, f: [(n, f)],
    "stmf": lambda n, f: [(n, g) for g in FEATURES],
    "mtmf": lambda n, f: [(m, g) for m in (1, 2, 3) for g in FEATURES],
}


@pytest.mark.parametrize("scenario", ["stsf", "stmf", "mtmf"])
def test_scenario_tasks_and_nback_targets_of_every_generated_set(scenario):
    run = trace(scenario=scenario, n_back=1, feature="identity", epochs=1)  # n_back and feature: not the defaults
    tasks = run.tasks
    assert [(t.n, t.feature) for t in tasks] == SCENARIO_TASKS[scenario](1, "identity")
    assert {tuple(tk) for _, tk, *_ in run.generated} == {tuple(tasks)}  # every set: the same task list
    sets = [*run.train, run.val, run.test]
    for seqs in sets:
        np.testing.assert_array_equal(seqs.target, expected_targets(seqs, tasks, run.config["n_identities"]))
        index, task, target = wm._batch_tensors(seqs, len(tasks), run.config["n_identities"], "cpu")
        np.testing.assert_array_equal(target.numpy(), seqs.target)  # what the loss and metrics see
        np.testing.assert_array_equal(task.numpy(), np.eye(len(tasks))[seqs.task])
    assert set(np.concatenate([s.task for s in sets])) == set(range(len(tasks)))
    # the one-hot task vector is as wide as the task list, in the attention and at the RNN's input
    best = weights(run.checkpoints[-1], "best")
    assert best["attention.query.weight"].shape[1] == len(tasks)
    assert best["rnn.weight_ih_l0"].shape[1] == run.config["cnn_channels"] + len(tasks)
    for t in tasks:
        assert f"test/attention/acc_{t.name}" in run.final


@pytest.mark.parametrize("match_prob", [0.5, 0.25])
def test_matches_are_drawn_with_match_prob(match_prob):
    run = trace(match_prob=match_prob, epochs=2, n_back=1)
    assert {p for *_, p, _ in run.generated} == {match_prob}
    decisions = np.concatenate([s.target[s.target != NO_ACTION] for s in [*run.train, run.val, run.test]])
    assert binomtest(int((decisions == MATCH).sum()), len(decisions), match_prob).pvalue > 1e-3
    assert binomtest(int((decisions == MATCH).sum()), len(decisions), 0.5 if match_prob != 0.5 else 0.25).pvalue < 1e-6


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("split", ["novel_identity", "novel_view", "random"])
def test_held_out_identities_and_views_appear_only_in_the_generalisation_test(split):
    run = trace(split=split, heldout_identities=3, epochs=1, attention=False)  # not the default 2
    n_id, held = run.config["n_identities"], run.config["heldout_identities"]
    seen = [*run.train, run.val, run.test]
    ids = lambda sets: set(np.concatenate([s.identity.ravel() for s in sets]).tolist())  # noqa: E731
    views = lambda sets: set(np.concatenate([s.view.ravel() for s in sets]).tolist())  # noqa: E731
    if split == "random":
        assert run.gen is None and not any("gen_acc" in key for key in run.final)
        assert ids(seen) == set(range(n_id)) and views(seen) == set(range(N_VIEWS))
        return
    if split == "novel_identity":
        assert ids(seen) == set(range(n_id - held)) and ids([run.gen]) == set(range(n_id - held, n_id))
    else:
        assert views(seen) == set(range(N_VIEWS - 1)) and views([run.gen]) == {N_VIEWS - 1}
    model, stim = rebuild(run, weights(run.checkpoints[-1], "best"))
    assert run.final["test/baseline/gen_acc"] == pytest.approx(decision_accuracy(outputs(run, model, stim, run.gen), run.gen))
    assert run.final["test/baseline/acc"] == pytest.approx(decision_accuracy(outputs(run, model, stim, run.test), run.test))


# ---------------------------------------------------------------- early stopping and the analysed model


def val_rule(val_acc: list[float], patience: int, min_epochs: int, epochs: int) -> tuple[int, int]:
    """(best epoch, last epoch) of early stopping on val accuracy, by its definition: a strict
    improvement resets the count of bad epochs; stop after ``patience`` bad ones, not before
    ``min_epochs``, or at ``epochs``."""
    best, best_epoch, bad = -1.0, 0, 0
    for epoch, acc in enumerate(val_acc, start=1):
        best, best_epoch, bad = (acc, epoch, 0) if acc > best else (best, best_epoch, bad + 1)
        if (bad >= patience and epoch >= min_epochs) or epoch == epochs:
            return best_epoch, epoch
    raise AssertionError("the run ended before its rule says it may")


def per_epoch(run: Trace, which: str, seqs) -> list[float]:
    accs = []
    for ckpt in run.checkpoints:
        model, stim = rebuild(run, weights(ckpt, which))
        accs.append(decision_accuracy(outputs(run, model, stim, seqs), seqs))
    return accs


def best_index(run: Trace) -> int:
    """The position of the epoch whose weights the final checkpoint keeps as the best."""
    best = weights(run.checkpoints[-1], "best")
    same = [i for i, c in enumerate(run.checkpoints) if all(torch.equal(v, weights(c, "model")[k]) for k, v in best.items())]
    assert same, "the best weights are no epoch's weights"
    return same[0]


def test_early_stopping_selects_on_val_and_the_report_describes_that_model(stopped):
    cfg = stopped.config
    val_acc = per_epoch(stopped, "model", stopped.val)
    for report, acc in zip(stopped.reports[:-1], val_acc):
        assert report["val/attention/acc"] == pytest.approx(acc)  # val metrics are computed on val
    best_epoch, last_epoch = val_rule(val_acc, cfg["patience"], cfg["min_epochs"], cfg["epochs"])
    assert [r["epoch"] for r in stopped.reports] == list(range(1, last_epoch + 1))
    assert 1 < best_epoch < last_epoch < cfg["epochs"]  # stopped early; best neither first nor last
    assert best_index(stopped) == best_epoch - 1
    test_acc = per_epoch(stopped, "model", stopped.test)
    assert int(np.argmax(test_acc)) != best_epoch - 1  # selecting on test would pick another epoch
    assert stopped.final["test/attention/acc"] == pytest.approx(test_acc[best_epoch - 1])
    assert stopped.final["val/attention/acc"] == pytest.approx(val_acc[best_epoch - 1])


def test_analyses_read_the_hidden_states_of_the_best_val_model(stopped):
    def analysis(state: dict) -> dict:
        model, stim = rebuild(stopped, state)
        out = outputs(stopped, model, stim, stopped.test)
        return wm.analyse(model, stim, stopped.test, out, stopped.tasks, stopped.config)[0]

    best_at = best_index(stopped)
    assert best_at < len(stopped.checkpoints) - 2
    best = analysis(weights(stopped.checkpoints[best_at], "model"))
    later = analysis(weights(stopped.checkpoints[-2], "model"))  # a later epoch (the final checkpoint holds the best)
    assert {"decode_relevant", "swap_disparity", "procrustes_disparity", "attn_entropy", "orthogonality_rnn"} <= set(best)
    for key, value in best.items():
        assert stopped.final[f"test/attention/{key}"] == pytest.approx(value, abs=1e-9), key
    for key in ("swap_disparity", "procrustes_disparity", "attn_entropy"):
        assert best[key] != pytest.approx(later[key], abs=1e-6), key  # another model would read otherwise


def test_the_stimuli_are_the_same_objects_whatever_the_trial_seed():
    a, b = wm.Stimuli(config(seed=0), torch.device("cpu")), wm.Stimuli(config(seed=5), torch.device("cpu"))
    np.testing.assert_array_equal(a.canvas, b.canvas)
    assert len(a.canvas) == a.n_categories * a.n_identities * N_VIEWS * N_LOCATIONS


# ---------------------------------------------------------------- mutation-testing additions (bench/mutation.py)


def weighted_cross_entropy(logits: np.ndarray, target: np.ndarray, no_action_weight: float) -> float:
    """The training loss by its definition: cross-entropy per step (scipy), no_action steps
    weighted ``no_action_weight``, the others 1, normalised by the total weight."""
    nll = -np.take_along_axis(log_softmax(np.asarray(logits, np.float64), -1), target[..., None], -1)[..., 0]
    w = np.where(target == NO_ACTION, no_action_weight, 1.0)
    return float((nll * w).sum() / w.sum())


def expected_response_metrics(out: dict, seqs, tasks: list[Task], no_action_weight: float) -> dict:
    """Accuracy, NLL and Brier on the decision steps (t >= N), the weighted loss over every step,
    the all-step accuracy and the decision accuracy of each task, recomputed from the outputs."""
    probs, target = out["probs"].astype(np.float64), seqs.target
    decision = target != NO_ACTION
    p, y = probs[decision], target[decision]
    pred = probs.argmax(-1)
    m = {"acc": float(np.mean(p.argmax(1) == y)), "nll": float(-np.mean(np.log(p[np.arange(len(y)), y]))),
         "brier": float(np.mean(((p - np.eye(3)[y]) ** 2).sum(1))),
         "loss": weighted_cross_entropy(out["logits"], target, no_action_weight),
         "acc_all_steps": float(np.mean(pred == target))}
    for k, task in enumerate(tasks):
        steps = decision & (seqs.task == k)[:, None]
        m[f"acc_{task.name}"] = float(np.mean(pred[steps] == target[steps]))
    return m


@pytest.fixture(scope="module")
def still():
    """lr 0 with a frozen front end and no attention dropout: the model never changes, so val
    accuracy is constant after epoch 1 (patience 2: stopped at min_epochs 4, not at 3) and every
    epoch's train figures are those of the one model on that epoch's sequences (steps of 48:
    not the default batch size)."""
    return trace(scenario="stmf", lr=0.0, weight_decay=0.05, freeze_frontend=True, attention_dropout=0.0,
                 epochs=6, patience=2, min_epochs=4, no_action_weight=0.3, seed=1, batch_size=48)


def test_train_val_and_test_figures_are_those_of_the_model_on_each_split(still):
    cfg, tasks = still.config, still.tasks
    assert [r["epoch"] for r in still.reports] == [1, 2, 3, 4]  # stopped at min_epochs, patience long run out
    model, stim = rebuild(still, weights(still.checkpoints[0], "model"))
    for report, seqs in zip(still.reports, still.train):
        out = outputs(still, model, stim, seqs)
        rows = np.arange(len(seqs))
        batches = [rows[i : i + cfg["batch_size"]] for i in range(0, len(seqs), cfg["batch_size"])]
        step_losses = [weighted_cross_entropy(out["logits"][b], seqs.target[b], cfg["no_action_weight"]) for b in batches]
        assert report["train/attention/loss"] == pytest.approx(np.mean(step_losses), abs=1e-5)  # mean over steps
        assert report["train/attention/acc"] == pytest.approx(decision_accuracy(out, seqs))
    for split, seqs in (("val", still.val), ("test", still.test)):
        expected = expected_response_metrics(outputs(still, model, stim, seqs), seqs, tasks, cfg["no_action_weight"])
        for reported in (still.reports if split == "val" else still.reports[-1:]):
            for name, value in expected.items():
                assert reported[f"{split}/attention/{name}"] == pytest.approx(value, abs=1e-5), (split, name)


def test_the_optimiser_gets_the_config_and_a_frozen_front_end_never_changes(still):
    first, last = still.checkpoints[0], still.checkpoints[-1]
    group = last["tracked"]["optimizer"]["param_groups"][0]
    assert (group["lr"], group["weight_decay"]) == (still.config["lr"], still.config["weight_decay"])
    model, _ = rebuild(still, weights(last, "model"))
    trainable = [name for name, _ in model.named_parameters() if not name.startswith("frontend.")]
    assert len(group["params"]) == len(trainable)  # the frozen front end is not handed to the optimiser
    for name, value in weights(last, "model").items():
        if name.startswith("frontend.") and "running_mean" in name:
            assert not value.any(), name  # BatchNorm kept its initial statistics: the front end stayed in eval mode
        if name.startswith("frontend.") and "running_var" in name:
            assert torch.equal(value, torch.ones_like(value)), name
        assert torch.equal(value, weights(first, "model")[name]), name


def test_every_part_of_an_unfrozen_model_trains(stopped):
    before, after = weights(stopped.checkpoints[0], "model"), weights(stopped.checkpoints[1], "model")
    for name, value in after.items():
        if value.is_floating_point():
            assert not torch.equal(value, before[name]), f"{name} did not change in an epoch of training"


def test_train_sets_are_fresh_each_epoch_and_apart_from_val_and_test(stopped):
    def rows(seqs) -> set:
        index = seqs.stimulus_index(stopped.config["n_identities"])
        return {(int(k), *r.tolist()) for k, r in zip(seqs.task, index)}

    sets = [rows(s) for s in [*stopped.train, stopped.val, stopped.test]]
    for i, a in enumerate(sets):
        for b in sets[i + 1 :]:
            assert len(a & b) <= 2, "two sets share their sequences"  # chance repeats only


def test_perf_figures_add_up_and_fit_in_the_wall_time_of_the_call(still):
    final, epochs = still.final, [r["perf/epoch_ms"] for r in still.reports]
    assert all(0 < ms for ms in epochs) and final["perf/train_ms"] == pytest.approx(sum(epochs))
    infer_ms = final["perf/infer_per_sequence_ms"] * still.config["test_sequences"]
    assert 0 < infer_ms and 0 < final["perf/analysis_ms"]
    assert final["perf/train_ms"] + infer_ms + final["perf/analysis_ms"] < still.wall_ms  # disjoint phases of the call
    # and each at least its own call's duration (in milliseconds) timed from outside
    (test_ms,) = [ms for name, n, ms in still.timed if name == "run_model" and n == still.config["test_sequences"]]
    (analyse_ms,) = [ms for name, _, ms in still.timed if name == "analyse"]
    assert infer_ms >= test_ms and final["perf/analysis_ms"] >= analyse_ms


@pytest.fixture(scope="module")
def clipped():
    """Gradients clipped to a norm of 1e-13, no weight decay, attention dropout 0.8, three epochs
    (epoch 2's checkpoint holds its own weights; the last one holds the best): an Adam step then
    moves a weight by lr * |m| / (sqrt(v) + eps) <= 3e-3 * 1e-13 / 1e-8 = 3e-8 at most (unclipped:
    ~lr), so the model stays put while each training step still draws its dropout masks. Every
    set has 96 sequences, so two sets drawn from one seeded stream would be the same sequences."""
    return trace(grad_clip=1e-13, weight_decay=0.0, attention_dropout=0.8, n_back=1, epochs=3, min_epochs=3, patience=5,
                 train_sequences=96, val_sequences=96, test_sequences=96)


def test_grad_clip_and_attention_dropout_reach_the_training_steps(clipped):
    cfg, first, second = clipped.config, clipped.checkpoints[0], clipped.checkpoints[1]
    model, stim = rebuild(clipped, weights(first, "model"))
    for name, _ in model.named_parameters():  # clipped: epoch 2 barely moves any weight
        assert (weights(second, "model")[name] - weights(first, "model")[name]).abs().max() < 1e-6, name
    # epoch 2's loss, step by step: the epoch-1 model in training mode, its dropout masks drawn
    # from the torch RNG as the epoch-1 checkpoint left it
    seqs = clipped.generated[2][-1]  # val, then epoch 1's and epoch 2's training sets
    index, task, _ = wm._batch_tensors(seqs, len(clipped.tasks), stim.n_identities, "cpu")
    steps = [slice(i, i + cfg["batch_size"]) for i in range(0, len(seqs), cfg["batch_size"])]
    loss = {}
    for dropout in (True, False):
        model.train()
        model.attention.dropout.train(dropout)
        with torch.random.fork_rng(), torch.no_grad():
            torch.set_rng_state(first["rng"]["torch"])
            logits = [model(stim.tensor, index[rows], task[rows])["logits"].numpy() for rows in steps]
        loss[dropout] = np.mean([weighted_cross_entropy(lg, seqs.target[rows], cfg["no_action_weight"])
                                 for lg, rows in zip(logits, steps)])
    assert clipped.reports[1]["train/attention/loss"] == pytest.approx(loss[True], abs=1e-5)
    assert abs(loss[True] - loss[False]) > 1e-4  # the dropout shows in the loss


def test_sets_of_one_size_are_separate_draws(clipped):
    sets = [seqs for *_, seqs in clipped.generated]
    assert len(sets) == 5  # val, three epochs' training sets, test
    for i, a in enumerate(sets):
        for b in sets[i + 1 :]:
            assert not np.array_equal(a.category, b.category)  # hundreds of draws alike by chance: never


def expected_analysis(cfg: dict, tasks: list[Task], model, stim, seqs, out) -> dict:
    """Every analysis metric by the module doc's definitions, from the test hidden states, with
    labels taken from the sequences themselves (identity = the (class, image) pair) and the
    pure components (``decode``, ``orthogonality``, ``procrustes_analysis``, ``attention_stats``)
    that tests/test_wm_attention.py checks on known data. Orthogonality needs decoders of two
    features or more (of one step, or of the front end's features)."""
    folds, seed = cfg["decode_folds"], cfg["seed"]
    pair = np.stack([seqs.category, seqs.identity], -1)
    labels = {"location": seqs.location, "category": seqs.category,
              "identity": np.unique(pair.reshape(-1, 2), axis=0, return_inverse=True)[1].reshape(seqs.task.shape[0], -1)}
    hidden = out["hidden"]
    draw = np.random.default_rng([seed, 7])  # the decoders' rows: a fixed stream of the trial seed
    got = defaultdict(list)
    for k, task in enumerate(tasks):
        mine = seqs.task == k
        rows = draw.permutation(np.flatnonzero(mine))[: cfg["decode_max_samples"]]
        for t in range(hidden.shape[1]):
            normals = []
            for f in FEATURES:
                result = wm.decode(hidden[rows, t], labels[f][rows, t], folds, seed)
                if result is None:
                    continue
                kind = "relevant" if f == task.feature else "irrelevant"
                got[f"decode_{kind}"].append(result[0])
                got[f"decode_{f}_{kind}"].append(result[0])
                normals.append(result[1])
            if len(normals) >= 2:
                got["orthogonality_rnn"].append(wm.orthogonality(normals))
        own_swap = wm.procrustes_analysis(hidden[mine], labels[task.feature][mine])
        if own_swap is not None:
            got["procrustes_disparity"].append(own_swap[0])
            got["swap_disparity"].append(own_swap[1])
    metrics = {name: float(np.mean(v)) for name, v in got.items()}
    # the front end's pooled features of each distinct stimulus the test shows, labelled by what it shows
    index = seqs.stimulus_index(stim.n_identities).ravel()
    shown, first = np.unique(index, return_index=True)
    with torch.no_grad():
        pooled = model.encode(stim.tensor[torch.as_tensor(shown)]).mean((-2, -1)).numpy()
    cnn = [wm.decode(pooled, labels[f].ravel()[first], folds, seed) for f in FEATURES]
    cnn_normals = [r[1] for r in cnn if r is not None]
    if len(cnn_normals) >= 2:
        metrics["orthogonality_cnn"] = wm.orthogonality(cnn_normals)
    att = out["attention"]
    metrics.update(wm.attention_stats(att.reshape(-1, *att.shape[2:]), seqs.location.ravel()))
    for k, task in enumerate(tasks):
        mine = seqs.task == k
        stats = wm.attention_stats(att[mine].reshape(-1, *att.shape[2:]), seqs.location[mine].ravel())
        metrics.update({f"{name}_{task.name}": value for name, value in stats.items()})
    return metrics


def test_reported_analyses_are_the_documented_ones_of_the_best_model(stmf):
    model, stim = rebuild(stmf, weights(stmf.checkpoints[-1], "best"))
    out = outputs(stmf, model, stim, stmf.test)
    expected = expected_analysis(stmf.config, stmf.tasks, model, stim, stmf.test, out)
    assert {"decode_identity_relevant", "decode_location_irrelevant", "attn_on_stimulus_2back_category"} <= set(expected)
    reported = {k.removeprefix("test/attention/"): v for k, v in stmf.final.items() if k.startswith("test/attention/")}
    analysis = {k: v for k, v in reported.items() if not k.startswith(("acc", "ece", "nll", "brier", "balanced_acc",
                                                                        "macro_f1", "loss"))}
    assert set(analysis) == set(expected)
    for name, value in expected.items():
        assert analysis[name] == pytest.approx(value, abs=1e-9), name


def test_analysis_json_holds_every_reported_test_number_and_the_decoding_curves(stmf):
    saved = json.loads((Path(stmf.config["artifact_dir"]) / "analysis.json").read_text())
    reported = {k.removeprefix("test/attention/"): v for k, v in stmf.final.items() if k.startswith("test/attention/")}
    assert saved["method"] == "attention" and saved["metrics"] == pytest.approx(reported, abs=0)
    curves = saved["decoding_by_step"]
    assert list(curves) == [t.name for t in stmf.tasks]
    relevant = []
    for task in stmf.tasks:
        assert list(curves[task.name]) == list(FEATURES)
        for f, accs in curves[task.name].items():
            assert len(accs) == stmf.config["seq_len"]
            if f == task.feature:
                relevant += [a for a in accs if a is not None]
    assert np.mean(relevant) == pytest.approx(reported["decode_relevant"], abs=1e-12)
    assert {p.name for p in Path(stmf.config["artifact_dir"]).iterdir()} >= {"decoding.png", "attention_heatmaps.png"}


def test_orthogonality_is_reported_from_two_decoders_or_more_never_from_one(stmf):
    """Sequences of one class only (the category decoders have one class: none), analysed with
    the stmf model: with 3 folds over 12 rows some steps decode the location alone (no
    orthogonality there) and others the location and the identity; the front end's location and
    identity decoders make two (orthogonality_cnn), and with 17 folds its identities (16 stimuli
    each) drop out, leaving one decoder and no orthogonality_cnn."""
    model, stim = rebuild(stmf, weights(stmf.checkpoints[-1], "best"))
    task = stmf.tasks[0]  # 2back_location
    pool = wm.split_pools("random", stmf.config["n_identities"], 1)[0]
    seqs = wm.generate(np.random.default_rng(2), 60, [task], pool, n_categories=1, seq_len=stmf.config["seq_len"])
    out = outputs(stmf, model, stim, seqs)
    decoders = {}
    for folds, cnn_decoders in ((3, 2), (17, 1)):
        cfg = {**stmf.config, "decode_folds": folds, "decode_max_samples": 12}
        got, details = wm.analyse(model, stim, seqs, out, [task], cfg)
        expected = expected_analysis(cfg, [task], model, stim, seqs, out)
        assert set(got) == set(expected) and ("orthogonality_cnn" in got) == (cnn_decoders == 2)
        for name, value in expected.items():
            assert np.isfinite(got[name]) and got[name] == pytest.approx(value, abs=1e-9), (folds, name)
        curves = details["decoding_by_step"][task.name]
        decoders[folds] = [sum(acc is not None for acc in accs) for accs in zip(*curves.values())]
    assert decoders[17] == [0] * stmf.config["seq_len"]  # 17 folds: nothing decodes from 12 rows
    per_step = decoders[3]
    assert 1 in per_step and 2 in per_step  # steps with one decoder and steps with two


def test_an_imagenet_front_end_starts_from_the_resolved_weights(tmp_path, monkeypatch):
    """``pretrained: imagenet`` on a ResNet front end: check accepts the checkpoint the one
    resolver finds (here a stand-in file at its path, offline), and the trained model's front end
    holds exactly its weights (frozen: it never changes), not a random init."""
    from torchvision import models

    from trainables.common.encoders import imagenet_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORCHESTRATE_OFFLINE", "1")
    path = imagenet_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # not the trial's seed: a random init in train() is another one
        state = models.resnet18(weights=None).state_dict()
    torch.save(state, path)
    run = trace(frontend="resnet18", pretrained="imagenet", freeze_frontend=True, attention=False, epochs=1)
    best = weights(run.checkpoints[-1], "best")
    trunk = [name for name, _ in models.resnet18(weights=None).named_children()][:-2]  # cut before the pool
    loaded = {f"frontend.trunk.{trunk.index(k.split('.')[0])}.{k.split('.', 1)[1]}": v for k, v in state.items()
              if k.split(".")[0] in trunk}
    assert loaded and {k for k in best if k.startswith("frontend.")} == set(loaded)
    for name, value in loaded.items():
        assert torch.equal(best[name], value), name


# ---------------------------------------------------------------- seeds, seq_len, input_size, n_categories and rnn reach every set


@pytest.fixture(scope="module")
def seeded_pair():
    """Two runs differing only in their seed, with a non-default seq_len, input_size, n_categories
    and rnn and a generalisation set; the first called without a device (train() resolves "auto")."""
    first = Trace(config(split="novel_view", seq_len=7, input_size=24, n_categories=3, rnn="lstm", epochs=1))
    first.config.pop("device")
    second = Trace({**first.config, "seed": 1, "device": "cpu"})
    return record(first), record(second)


def test_the_seed_draws_every_set_and_test_and_generalisation_sets_are_separate_draws(seeded_pair):
    first, second = seeded_pair
    assert first.gen is not None and len(first.generated) == len(second.generated) == 4  # train, val, test, gen
    for a, b in zip(first.generated, second.generated):
        assert not np.array_equal(a[-1].category, b[-1].category)  # hundreds of draws alike by chance: never
    assert not np.array_equal(first.test.category, first.gen.category)


def test_seq_len_input_size_n_categories_and_rnn_reach_the_sets_and_the_model(seeded_pair):
    first, _ = seeded_pair
    assert all(seqs.task.shape == seqs.target.shape[:1] and seqs.target.shape[1] == 7 for *_, seqs in first.generated)
    assert all(set(np.unique(seqs.category)) == {0, 1, 2} for *_, seqs in first.generated)  # every class, no other
    model, stim = rebuild(first, weights(first.checkpoints[-1], "best"))  # strictly: an LSTM's weights
    assert isinstance(model.rnn, torch.nn.LSTM) and len(stim.canvas) == 3 * 5 * N_VIEWS * N_LOCATIONS
    out = outputs(first, model, stim, first.test)
    expected = expected_response_metrics(out, first.test, first.tasks, first.config["no_action_weight"])
    for name, value in expected.items():
        assert first.final[f"test/attention/{name}"] == pytest.approx(value, abs=1e-5), name
