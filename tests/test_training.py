"""trainables.common.training: device choice, divergence, early stopping, mini-batches, the
forked RNG, autocast and device transfer. CPU behaviour is checked against torch itself; the
CUDA branches (no GPU here) by recording what they hand torch, with bench/gpu_check.py running
them for real on a GPU machine."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)
from trainables.common.training import EarlyStopping, autocast, forked_rng, is_diverged, minibatches, resolve_device, to_device


# ---------------------------------------------------------------- devices


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("meta") == torch.device("meta")  # any other torch device is passed through
    for name in ("cuda", "cuda:1"):
        with pytest.raises(RuntimeError, match=f"device '{name}' requested but CUDA is not available"):
            resolve_device(name)


def test_resolve_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device() == resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_forked_rng_on_cpu_leaves_the_global_torch_rng_as_it_was():
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    with forked_rng(torch.device("cpu")):
        inside = torch.rand(4)
    assert torch.equal(inside, expected)  # the block draws from the global stream as it was
    assert torch.equal(torch.rand(4), expected)  # and leaves it there


@pytest.mark.parametrize("device,current,forked", [("cpu", None, []), ("cuda:2", None, [2]), ("cuda", 3, [3])])
def test_forked_rng_forks_the_devices_own_generator(monkeypatch, device, current, forked):
    calls = []
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices: calls.append(devices) or "fork")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert forked_rng(torch.device(device)) == "fork"
    assert calls == [forked]


def test_autocast_on_cpu_keeps_exact_float32():
    a, b = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(8, 8)
    with autocast(torch.device("cpu")):
        inside = a @ b
    assert inside.dtype == torch.float32 and torch.equal(inside, a @ b)


def test_autocast_asks_for_bf16_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: calls.append(kwargs) or "ctx")
    assert autocast(torch.device("cuda", 0)) == autocast(torch.device("cpu")) == "ctx"
    assert calls == [{"device_type": "cuda", "dtype": torch.bfloat16, "enabled": True},
                     {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}]


def test_to_device_on_cpu_is_the_same_values():
    x = torch.arange(6.0).view(2, 3)
    moved = to_device(x, torch.device("cpu"))
    assert moved.device.type == "cpu" and torch.equal(moved, x)


class RecordingBatch:
    """Stands in for a CPU tensor: records the calls ``to_device`` makes on it."""

    def __init__(self, calls):
        self.calls = calls

    def pin_memory(self):
        self.calls.append("pin_memory")
        return self

    def to(self, *args, **kwargs):
        self.calls.append(("to", args, kwargs))
        return "on device"


def test_to_device_on_cuda_goes_through_pinned_memory_without_blocking():
    calls = []
    cuda = torch.device("cuda", 0)
    assert to_device(RecordingBatch(calls), cuda) == "on device"
    assert calls == ["pin_memory", ("to", (cuda,), {"non_blocking": True})]
    calls.clear()
    to_device(RecordingBatch(calls), torch.device("cpu"))
    assert calls == [("to", (torch.device("cpu"),), {})]  # no pinning for a CPU target


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("value,diverged", [
    (0.0, False), (-3.5, False), (1e300, False), (math.nan, True), (math.inf, True), (-math.inf, True),
    (torch.tensor(2.0, requires_grad=True) * 1, False), (torch.tensor(math.nan), True),
    (torch.tensor(-math.inf, dtype=torch.float64), True), (np.float32(np.inf), True), (7, False),
])
def test_is_diverged_is_not_finite(value, diverged):
    assert is_diverged(value) is diverged


def test_is_diverged_reads_a_live_loss_without_warning():
    # called on every step's loss: reading a tensor that requires grad without detaching it
    # warns each time (torch's "Converting a tensor with requires_grad=True to a scalar")
    loss = (torch.ones(3, requires_grad=True) * 2).sum()
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch gives that warning once per process otherwise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert is_diverged(loss) is False
    finally:
        torch.set_warn_always(warn_always)


# ---------------------------------------------------------------- early stopping


def stop_index(values, patience, mode):
    """An independent reading of early stopping: the first check at which the checks since the
    last strict improvement of the best value (the first check counts as one) reach patience."""
    best, since = None, 0
    for i, v in enumerate(values):
        better = best is None or (v > best if mode == "max" else v < best)
        best, since = (v, 0) if better else (best, since + 1)
        if since >= patience:
            return i
    return None


SEQUENCES = [
    [0.1, 0.2, 0.2, 0.15, 0.3, 0.3, 0.3, 0.29, 0.1],
    [5.0, 4.0, 4.0, 4.5, 3.0, 3.0, 3.1, 2.9, 2.9, 2.9],
    [1.0] * 6,
    list(np.random.default_rng(0).normal(size=30)),
]


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("patience", [1, 2, 3])
@pytest.mark.parametrize("values", SEQUENCES)
def test_early_stopping_matches_an_independent_reading(values, patience, mode):
    stopper = EarlyStopping(patience, mode=mode)
    steps = [stopper.step(v) for v in values]
    first = stop_index(values, patience, mode)
    # step says stop from the first stopping check on until an improvement resets it
    assert (steps.index(True) if True in steps else None) == first
    pick = max if mode == "max" else min
    assert stopper.best == pick(values)


def test_early_stopping_defaults_to_max_and_ties_are_not_improvements():
    stopper = EarlyStopping(patience=2)
    assert stopper.improved(-1e9)  # anything improves on nothing
    assert [stopper.step(v) for v in (1.0, 1.0, 2.0, 2.0, 2.0)] == [False, False, False, False, True]
    assert stopper.best == 2.0 and stopper.bad_epochs == 2
    assert stopper.improved(2.5) and not stopper.improved(2.0) and not stopper.improved(1.5)
    low = EarlyStopping(patience=2, mode="min")
    low.step(1.0)
    assert low.improved(0.5) and not low.improved(1.0) and not low.improved(1.5)


def test_early_stopping_state_round_trip_continues_identically():
    values = SEQUENCES[1]
    whole = EarlyStopping(3, mode="min")
    expected = [whole.step(v) for v in values]
    first = EarlyStopping(3, mode="min")
    got = [first.step(v) for v in values[:5]]
    state = first.state_dict()
    assert state == {"best": 3.0, "bad_epochs": 0}
    resumed = EarlyStopping(3, mode="min")
    resumed.load_state_dict(state)
    got += [resumed.step(v) for v in values[5:]]
    assert got == expected and resumed.state_dict() == whole.state_dict()


# ---------------------------------------------------------------- mini-batches


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_minibatches_cover_every_index_once_in_torchs_permutation(n, batch):
    batches = list(minibatches(n, batch, generator=torch.Generator().manual_seed(4)))
    assert [len(b) for b in batches] == [min(batch, n - s) for s in range(0, n, batch)]
    assert torch.equal(torch.cat(batches), torch.randperm(n, generator=torch.Generator().manual_seed(4)))
    ordered = list(minibatches(n, batch, shuffle=False))
    assert torch.equal(torch.cat(ordered), torch.arange(n)) and [len(b) for b in ordered] == [len(b) for b in batches]


def test_minibatches_without_a_generator_draw_from_the_global_rng():
    torch.manual_seed(8)
    expected = torch.randperm(20)
    torch.manual_seed(8)
    assert torch.equal(torch.cat(list(minibatches(20, 6))), expected)
    assert len(list(minibatches(0, 4))) == 0
