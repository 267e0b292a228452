"""One trial's lifecycle, the part every family's ``train`` shares.

A family keeps its model, its epoch and its evaluation; :class:`Trial` owns the rest:

* seeding: python, numpy and torch (CPU and CUDA) from ``config["seed"]``, plus a torch
  generator (:attr:`Trial.generator`) and numpy generators (:meth:`Trial.numpy_rng`) for the
  family's own streams. Every trial starts from the same global state whatever ran before it in
  the same process, so a reused worker leaks no RNG state from one trial into the next.
* the checkpoint: the state of everything registered with :meth:`Trial.track` (objects with
  ``state_dict``/``load_state_dict``, generators) and every value in :attr:`Trial.values`,
  plus every RNG, copied to the CPU at report time (later steps cannot change a reported
  snapshot), and restored when the first epoch starts: after the family's set-up, so the state
  an epoch starts from is the one an uninterrupted run would have had. That is what makes a
  resumed run report exactly what an uninterrupted one does.
* the guard against resuming a finished trial (its final checkpoint says ``done``),
* the divergence report, and per-phase wall-time (:meth:`Trial.timed`).

Usage::

    trial = Trial(config, report, restore)
    model, optimizer = ..., ...
    trial.track(model=model, optimizer=optimizer)
    for epoch in trial.epochs(config["epochs"]):
        with trial.timed("epoch"):
            loss = ...
        if is_diverged(loss):
            return trial.diverged(epoch)
        trial.report(epoch, metrics, done=epoch == config["epochs"])
"""

from __future__ import annotations

import copy
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from trainables.common.metrics import ECE_BINS, reliability_bins

RELIABILITY_FILE = "reliability.json"


def capture_rng() -> dict:
    """Every process-wide RNG's state (python, numpy's legacy global, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds CUDA as well


def cpu_copy(obj: Any) -> Any:
    """A detached CPU copy of nested state (tensors, dicts, lists, tuples, numpy, plain values)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: cpu_copy(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(value) for value in obj)
    return copy.deepcopy(obj)


def _state_of(obj: Any) -> Any:
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    return obj.state_dict()


def _load_state(obj: Any, state: Any) -> None:
    if isinstance(obj, torch.Generator):
        obj.set_state(state)
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = state
    else:
        obj.load_state_dict(state)


class Trial:
    """Seeding, checkpoint, resume, divergence and timing of one trial (see the module doc)."""

    def __init__(self, config: dict, report: Callable, restore: dict | None = None):
        self.config, self._report, self._restore = config, report, restore
        self.seed = int(config["seed"])
        seed_all(self.seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.values: dict[str, Any] = {}
        self._tracked: dict[str, Any] = {"generator": self.generator}
        self._ms: dict[str, float] = {}
        self._reliability: dict[str, dict] = {}
        self.finished = bool(restore and restore.get("done"))
        self.start_epoch = int(restore["epoch"]) + 1 if restore else 1

    # ------------------------------------------------------------ state

    def numpy_rng(self, *stream: int) -> np.random.Generator:
        """A tracked numpy generator seeded with ``[seed, *stream]`` (one per independent stream)."""
        name = "numpy_rng:" + ":".join(map(str, stream))
        rng = np.random.default_rng([self.seed, *stream])
        self._tracked[name] = rng
        return rng

    def track(self, **objects: Any) -> None:
        """Register objects whose state goes into every checkpoint: modules, optimizers,
        schedulers, early stoppers (anything with ``state_dict``), torch or numpy generators."""
        self._tracked.update(objects)

    def value(self, name: str, default: Any) -> Any:
        """A plain value kept in :attr:`values` and the checkpoint: the restored one on resume,
        else ``default`` (e.g. the best model's weights so far, the nets still training)."""
        if self._restore is not None and name in self._restore["values"]:
            self.values[name] = self._restore["values"][name]
        else:
            self.values.setdefault(name, default)
        return self.values[name]

    def epochs(self, last: int, first: int = 1) -> Iterator[int]:
        """``first..last`` or, on resume, the epochs after the checkpoint's (none when it was the
        final one). The tracked state and every RNG are restored just before the first epoch."""
        if self.finished:
            return
        if self._restore is not None:
            for name, obj in self._tracked.items():
                _load_state(obj, self._restore["tracked"][name])
            self._ms = dict(self._restore["ms"])
            restore_rng(self._restore["rng"])
        yield from range(max(first, self.start_epoch), last + 1)

    # ------------------------------------------------------------ timing

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the wall time of the block to ``phase`` (kept across resumes)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._ms[phase] = self._ms.get(phase, 0.0) + 1000 * (time.perf_counter() - began)

    def ms(self, phase: str) -> float:
        """Total milliseconds spent in ``phase`` so far."""
        return self._ms.get(phase, 0.0)

    def perf(self) -> dict[str, float]:
        """Every phase timed so far as a ``perf/<phase>_ms`` metric (phases never entered are absent)."""
        return {f"perf/{phase}_ms": ms for phase, ms in self._ms.items()}

    # ------------------------------------------------------------ reporting

    def reliability(self, split: str, method: str, probs: np.ndarray, labels: np.ndarray) -> None:
        """Keep the reliability-diagram bins of ``method`` (the method part of a metric key,
        axes included: ``attn_knn:tta_views:5``); written with the final report."""
        self._reliability.setdefault(split, {})[method] = reliability_bins(probs, labels)

    def report(self, epoch: int, metrics: dict, done: bool = False) -> None:
        """Report ``metrics`` for ``epoch`` with a checkpoint of everything tracked. ``done``
        marks the final report: its checkpoint ends the trial on any later resume."""
        if done and self._reliability:
            self._write_artifact(RELIABILITY_FILE, {"bins": ECE_BINS, "splits": self._reliability})
        checkpoint = {
            "epoch": epoch, "done": done, "rng": capture_rng(), "ms": dict(self._ms),
            "tracked": {name: cpu_copy(_state_of(obj)) for name, obj in self._tracked.items()},
            "values": cpu_copy(self.values),
        }
        self._report({"epoch": epoch, **metrics}, checkpoint=checkpoint)

    def diverged(self, epoch: int) -> None:
        """Report a non-finite loss: the trial ends here, as ``diverged``."""
        self._report({"epoch": epoch, "diverged": 1.0})

    def _write_artifact(self, name: str, payload: dict) -> None:
        directory = self.config.get("artifact_dir")
        if not directory:
            return  # outside the orchestrator (a test, a notebook) there is nowhere to put files
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        tmp.replace(path)
