"""Cold vs warm feature cache: the same set_anomaly sweep twice, first with an empty
``ORCHESTRATE_CACHE_DIR`` (the encoder is trained/run once), then again over the filled cache.

By default each sweep goes through the real CLI (``orchestrate sweep set_anomaly --study
cache_bench``: local Ray, MLflow in a temp store) and per-trial figures come from MLflow;
``--direct`` calls the family's ``train()`` in this process instead (no Ray, no MLflow).

Prints per trial: wall time and ``perf/features_ms`` (the time spent getting features), and the
warm/cold ratios of the mean feature time and of the mean trial time. The feature ratio is the
cache's own effect (target <= 0.1); the trial ratio also contains training, which the cache
does not touch.

    python bench/feature_cache.py --quick            # digits, own-cnn
    python bench/feature_cache.py --dataset imagefolder:/work/shared/data/cifar10-jpeg-train.zip --set max_train=10000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_cli(cache_dir: Path, work: Path, args) -> list[dict]:
    """One sweep through ``python -m orchestrator.cli``; per-trial figures from its MLflow store."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "set_anomaly", "--study", args.study,
           "--dataset", args.dataset, "--tracking-uri", uri, "--storage", str(work / "runs"), "--no-report",
           "--max-concurrent", str(args.max_concurrent)]
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "ORCHESTRATE_CACHE_DIR": str(cache_dir)}
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"sweep failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("set_anomaly")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("role") == "trial"]
    trials = [{"trial": r.data.tags.get("trial_id", r.info.run_id[:8]),
               "wall_s": (r.info.end_time - r.info.start_time) / 1000,
               "features_ms": r.data.metrics.get("perf/features_ms", float("nan"))} for r in runs]
    print(f"  sweep wall (incl. Ray start): {wall:.1f} s")
    return sorted(trials, key=lambda t: t["trial"])


def run_direct(cache_dir: Path, args) -> list[dict]:
    """The study's trials called one after another in this process (no Ray, no MLflow)."""
    from orchestrator.spaces import load_study
    from trainables.set_anomaly import train

    study = load_study("set_anomaly", args.study, dict(item.split("=", 1) for item in [f"dataset={args.dataset}", *args.set]))
    trials = []
    for i, config in enumerate(study.trial_configs()):
        config = {**config, "device": "auto", "cache_dir": str(cache_dir)}
        reports = []
        began = time.perf_counter()
        train(config, lambda metrics, checkpoint=None: reports.append(metrics))
        trials.append({"trial": f"{i}:heads={config['heads']}", "wall_s": time.perf_counter() - began,
                       "features_ms": reports[-1].get("perf/features_ms", float("nan"))})
    return trials


def summarise(name: str, trials: list[dict]) -> tuple[float, float]:
    for t in trials:
        print(f"  {name} {t['trial']:<28} trial {t['wall_s']:7.2f} s   features {t['features_ms'] / 1000:7.3f} s")
    mean_wall = sum(t["wall_s"] for t in trials) / len(trials)
    mean_feat = sum(t["features_ms"] for t in trials) / len(trials) / 1000
    print(f"  {name} mean: trial {mean_wall:.2f} s, features {mean_feat:.3f} s over {len(trials)} trials")
    return mean_wall, mean_feat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="digits, the smallest settings (about a minute of compute)")
    parser.add_argument("--direct", action="store_true", help="call train() in-process instead of the CLI sweep")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--study", default="cache_bench")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials at once in the CLI sweep (0: Ray decides)")
    args = parser.parse_args()
    if args.quick:
        args.dataset, args.set = "digits", ["n_train_sets=300", "n_val_sets=100", "n_test_sets=100", "epochs=1", *args.set]

    with tempfile.TemporaryDirectory(prefix="feature_cache_bench_") as tmp:
        cache = Path(tmp) / "cache"
        if args.dataset.startswith("imagefolder:"):  # decode the images first: that cache is not what we measure
            from trainables.common.data import load_dataset

            os.environ["ORCHESTRATE_CACHE_DIR"] = str(cache)
            load_dataset(args.dataset)
        mode = "direct train() calls" if args.direct else "orchestrate sweep (CLI, local Ray)"
        print(f"set_anomaly study {args.study} on {args.dataset} via {mode}; overrides {args.set or 'none'}")
        results = {}
        for phase in ("cold", "warm"):
            work = Path(tmp) / phase
            work.mkdir()
            print(f"{phase} cache:")
            trials = run_direct(cache, args) if args.direct else run_cli(cache, work, args)
            results[phase] = summarise(phase, trials)
    (cold_wall, cold_feat), (warm_wall, warm_feat) = results["cold"], results["warm"]
    print(f"warm/cold mean features time: {warm_feat / cold_feat:.4f}  (target <= 0.1)")
    print(f"warm/cold mean trial time:    {warm_wall / cold_wall:.3f}  (includes training, which the cache does not change)")


if __name__ == "__main__":
    main()
