"""Eval axes against the naive grid: the attn_knn ``k`` study (k x TTA views x seeds) run once
with k and TTA as eval axes (one trained model per seed, every cell evaluated on it), and once
the naive way, one Tune trial per (k, views, seed) cell, each training its own model.

Both go through the same ``orchestrate sweep`` (real Ray + MLflow, fresh process each) with the
same data, epochs, seeds and parallelism; the naive study is a copy of attn_knn.yaml with
``k_eval`` x ``tta_eval`` as grid axes and no eval axes (``ORCHESTRATE_SPACES_DIR``), so each
naive trial reports exactly its own cell under the same metric name. The eval-axes sweep runs
before and after the naive one (the machine's load drifts; the ratio uses their mean). Prints
the wall time of each, the ratio, and the largest difference between the two ways' metrics for
the same cell and seed (val and test, every method and metric, read back from MLflow), next to
the difference between the two eval-axes runs (what nondeterminism alone gives). The target is
identical metrics: ``KnnIndex.search`` answers in a canonical (similarity, index) order, so the
eval-axes trial's one search at the largest k, sliced, is exactly each naive trial's own search.

Trials run one at a time by default, each with every CPU (``--cpus-per-trial`` = the CPU
count): wall time is then the compute each way needs. With two slots, the three eval-axes
trials would leave one slot idle for half their run, which measures packing, not the method.

By default both ways train as the shipped ``k`` study does (its epochs and training-set size,
read from attn_knn.yaml): the ratio is then the one a researcher gets from that study. At
smaller sizes (``--max-train 500 --epochs 3``, this script's default until 2026-12-02) a trial
is under a second of training and the ratio measures each sweep's fixed start-up instead.

    python bench/eval_axes.py --quick     # 3 k x 2 views x 1 seed, 1 epoch on 300 images (~3 min)
    python bench/eval_axes.py             # the shipped k study: 6 k x 2 views x 3 seeds, its training (~7 min)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine_line, sweep, table, trial_runs, verdict, write_spaces  # noqa: E402
from trainables.common.metrics import parse_metric_key  # noqa: E402

FAMILY = "attn_knn"
TARGET = 10.0
RUNS = (("axes", "axes"), ("naive", "naive"), ("axes again", "axes"))  # (run, study), in the order they run


def bench_studies(ks: list[int], views: list[int], seeds: int, settings: dict) -> dict:
    """The two studies: ``axes`` (eval axes k x tta_views) and ``naive`` (the same cells as a grid)."""
    return {
        "axes": {"description": "k and TTA views as eval axes: one trained model per seed",
                 "set": settings, "seeds": seeds, "eval": {"k": ks, "tta_views": views}},
        "naive": {"description": "one trial per (k, TTA views) cell, each retraining",
                  "set": settings, "seeds": seeds, "grid": {"k_eval": ks, "tta_eval": views}},
    }


def cell_values(runs: list[dict], naive: bool) -> dict[tuple, list[float]]:
    """``{(seed, split, method, k, views, metric): [values]}`` of every eval-axis metric (k is
    None for the cnn head). A naive trial contributes only its own cell (its k_eval and
    tta_eval); the cnn head's cells come once per naive k, hence lists."""
    out = defaultdict(list)
    for run in runs:
        params = run["params"]
        for name, value in run["metrics"].items():
            key = parse_metric_key(name)
            if key is None or key["split"] == "train" or "tta_views" not in key["axes"]:
                continue
            k, views = key["axes"].get("k"), key["axes"]["tta_views"]
            if naive and (views != params["tta_eval"] or k not in (None, params["k_eval"])):
                continue
            out[(int(params["seed"]), key["split"], key["method"], k, views, key["metric"])].append(value)
    return dict(out)


def compare(axes: dict[tuple, list[float]], naive: dict[tuple, list[float]]) -> dict:
    """Largest |naive - axes| over every naive value, how many differ at all, and cells the
    eval-axes run lacks (there should be none)."""
    diffs = [(abs(value - axes[key][0]), key) for key, values in naive.items() if key in axes for value in values]
    worst = max(diffs, default=(0.0, None))
    return {"compared": len(diffs), "nonzero": sum(d > 0 for d, _ in diffs), "max": worst[0], "where": worst[1],
            "missing": sorted(set(naive) - set(axes), key=str)}


_IN_PROCESS = """import json, sys, tempfile, time
from orchestrator.spaces import load_study
from orchestrator.trainable import fresh_train, seed_globals
family, name, index = sys.argv[1:]
study = load_study(family, name)
config = study.trial_configs()[int(index)]  # derived values applied
train = fresh_train(study.entrypoint, study.import_paths)
with tempfile.TemporaryDirectory() as tmp:
    config["artifact_dir"] = tmp
    seed_globals(int(config.get("seed", 0)))
    began = time.perf_counter()
    train(config, lambda metrics, checkpoint=None: None, None)
    print(json.dumps(time.perf_counter() - began))
"""


def in_process_seconds(study: str, spaces: Path, cpus: float, index: int = 0) -> float:
    """Seconds of one trial's ``train()`` (training and every evaluation, nothing else: no Ray,
    no MLflow, no checkpoint) of ``study``'s trial ``index``, in a fresh process with the threads
    a trial gets (Ray sets ``OMP_NUM_THREADS`` to the trial's CPUs)."""
    threads = str(max(1, int(cpus)))
    env = {**os.environ, "ORCHESTRATE_SPACES_DIR": str(spaces), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    run = subprocess.run([sys.executable, "-c", _IN_PROCESS, FAMILY, study, str(index)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return float(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="k 1/5/16 x views 1/5 x 1 seed, 1 epoch on 300 images")
    parser.add_argument("--epochs", type=int, help="training epochs of every trial (default: the k study's; quick 1)")
    parser.add_argument("--max-train", type=int,
                        help="training images, 0 for the whole training split (default: the k study's; quick 300)")
    parser.add_argument("--seeds", type=int, help="seeds (default 3, as the shipped study; quick 1)")
    parser.add_argument("--parallel", type=int, default=1, help="trials at once in both sweeps (each gets CPUs / parallel)")
    parser.add_argument("--keep", type=Path, help="keep the sweeps' stores under this directory")
    args = parser.parse_args()

    from orchestrator.spaces import load_study

    study = load_study(FAMILY, "k")
    shipped, trained = study.eval_axes, study.trial_configs()[0]  # k: the study's 6 values; tta_views: the file's [1, 5]
    ks = [1, 5, 16] if args.quick else shipped["k"]
    views = shipped["tta_views"]
    seeds = args.seeds or (1 if args.quick else 3)
    settings = {"epochs": args.epochs or (1 if args.quick else trained["epochs"]),
                "max_train": args.max_train if args.max_train is not None else (300 if args.quick else trained["max_train"]),
                "max_test": 200 if args.quick else 0, "device": "cpu"}
    cells = len(ks) * len(views) * seeds
    cpus_per_trial = os.cpu_count() / args.parallel

    print(f"{FAMILY} on digits {settings}; k {ks} x tta_views {views} x {seeds} seeds = {cells} cells; "
          f"{args.parallel} trial(s) at once, {cpus_per_trial:g} CPUs each")
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench_eval_axes_") as tmp:
        work = args.keep or Path(tmp)
        spaces = write_spaces(work, FAMILY, bench_studies(ks, views, seeds, settings), drop_eval=True)
        # a naive trial's cost depends on its cell (5 TTA views cost 5 passes): the mean of the
        # cheapest (first k, 1 view) and the dearest (last k, most views)
        alone = {"axes": in_process_seconds("axes", spaces, cpus_per_trial),
                 "naive": sum(in_process_seconds("naive", spaces, cpus_per_trial, i) for i in (0, -1)) / 2}
        print(f"  one trial's train() in one process (no Ray, no MLflow): eval axes {alone['axes']:.1f} s, "
              f"naive {alone['naive']:.1f} s (mean of its first and last cell)", flush=True)
        walls, runs = {}, {}
        for run, study in RUNS:  # eval axes before and after the naive grid: the load's drift falls on both sides
            walls[run], uri = sweep(FAMILY, study, spaces, work / run.replace(" ", "_"), cpus_per_trial)
            runs[run] = trial_runs(uri, FAMILY)
            print(f"  {run}: {len(runs[run])} trials in {walls[run]:.1f} s", flush=True)
    axes = cell_values(runs["axes"], naive=False)
    diff = compare(axes, cell_values(runs["naive"], naive=True))
    repeat = compare(axes, cell_values(runs["axes again"], naive=False))
    if diff["missing"]:
        raise SystemExit(f"eval-axes run lacks {len(diff['missing'])} naive cells, e.g. {diff['missing'][0]}")

    print()
    in_trials = {run: sum(r["seconds"] for r in runs[run]) for run in runs}
    print(table(["run", "trials", "cells", "wall s", "in trials s", "outside s", "wall s / cell"], [
        [f"{run}{' (retrain per cell)' if run == 'naive' else ''}", len(runs[run]), cells, walls[run], in_trials[run],
         walls[run] - in_trials[run], walls[run] / cells] for run, _ in RUNS]))
    print("  in trials: sum of trial runs' MLflow start-to-end; outside: the sweep's own start-up, scheduling and sync")
    for name, d in (("naive vs eval axes", diff), ("eval axes vs eval axes again", repeat)):
        where = "" if not d["max"] else f" at seed/split/method/k/views/metric {d['where']}"
        print(f"{name}: {d['compared']} metric values compared, {d['nonzero']} differ; largest |difference| {d['max']:.3g}{where}")
    print(f"identical metrics, naive vs eval axes (target): {verdict(diff['nonzero'] == 0)}")
    axes_wall, axes_in = (walls["axes"] + walls["axes again"]) / 2, (in_trials["axes"] + in_trials["axes again"]) / 2
    print(f"ratio of time in trials (start-up excluded): {in_trials['naive'] / axes_in:.1f}x; at most "
          f"{len(runs['naive']) / len(runs['axes']):.0f}x (trainings per eval-axes training) but for load drift between runs")
    alone_ratio = len(runs["naive"]) * alone["naive"] / (len(runs["axes"]) * alone["axes"])
    print(f"ratio with no orchestration at all (trials x one trial's train() in one process): {alone_ratio:.1f}x: "
          f"what the wall-time ratio tends to as a sweep's own costs go to zero "
          f"(each eval-axes trial evaluates {cells // len(runs['axes'])} cells, a naive one 1)")
    ratio = walls["naive"] / axes_wall
    print(f"ratio naive / eval-axes wall time (eval axes: mean of both runs): {ratio:.1f}x "
          f"(target >= {TARGET:g}x: {verdict(ratio >= TARGET)})")


if __name__ == "__main__":
    main()
