"""trainables.common.lifecycle: a resumed trial reports exactly what an uninterrupted one does,
whatever RNG stream the family draws from; finished trials do not rerun; RNG state does not leak
from one trial into the next in one process."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)
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
        stopper.step(-float(loss.detach()))
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


# ---------------------------------------------------------------- every RNG, seeding, checkpoint contents
# (bench/mutation.py: each check below stands for a class of wiring bug in the lifecycle)


def draws():
    """One draw from every process-wide RNG."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


class FakeCuda:
    """torch.cuda as a node with (or without) an initialised GPU: a per-device RNG state list."""

    def __init__(self, monkeypatch, available=True, initialized=True):
        self.state, self.restored = [torch.tensor([1, 2], dtype=torch.uint8)], []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: self.state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.restored.append)


def test_cuda_rng_is_captured_and_restored_only_where_cuda_is_in_use(monkeypatch):
    cuda = FakeCuda(monkeypatch)
    state = capture_rng()
    assert state["cuda"] is cuda.state
    restore_rng(state)
    assert cuda.restored == [cuda.state]
    # a process that never touched CUDA: capturing must not initialise it
    FakeCuda(monkeypatch, initialized=False)
    assert "cuda" not in capture_rng()
    # a GPU checkpoint resumed on a CPU node, and a CPU checkpoint on a GPU node: nothing to set
    cpu_node = FakeCuda(monkeypatch, available=False)
    restore_rng(state)
    restore_rng({key: value for key, value in state.items() if key != "cuda"})
    assert cpu_node.restored == []
    gpu_node = FakeCuda(monkeypatch)
    restore_rng({key: value for key, value in state.items() if key != "cuda"})
    assert gpu_node.restored == []


def test_restore_rng_rewinds_every_rng_after_draws_from_each():
    state = capture_rng()
    before = [draws() for _ in range(3)]
    restore_rng(state)
    assert [draws() for _ in range(3)] == before


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**40 + 3])
def test_seed_all_seeds_each_rng_as_its_own_seeding_does(seed):
    from trainables.common.lifecycle import seed_all

    seed_all(seed)
    got = draws()
    # numpy's legacy seed takes 32 bits: the seed modulo 2**32
    expected = (random.Random(seed).random(), float(np.random.RandomState(seed % 2**32).rand()),
                float(torch.rand(1, generator=torch.Generator().manual_seed(seed))))
    assert got == expected


def test_numpy_streams_are_tracked_apart():
    """Two numpy streams resume each from its own state (one shared checkpoint name would
    restore one stream's state into both)."""
    def family(restore=None, stop_after=None):
        out = []

        def report(metrics, checkpoint=None):
            out.append((metrics, checkpoint))
            if metrics["epoch"] == stop_after:
                raise KeyboardInterrupt

        trial = Trial({"seed": 1}, report, restore)
        a, b = trial.numpy_rng(1), trial.numpy_rng(2)
        try:
            for epoch in trial.epochs(4):
                trial.report(epoch, {"a": float(a.random()), "b": float(b.random())}, done=epoch == 4)
        except KeyboardInterrupt:
            pass
        return out

    full = family()
    assert full[0][0]["a"] == np.random.default_rng([1, 1]).random()  # seeded with [seed, *stream]
    assert full[0][0]["b"] == np.random.default_rng([1, 2]).random()
    cut = family(stop_after=2)
    assert [m for m, _ in cut] + [m for m, _ in family(restore=cut[-1][1])] == [m for m, _ in full]


def reports_of(config, body, restore=None):
    """Run ``body(trial)`` in a Trial and return what it reported."""
    out = []
    trial = Trial(config, lambda metrics, checkpoint=None: out.append((metrics, checkpoint)), restore)
    body(trial)
    return out


def test_a_trial_finished_early_does_not_resume():
    """A trial that stopped early (done before its last epoch) stays finished on resume."""
    def body(trial):
        for epoch in trial.epochs(10):
            trial.report(epoch, {}, done=epoch == 3)
            if epoch == 3:
                return

    final = reports_of({"seed": 0}, body)[-1][1]
    assert final["done"] is True and final["epoch"] == 3
    assert reports_of({"seed": 0}, body, restore=final) == []
    assert Trial({"seed": 0}, print, restore=final).finished is True


def test_reports_are_not_final_unless_done_and_resume_after_their_epoch():
    def body(trial):
        for epoch in trial.epochs(3, first=2):
            trial.report(epoch, {"x": epoch})

    reports = reports_of({"seed": 0}, body)
    assert [m for m, _ in reports] == [{"epoch": 2, "x": 2}, {"epoch": 3, "x": 3}]
    assert [c["done"] for _, c in reports] == [False, False]
    mid = reports[0][1]
    assert Trial({"seed": 0}, print, restore=mid).finished is False
    assert [m for m, _ in reports_of({"seed": 0}, body, restore=mid)] == [{"epoch": 3, "x": 3}]


def test_diverged_reports_no_checkpoint():
    out = reports_of({"seed": 0}, lambda trial: trial.diverged(4))
    assert out == [({"epoch": 4, "diverged": 1.0}, None)]


def test_values_are_restored_on_resume_and_defaults_otherwise():
    def body(trial):
        best = trial.value("best", {"w": torch.zeros(2)})
        count = trial.value("count", 0)
        for epoch in trial.epochs(2):
            best["w"] += 1
            trial.values["count"] = count = count + 1
            trial.report(epoch, {"w": best["w"].tolist(), "count": count})

    first = reports_of({"seed": 0}, body)
    assert [m["w"] for m, _ in first] == [[1.0, 1.0], [2.0, 2.0]]  # each checkpoint a snapshot, not the live tensor
    assert first[0][1]["values"]["best"]["w"].tolist() == [1.0, 1.0]
    restore = {**first[0][1], "values": {"count": 1}}  # a value missing from the checkpoint falls back to its default
    assert [m for m, _ in reports_of({"seed": 0}, body, restore=restore)] == [{"epoch": 2, "w": [1.0, 1.0], "count": 2}]


class DeviceSpy(torch.Tensor):
    """A tensor that records the arguments of every ``.to`` call (no GPU here to move from)."""

    moves: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            cls.moves.append((args[1:], kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_checkpoint_tensors_are_copied_to_the_cpu():
    DeviceSpy.moves.clear()
    cpu_copy({"w": torch.ones(2).as_subclass(DeviceSpy)})
    assert DeviceSpy.moves == [(("cpu",), {"copy": True})]


def test_checkpoint_values_are_deep_copies():
    class Holder:
        def __init__(self):
            self.items = [1]

    holder = Holder()
    snap = cpu_copy({"h": holder, "t": (torch.ones(1, requires_grad=True),)})
    holder.items.append(2)
    assert snap["h"].items == [1] and isinstance(snap["t"], tuple) and not snap["t"][0].requires_grad


# ---------------------------------------------------------------- timing and the reliability artifact


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_timed_adds_each_blocks_wall_time_and_survives_resume(monkeypatch):
    from trainables.common import lifecycle

    clock = Clock()
    monkeypatch.setattr(lifecycle.time, "perf_counter", clock)

    def body(trial):
        for epoch in trial.epochs(2):
            with trial.timed("epoch"):
                clock.now += 0.25
            with pytest.raises(ValueError), trial.timed("eval"):  # a block that raises still counts
                clock.now += 0.5
                raise ValueError
            trial.report(epoch, {"epoch_ms": trial.ms("epoch"), "never_ms": trial.ms("never"), **trial.perf()})

    first = reports_of({"seed": 0}, body)
    assert first[-1][0] == {"epoch": 2, "epoch_ms": 500.0, "never_ms": 0.0, "perf/epoch_ms": 500.0, "perf/eval_ms": 1000.0}
    resumed = reports_of({"seed": 0}, body, restore=first[0][1])
    assert resumed[-1][0] == first[-1][0]


def softmax_rows(seed, n=200, classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, rng.integers(0, classes, n)


def test_reliability_artifact_is_written_with_the_final_report_only(tmp_path):
    import json

    directory = tmp_path / "nested" / "artifacts"
    (val, val_y), (test, test_y) = softmax_rows(0), softmax_rows(1)

    def body(trial):
        for epoch in trial.epochs(2):
            trial.reliability("val", "m:k:5", val, val_y)
            trial.reliability("test", "m:k:5", test, test_y)
            trial.report(epoch, {}, done=epoch == 2)
            assert (directory / "reliability.json").exists() == (epoch == 2)

    reports_of({"seed": 0, "artifact_dir": str(directory)}, body)
    written = json.loads((directory / "reliability.json").read_text())
    (directory / "reliability.json").unlink()
    reports_of({"seed": 0, "artifact_dir": str(directory)}, body)  # into a directory that exists already
    assert json.loads((directory / "reliability.json").read_text()) == written
    assert written == json.loads(json.dumps({"bins": ECE_BINS, "splits": {
        "val": {"m:k:5": reliability_bins(val, val_y)}, "test": {"m:k:5": reliability_bins(test, test_y)}}}))
    assert written["splits"]["test"]["m:k:5"]["ece"] == pytest.approx(expected_calibration_error(test, test_y))
    assert sorted(p.name for p in directory.iterdir()) == ["reliability.json"]  # no temporary file left


def test_no_artifact_without_reliability_or_without_a_directory(tmp_path):
    def final(trial):
        for epoch in trial.epochs(1):
            trial.report(epoch, {}, done=True)

    reports_of({"seed": 0, "artifact_dir": str(tmp_path)}, final)
    assert list(tmp_path.iterdir()) == []  # nothing to write: no reliability was kept

    def with_bins(trial):
        trial.reliability("val", "m", *softmax_rows(2))
        final(trial)

    reports_of({"seed": 0}, with_bins)  # outside the orchestrator: no directory, no file, no error
    reports_of({"seed": 0, "artifact_dir": ""}, with_bins)
    assert list(tmp_path.iterdir()) == []
