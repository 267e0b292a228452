"""Temperature scaling, one fit for every family that calibrates (clip_fusion, subtask_meta)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

TEMPERATURE_BOUNDS = (1e-2, 1e2)


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """The exact mean NLL of softmax(logits / T), through log-softmax. Not the reported ``nll``
    metric, which floors probabilities at 1e-12: a floor caps what a confident mistake costs, so
    on a val set with few mistakes the capped NLL has a spurious minimum at a too-small T."""
    labels = np.asarray(labels)
    log_p = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def fit_temperature(logits, labels, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The scalar T minimising the NLL of softmax(logits / T) on (val) labels: a bounded Brent
    search over log T (the NLL is unimodal in it), kept only when it beats T = 1, so scaling
    never raises the NLL it was fit on. When every label is already the argmax the NLL falls
    without limit as T -> 0: nothing identifies a temperature, and T = 1 is kept (a T at the
    search bound would make every later mistake cost ~log 1e12). Accepts numpy arrays or torch
    tensors."""
    logits = np.asarray(_numpy(logits), np.float64)
    labels = np.asarray(_numpy(labels))
    if np.all(logits.argmax(1) == labels):
        return 1.0
    res = minimize_scalar(lambda log_t: temperature_nll(logits, labels, np.exp(log_t)),
                          bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-5})
    t = float(np.exp(res.x))
    return t if temperature_nll(logits, labels, t) < temperature_nll(logits, labels, 1.0) else 1.0


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
