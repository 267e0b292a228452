"""Orchestration overhead: N trials of a fixed CPU kernel (the ``busy_loop`` family: each epoch
burns a set number of wall-clock seconds in matrix products) through ``orchestrate sweep``
(Ray Tune + MLflow, per-epoch reports and checkpoints, a fresh process) against the same N
kernels, same configs, in a plain ``concurrent.futures`` process pool with the same parallelism.

The kernels take the same time either way, so the difference in wall time is what the
orchestrator costs: Ray start-up, one worker process per trial, reports, checkpoints, MLflow
logging and the final sync. Prints it per trial and as a fraction of the sweep's wall time,
for short trials and for 30-s trials (min / median over ``--repeats``).

    python bench/overhead.py --quick     # 4 trials: 0.5-s and 5-s kernels (~2 min)
    python bench/overhead.py             # 8 trials: 1-s and 30-s kernels, 2 repeats (~12 min)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, machine_line, min_median, sweep, table, trial_runs, verdict, write_spaces  # noqa: E402
from trainables import busy_loop  # noqa: E402

FAMILY = "busy_loop"
TARGET = 0.15


def trial_configs(trials: int, epochs: int, seconds_per_epoch: float) -> list[dict]:
    """The configs the sweep's trials get (defaults + the study's settings, seeds 0..N-1)."""
    defaults = yaml.safe_load((ROOT / "search_spaces" / f"{FAMILY}.yaml").read_text())["defaults"]
    return [{**defaults, "epochs": epochs, "seconds_per_epoch": seconds_per_epoch, "seed": seed, "eval": {}}
            for seed in range(trials)]


def run_kernel(config: dict) -> dict:
    """One trial without any orchestration: the family's ``train`` with a list as its report."""
    reports = []
    busy_loop.train(config, lambda metrics, checkpoint=None: reports.append(metrics))
    return reports[-1]


def pool_wall(configs: list[dict], workers: int) -> float:
    """Wall seconds for a process pool of ``workers`` to run every config (pool start included)."""
    began = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        finals = list(pool.map(run_kernel, configs))
    wall = time.perf_counter() - began
    expected = [busy_loop.expected_acc(c, c["epochs"]) for c in configs]
    if [f["test/busy/acc"] for f in finals] != expected:
        raise RuntimeError("pool trials reported unexpected metrics")
    return wall


def sweep_wall(work: Path, trials: int, epochs: int, seconds_per_epoch: float, workers: int) -> tuple[float, float]:
    """(wall seconds, seconds inside trials) of the same trials through ``orchestrate sweep``."""
    studies = {"bench": {"description": "fixed kernels for the overhead benchmark", "seeds": trials,
                         "set": {"epochs": epochs, "seconds_per_epoch": seconds_per_epoch}}}
    spaces = write_spaces(work, FAMILY, studies, drop_eval=True)
    wall, uri = sweep(FAMILY, "bench", spaces, work, os.cpu_count() / workers)
    runs = trial_runs(uri, FAMILY)
    if len(runs) != trials:
        raise RuntimeError(f"sweep logged {len(runs)} trial runs, expected {trials}")
    return wall, sum(run["seconds"] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trials of 0.5-s and 5-s kernels, once")
    parser.add_argument("--trials", type=int, help="trials per case (default 8; quick 4)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="trials at once, both ways (default: CPUs)")
    parser.add_argument("--repeats", type=int, help="runs of each case (default 2; quick 1)")
    args = parser.parse_args()
    trials = args.trials or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    # (name, epochs, seconds per epoch): a short trial, and a long one with a report and checkpoint every epoch
    cases = [("0.5-s", 1, 0.5), ("5-s", 5, 1.0)] if args.quick else [("1-s", 1, 1.0), ("30-s", 10, 3.0)]

    print(f"{FAMILY}: {trials} trials per case, {args.workers} at once, {repeats} repeat(s)")
    print(machine_line())
    rows, fractions = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        for name, epochs, seconds in cases:
            configs = trial_configs(trials, epochs, seconds)
            pools, sweeps, inside = [], [], []
            for rep in range(repeats):
                pools.append(pool_wall(configs, args.workers))
                wall, in_trials = sweep_wall(Path(tmp) / f"{name}-{rep}", trials, epochs, seconds, args.workers)
                sweeps.append(wall)
                inside.append(in_trials)
                print(f"  {name} trials, repeat {rep + 1}: pool {pools[-1]:.1f} s, sweep {wall:.1f} s", flush=True)
            overhead = [s - p for s, p in zip(sweeps, pools)]
            fraction = [o / s for o, s in zip(overhead, sweeps)]
            fractions[name] = statistics.median(fraction)
            rows.append([name, min_median(pools), min_median(sweeps), min_median([o / trials for o in overhead]),
                         min_median([100 * f for f in fraction]), min_median([s / p for s, p in zip(sweeps, pools)]),
                         min_median([(i - trials * epochs * seconds) / trials for i in inside])])
    print()
    print("figures: min / median over repeats")
    print(table(["trial", "pool wall s", "sweep wall s", "overhead s / trial", "overhead % of sweep wall",
                 "sweep / pool", "in-trial extra s / trial"], rows))
    print("  overhead = sweep wall - pool wall; in-trial extra = a trial's MLflow run time beyond its kernel")
    long_name = cases[-1][0]
    print(f"overhead fraction of wall time for {long_name} trials: {100 * fractions[long_name]:.1f}% "
          f"(target <= {100 * TARGET:.0f}% for 30-s trials: {verdict(fractions[long_name] <= TARGET)}"
          f"{'' if long_name == '30-s' else '; quick mode does not test it'})")


if __name__ == "__main__":
    main()
