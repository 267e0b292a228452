"""trainables.common.lifecycle: a resumed trial reports exactly what an uninterrupted one does,
whatever RNG stream the family draws from; finished trials do not rerun; RNG state does not leak
from one trial into the next in one process."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from trainables.common.lifecycle import Trial, capture_rng, cpu_copy, restore_rng
from trainables.common.metrics import ECE_BINS, ece_from_bins, expected_calibration_error, reliability_bins
from trainables.common.training import EarlyStopping


def tiny_family(config, report, restore=None):
    """Draws from every stream a family may use: python, numpy global and own, torch global
    (dropout), the trial's torch generator (data order)."""
    trial = Trial(config, report, restore)
    torch.manual_seed(1234 + trial.seed)  # the family's own extra seeding must not break resume
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    stopper = EarlyStopping(patience=100)
    rng = trial.numpy_rng(7)
    trial.track(model=model, optimizer=optimizer, stopper=stopper)
    history = trial.value("history", [])
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    for epoch in trial.epochs(config["epochs"]):
        with trial.timed("epoch"):
            order = torch.randperm(32, generator=trial.generator)
            noise = torch.from_numpy(rng.standard_normal((32, 4)).astype(np.float32)) * 0.01
            jitter = random.random() + np.random.rand()
            loss = nn.functional.cross_entropy(model(x[order] + noise), y[order]) * (1 + 0 * jitter)
            if config.get("nan_at") == epoch:
                loss = loss * float("nan")
            if not torch.isfinite(loss):
                return trial.diverged(epoch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append(round(float(loss.detach()), 6))
        stopper.step(-float(loss))
        trial.report(epoch, {"train/tiny/loss": float(loss.detach()), "jitter": jitter, "n": len(history)},
                     done=epoch == config["epochs"])


def collect(config, restore=None, stop_after=None):
    reports = []

    def report(metrics, checkpoint=None):
        reports.append((metrics, checkpoint))
        if stop_after is not None and metrics["epoch"] == stop_after:
            raise KeyboardInterrupt  # the worker dies right after this report

    try:
        tiny_family(config, report, restore)
    except KeyboardInterrupt:
        pass
    return reports


def test_resume_from_any_epoch_reports_exactly_what_an_uninterrupted_run_reports():
    config = {"seed": 3, "epochs": 5}
    full = [m for m, _ in collect(config)]
    for cut in (1, 2, 4):
        first = collect(config, stop_after=cut)
        random.seed(99), np.random.seed(99), torch.manual_seed(99)  # another trial ran in between
        rest = [m for m, _ in collect(config, restore=first[-1][1])]
        assert [m for m, _ in first] + rest == full


def test_a_finished_trial_does_not_rerun():
    config = {"seed": 0, "epochs": 2}
    reports = collect(config)
    assert reports[-1][1]["done"] is True
    assert collect(config, restore=reports[-1][1]) == []


def test_divergence_ends_the_trial_with_a_diverged_report():
    reports = collect({"seed": 0, "epochs": 5, "nan_at": 2})
    assert reports[-1][0] == {"epoch": 2, "diverged": 1.0}
    assert len(reports) == 2


def test_trials_in_one_process_start_from_the_same_rng_state_whatever_ran_before():
    config = {"seed": 5, "epochs": 2}
    first = [m for m, _ in collect(config)]
    random.random(), np.random.rand(), torch.rand(3)
    assert [m for m, _ in collect(config)] == first


def test_reported_checkpoint_is_a_snapshot():
    model = nn.Linear(2, 2)
    snap = cpu_copy(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(snap["weight"], model.weight)


def test_rng_capture_round_trip():
    state = capture_rng()
    a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    restore_rng(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == a


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reliability_bins_reproduce_ece(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 10)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 10, 500)
    bins = reliability_bins(probs, labels)
    assert len(bins["count"]) == ECE_BINS and sum(bins["count"]) == 500
    assert bins["ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-12)
    assert ece_from_bins(bins) == pytest.approx(bins["ece"], abs=1e-12)
    conf = probs.max(1)
    in_last = conf > 14 / 15
    if in_last.any():
        assert bins["confidence"][-1] == pytest.approx(conf[in_last].mean())
        assert bins["accuracy"][-1] == pytest.approx((probs.argmax(1) == labels)[in_last].mean())
