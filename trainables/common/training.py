"""Small helpers every family's training loop uses: device choice, divergence, early stopping,
mini-batches (seeding and RNG state belong to ``trainables.common.lifecycle``)."""

from __future__ import annotations

import math
from typing import Iterator

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without CUDA is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this node")
    return torch.device(name)


def forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU generator and, on CUDA, ``device``'s own: the
    block's draws leave the global torch RNG as it was."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=cuda)


def is_diverged(loss: float | torch.Tensor) -> bool:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return not math.isfinite(value)


class EarlyStopping:
    """Tracks the best value of a validation metric; ``step`` returns True when training should
    stop (no improvement for ``patience`` consecutive checks)."""

    def __init__(self, patience: int, mode: str = "max"):
        self.patience, self.mode = patience, mode
        self.best: float | None = None
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        return self.best is None or (value > self.best if self.mode == "max" else value < self.best)

    def step(self, value: float) -> bool:
        if self.improved(value):
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]


def minibatches(n: int, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def autocast(device: torch.device):
    """bf16 mixed precision on CUDA, a no-op context on CPU (the CPU path stays exact float32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a CPU batch to ``device``; on CUDA through pinned memory with a non-blocking copy."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
