"""trainables.common.calibration: the temperature fit, checked against torch's cross-entropy and
against the fit's first-order condition solved by an independent root finder (scipy's brentq)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import softmax

from one_thread import one_thread  # noqa: F401  (one torch and one BLAS/OpenMP thread: tiny models)
from trainables.common.calibration import TEMPERATURE_BOUNDS, fit_temperature, temperature_nll


def sampled(n=400, classes=5, scale=1.0, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated at T = 1 before ``scale``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)) * 2
    labels = np.array([rng.choice(classes, p=p) for p in softmax(logits, axis=1)])
    return logits * scale, labels


def nll_slope(logits, labels, t):
    """d NLL / d(1/T) = -mean(z_y - E_p[z]) with p = softmax(z / T): zero at the best T."""
    p = softmax(logits / t, axis=1)
    return -np.mean(logits[np.arange(len(labels)), labels] - (p * logits).sum(1))


def stationary_t(logits, labels, lo=1e-2, hi=1e2):
    # the slope in beta = 1/T rises monotonically (the NLL is convex in beta), so one root
    return 1.0 / brentq(lambda beta: nll_slope(logits, labels, 1.0 / beta), 1.0 / hi, 1.0 / lo, xtol=1e-12)


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 40.0])
def test_temperature_nll_is_torch_cross_entropy(t):
    logits, labels = sampled(n=64, seed=1)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits) / t, torch.tensor(labels))
    assert temperature_nll(logits, labels, t) == pytest.approx(float(expected), rel=1e-12)


def test_temperature_nll_computes_in_float64():
    # float32 logits: a float32 softmax would be off by ~1e-7 relative
    logits, labels = sampled(n=64, seed=10)
    logits = logits.astype(np.float32)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64) / 1.3, torch.tensor(labels))
    assert temperature_nll(logits, labels, 1.3) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("scale,seed", [(3.0, 2), (0.4, 3), (1.0, 4)])
def test_fit_is_the_root_of_the_first_order_condition(scale, seed):
    logits, labels = sampled(scale=scale, seed=seed)
    t = fit_temperature(logits, labels)
    root = stationary_t(logits, labels)
    if temperature_nll(logits, labels, root) < temperature_nll(logits, labels, 1.0):
        assert t == pytest.approx(root, rel=1e-4)
    else:
        assert t == 1.0
    # logits scaled by s are best read at s times the temperature
    assert {3.0: t > 2.0, 0.4: t < 0.6, 1.0: 0.7 < t < 1.4}[scale]


def test_torch_tensors_give_the_numpy_fit():
    logits, labels = sampled(scale=2.0, seed=5)
    expected = fit_temperature(logits, labels)
    got = fit_temperature(torch.tensor(logits, dtype=torch.float32, requires_grad=True), torch.tensor(labels))
    assert got == pytest.approx(expected, rel=1e-4) and got != 1.0


def test_every_label_the_argmax_keeps_one():
    logits, _ = sampled(seed=6)
    assert fit_temperature(logits, logits.argmax(1)) == 1.0  # the NLL falls without limit as T -> 0
    labels = logits.argmax(1)
    labels[:3] = (labels[:3] + 1) % 5  # a few mistakes: a finite optimum exists again
    assert fit_temperature(logits, labels) == pytest.approx(stationary_t(logits, labels), rel=1e-4)


def test_bounds_clip_the_search_and_t_one_wins_when_it_is_better():
    logits, labels = sampled(scale=1.6, seed=7)
    root = stationary_t(logits, labels)
    assert 1.3 < root < 1.9
    # the optimum above the range: the NLL is unimodal, so the best point is the upper bound,
    # which beats T = 1
    assert fit_temperature(logits, labels, bounds=(1.05, 1.2)) == pytest.approx(1.2, rel=1e-3)
    # below the range: the lower bound, likewise
    assert fit_temperature(logits, labels, bounds=(2.0, 2.2)) == pytest.approx(2.0, rel=1e-3)
    # a range whose best point loses to T = 1 (which lies outside it): 1 is kept
    assert temperature_nll(logits, labels, 30.0) > temperature_nll(logits, labels, 1.0)
    assert fit_temperature(logits, labels, bounds=(30.0, 100.0)) == 1.0


def test_default_bounds_reach_far_temperatures():
    # a far overconfident model: T ~ 30, inside the default (0.01, 100) range
    logits, labels = sampled(scale=30.0, seed=8)
    assert TEMPERATURE_BOUNDS == (1e-2, 1e2)
    assert fit_temperature(logits, labels) == pytest.approx(stationary_t(logits, labels), rel=1e-4)
    # and a far underconfident one: T ~ 0.02
    logits, labels = sampled(scale=0.02, seed=9)
    assert fit_temperature(logits, labels) == pytest.approx(stationary_t(logits, labels), rel=1e-4)


def test_fit_warns_about_nothing():
    # a warning here (an unknown solver option, an overflow in the softmax) is a fit that did not
    # run as written: scipy ignores an option it does not know and falls back to its default
    logits, labels = sampled(scale=5.0, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_temperature(logits, labels) != 1.0
