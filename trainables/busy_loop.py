"""A fixed CPU kernel dressed as a family: no model, known metrics, set duration.

It exists to measure and test the orchestration itself (overhead benchmarks, resume, node
loss, MLflow sync) without the noise of real training. Every epoch burns ``seconds_per_epoch``
of CPU in float64 matrix products and reports metrics that are a known function of the config,
so a test can check what lands in MLflow to the last digit.

``noise`` (default 0) adds seeded Gaussian noise of that sd to the test metrics, drawn anew
for every configuration and eval-axis value, so seeds vary the way real training does and a
claim's effect (``+0.1 * lr``) has to be found through noise; ``task`` (default 0) shifts
every metric by ``0.02 * task``, a stand-in for datasets of different difficulty. With both
at 0 the metrics are exactly ``expected_acc``.
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


def noise_of(config: dict, k: int = 0) -> float:
    """The noise added to the test metric of eval value ``k`` (0: the plain metric): a pure
    function of the configuration, so a resumed or repeated trial reports the same values."""
    if not config.get("noise"):
        return 0.0
    key = [config["seed"], config.get("task", 0), round(config["lr"] * 1e6), config["batch_size"], k]
    return float(config["noise"] * np.random.default_rng(key).standard_normal())


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
            acc = expected_acc(config, epoch) + 0.02 * config.get("task", 0)
            metrics[metric_key("test", "busy", "acc")] = round(acc + noise_of(config), 6)
            for k in config.get("eval", {}).get("k", []):
                metrics[metric_key("test", "busy", "acc", k=k)] = round(acc - 0.001 * k + noise_of(config, k), 6)
        report(metrics, checkpoint={"epoch": epoch})
