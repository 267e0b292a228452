"""A fixed CPU kernel dressed as a family: no model, known metrics, set duration.

It exists to measure and test the orchestration itself (overhead benchmarks, resume, node
loss, MLflow sync) without the noise of real training. Every epoch burns ``seconds_per_epoch``
of CPU in float64 matrix products and reports metrics that are a known function of the config,
so a test can check what lands in MLflow to the last digit.
"""

from __future__ import annotations

import time

import numpy as np

from trainables.common.metrics import metric_key


def burn(seconds: float, size: int = 64) -> int:
    """Multiply small matrices until ``seconds`` of wall time have passed; returns the count."""
    a = np.random.default_rng(0).standard_normal((size, size))
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        a = np.tanh(a @ a.T / size)
        count += 1
    return count


def expected_acc(config: dict, epoch: int) -> float:
    """The value reported as ``val/busy/acc`` at ``epoch``: rises with epochs and with lr."""
    return round(1.0 - 0.5 / (epoch + 1) - 0.01 * config["seed"] + 0.1 * config["lr"], 6)


def train(config: dict, report, restore: dict | None = None) -> None:
    start_epoch = restore["epoch"] + 1 if restore else 1
    for epoch in range(start_epoch, config["epochs"] + 1):
        burn(config["seconds_per_epoch"])
        if epoch == config["diverge_at_epoch"]:
            report({"epoch": epoch, "diverged": 1.0})
            return
        metrics = {
            "epoch": epoch,
            metric_key("train", "busy", "loss"): round(1.0 / epoch, 6),
            metric_key("val", "busy", "acc"): expected_acc(config, epoch),
        }
        if epoch == config["epochs"]:
            acc = expected_acc(config, epoch)
            metrics[metric_key("test", "busy", "acc")] = acc
            for k in config.get("eval", {}).get("k", []):
                metrics[metric_key("test", "busy", "acc", k=k)] = round(acc - 0.001 * k, 6)
        report(metrics, checkpoint={"epoch": epoch})
