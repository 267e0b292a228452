"""The plain Ray Tune baseline of bench/overhead.py: the ``busy_loop`` kernel as a Ray Tune user
would write it without this project: a function trainable calling ``busy_loop.train``, each
report a ``tune.report`` with a checkpoint (a pickled dict in a fresh directory), local Ray
started here, one trial per seed. Prints one JSON line: trials finished, seconds in ``fit`` and
each trial's start and end (epoch seconds, from a Tune callback: what bench/overhead.py's ``--trivial``
reads the driver's memory at).

    python bench/plain_tune.py --trials 8 --epochs 1 --seconds 1.0 --cpus-per-trial 1 [--reuse]
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables import busy_loop  # noqa: E402


def trainable(config: dict) -> None:
    restore = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore = pickle.loads((Path(directory) / "state.pkl").read_bytes())

    def report(metrics: dict, checkpoint: dict | None = None) -> None:
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "state.pkl").write_bytes(pickle.dumps(checkpoint))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    busy_loop.train(config, report, restore)


class TrialTimes(tune.Callback):
    """When each trial started and completed, on the driver."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.starts.append(time.time())

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ends.append(time.time())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="seconds per epoch")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0)
    parser.add_argument("--reuse", action="store_true", help="Tune's reuse_actors")
    parser.add_argument("--storage", required=True)
    args = parser.parse_args()
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    space = {"epochs": args.epochs, "seconds_per_epoch": args.seconds, "lr": 0.1, "diverge_at_epoch": 0,
             "seed": tune.grid_search(list(range(args.trials)))}
    times = TrialTimes()
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": args.cpus_per_trial}), param_space=space,
                       tune_config=tune.TuneConfig(reuse_actors=args.reuse),
                       run_config=tune.RunConfig(storage_path=args.storage, verbose=0, callbacks=[times]))
    began = time.perf_counter()
    results = tuner.fit()
    fit = time.perf_counter() - began
    done = sum(r.error is None and r.metrics.get("epoch") == args.epochs for r in results)
    print(json.dumps({"trials": done, "fit_s": fit, "starts": times.starts, "ends": times.ends}), flush=True)


if __name__ == "__main__":
    main()
