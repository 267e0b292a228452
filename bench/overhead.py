"""Orchestration overhead: N trials of a fixed CPU kernel (the ``busy_loop`` family: each epoch
burns a set number of wall-clock seconds in matrix products) through ``orchestrate sweep``
(Ray Tune + MLflow, per-epoch reports and checkpoints) against two baselines in the same run,
with the same configs and parallelism: plain Ray Tune (bench/plain_tune.py: a function
trainable, per-epoch ``tune.report`` with a checkpoint, ``reuse_actors`` off and on, the faster
counted) and a ``concurrent.futures`` process pool (the kernels alone).

Both Tune runs are fresh processes timed from start to exit (imports, ``ray.init``, shutdown),
so project / plain Tune is what the project adds on top of Tune. Cases:

- default: 1-s and 30-s trials (10 epochs x 3 s), 8 trials each, 2 repeats, min / median;
- ``--many``: 200 trials of 0.2 s, sweep vs plain Tune: trials/s, the driver's peak RSS, the
  MLflow store's size;
- ``--trivial N``: N trials of nothing (0-s epochs) through the sweep and through plain Tune,
  with the time of each block of 100 and each driver's resident memory at the block's end:
  flat blocks mean the per-trial cost does not grow with the sweep, and plain Tune's memory
  column is what Ray and Tune hold by themselves;
- ``--smoke``: the commands as a user types them, each in a fresh empty folder, timed from
  process start to exit: ``orchestrate --help`` and ``orchestrate sweep busy_loop --study
  smoke`` (4 trials of 3 x 0.2-s epochs, 2 at once, a new SQLite store, the report).

    python bench/overhead.py --quick     # 4 trials: 0.5-s and 5-s kernels, once (~3 min)
    python bench/overhead.py             # the 1-s and 30-s cases (~20 min)
    python bench/overhead.py --many      # 200 x 0.2-s trials (~10 min)
    python bench/overhead.py --trivial 1000
    python bench/overhead.py --smoke     # --help and the no-op smoke sweep, 3 repeats (~2 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (ROOT, machine_line, min_median, run_measured, store_mib, sweep_measured,  # noqa: E402
                           table, trial_runs, verdict, write_spaces)
from trainables import busy_loop  # noqa: E402

FAMILY = "busy_loop"
TARGETS = {"1-s": 1.3, "30-s": 1.05, "many": 1.5}  # project / plain Tune (issue 13)
SMOKE_TARGETS = {"help": 1.0, "smoke sweep": 15.0}  # wall seconds on 2 cores (issue 13)


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


def tune_run(work: Path, trials: int, epochs: int, seconds: float, workers: int, reuse: bool) -> dict:
    """Plain Ray Tune running the same trials: wall, driver peak RSS, the trials' end times
    (seconds from the first trial's start, as :func:`sweep_run`'s) and the driver's resident MiB at each."""
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "bench" / "plain_tune.py"), "--trials", str(trials), "--epochs", str(epochs),
           "--seconds", str(seconds), "--cpus-per-trial", str(os.cpu_count() / workers), "--storage", str(work / "runs"),
           *(["--reuse"] if reuse else [])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = run_measured(cmd, work, env)
    lines = [line for line in run.output.splitlines() if line.startswith("{")]
    # the driver's stdout and its Ray workers' logs share one file: text can follow the JSON on its line
    reported = json.JSONDecoder().raw_decode(lines[-1])[0] if lines else {}
    if run.code != 0 or reported.get("trials") != trials:
        raise RuntimeError(f"plain Tune run failed (exit {run.code}):\n{run.output[-3000:]}")
    ends, began = sorted(reported["ends"]), min(reported["starts"], default=0.0)
    return {"wall": run.wall, "peak_mib": run.peak_mib, "ends": [end - began for end in ends],
            "rss": [run.rss_at(end) for end in ends]}


def sweep_run(work: Path, trials: int, epochs: int, seconds_per_epoch: float, workers: int) -> dict:
    """The same trials through ``orchestrate sweep``: wall, seconds inside trials, driver peak
    RSS, store size, the trials' MLflow end times (seconds from the first start) and the
    driver's resident MiB at each of them."""
    studies = {"bench": {"description": "fixed kernels for the overhead benchmark", "seeds": trials,
                         "set": {"epochs": epochs, "seconds_per_epoch": seconds_per_epoch}}}
    spaces = write_spaces(work, FAMILY, studies, drop_eval=True)
    wall, uri, driver = sweep_measured(FAMILY, "bench", spaces, work, os.cpu_count() / workers)
    runs = trial_runs(uri, FAMILY)
    if len(runs) != trials:
        raise RuntimeError(f"sweep logged {len(runs)} trial runs, expected {trials}")
    first, ends = min(run["start"] for run in runs), sorted(run["end"] for run in runs)
    return {"wall": wall, "inside": sum(run["seconds"] for run in runs), "peak_mib": driver.peak_mib,
            "store_mib": store_mib(work), "ends": [end - first for end in ends], "rss": [driver.rss_at(end) for end in ends]}


def ratio_line(name: str, ratio: float) -> str:
    target = TARGETS.get(name)
    met = f" (target <= {target}: {verdict(ratio <= target)})" if target else " (quick mode: no target)"
    return f"ratio project / plain Tune, {name} trials: {ratio:.2f}{met}"


def compare(args, tmp: Path) -> None:
    """The 1-s and 30-s cases (quick: 0.5-s and 5-s): pool, plain Tune (reuse off / on), sweep."""
    trials = args.trials or (4 if args.quick else 8)
    repeats = args.repeats or (1 if args.quick else 2)
    cases = [("0.5-s", 1, 0.5), ("5-s", 5, 1.0)] if args.quick else [("1-s", 1, 1.0), ("30-s", 10, 3.0)]
    cases = [case for case in cases if not args.case or case[0] in args.case]
    print(f"{FAMILY}: {trials} trials per case, {args.workers} at once, {repeats} repeat(s)")
    print(machine_line())
    rows, ratios = [], {}
    for name, epochs, seconds in cases:
        configs = trial_configs(trials, epochs, seconds)
        pools, tunes, tunes_off, tunes_on, sweeps, inside = [], [], [], [], [], []
        for rep in range(repeats):
            pools.append(pool_wall(configs, args.workers))
            tunes_off.append(tune_run(tmp / f"{name}-{rep}-tune-off", trials, epochs, seconds, args.workers, False)["wall"])
            tunes_on.append(tune_run(tmp / f"{name}-{rep}-tune-on", trials, epochs, seconds, args.workers, True)["wall"])
            tunes.append(min(tunes_off[-1], tunes_on[-1]))
            run = sweep_run(tmp / f"{name}-{rep}", trials, epochs, seconds, args.workers)
            sweeps.append(run["wall"])
            inside.append(run["inside"])
            print(f"  {name} trials, repeat {rep + 1}: pool {pools[-1]:.1f} s, plain Tune {tunes_off[-1]:.1f} s "
                  f"(reuse off) / {tunes_on[-1]:.1f} s (on), sweep {sweeps[-1]:.1f} s", flush=True)
        ratios[name] = statistics.median(s / t for s, t in zip(sweeps, tunes))
        rows.append([name, min_median(pools), min_median(tunes_off), min_median(tunes_on), min_median(sweeps),
                     min_median([(s - t) / trials for s, t in zip(sweeps, tunes)]),
                     min_median([100 * (s - p) / s for s, p in zip(sweeps, pools)]),
                     min_median([s / t for s, t in zip(sweeps, tunes)]),
                     min_median([(i - trials * epochs * seconds) / trials for i in inside])])
    print()
    print("figures: min / median over repeats")
    print(table(["trial", "pool s", "Tune s (reuse off)", "Tune s (reuse on)", "sweep s", "over Tune s / trial",
                 "over pool % of sweep", "sweep / Tune", "in-trial extra s / trial"], rows))
    print("  Tune = plain Ray Tune, the faster of reuse_actors off and on; over pool = sweep wall - pool wall;"
          " in-trial extra = a trial's MLflow run time beyond its kernel")
    for name, _, _ in cases:
        print(ratio_line(name if not args.quick else f"{name} (quick)", ratios[name]))


def many(args, tmp: Path) -> None:
    """200 short trials (``--trials``) through the sweep and plain Tune (reuse on: its faster mode)."""
    trials, seconds = args.trials or 200, 0.2
    print(f"{FAMILY} many: {trials} trials of {seconds} s, {args.workers} at once")
    print(machine_line())
    tune = tune_run(tmp / "many-tune", trials, 1, seconds, args.workers, True)
    tune_s, tune_peak = tune["wall"], tune["peak_mib"]
    run = sweep_run(tmp / "many", trials, 1, seconds, args.workers)
    rows = [["plain Tune", tune_s, trials / tune_s, tune_peak, "—"],
            ["orchestrate sweep", run["wall"], trials / run["wall"], run["peak_mib"], run["store_mib"]]]
    print(table(["run", "wall s", "trials / s", "driver peak RSS MiB", "MLflow store MiB"], rows))
    print(ratio_line("many" if trials == 200 else f"many ({trials})", run["wall"] / tune_s))


def block_times(ends: list[float], block: int) -> list[float]:
    """Seconds each full block of ``block`` trials took, from sorted trial end times (seconds
    from the first trial's start): block i runs from the (i*block)-th end to the ((i+1)*block)-th."""
    edges = [0.0] + [ends[i - 1] for i in range(block, len(ends) + 1, block)]
    return [b - a for a, b in zip(edges, edges[1:])]


def trivial(args, tmp: Path) -> None:
    """N trials that do nothing, through the sweep and through plain Tune (reuse on); the time of
    each block of ``--block`` trials and each driver's resident memory as the block ended: plain
    Tune's column is what Ray and Tune themselves hold, the sweep's what the project adds to it."""
    trials, block = args.trivial, args.block
    print(f"{FAMILY} trivial: {trials} trials of 0 s, {args.workers} at once, blocks of {block}")
    print(machine_line())
    runs = {"sweep": sweep_run(tmp / "trivial", trials, 1, 0.0, args.workers),
            "plain Tune": tune_run(tmp / "trivial-tune", trials, 1, 0.0, args.workers, True)}
    blocks = {name: block_times(run["ends"], block) for name, run in runs.items()}
    # each driver's resident MiB as the block's last trial ended
    rss = {name: [run["rss"][(i + 1) * block - 1] for i in range(len(blocks[name]))] for name, run in runs.items()}
    mib = lambda m: "—" if m is None else f"{m:.0f}"  # noqa: E731
    rows = [[f"{i * block + 1}-{(i + 1) * block}", blocks["sweep"][i], mib(rss["sweep"][i]),
             blocks["plain Tune"][i], mib(rss["plain Tune"][i])] for i in range(len(blocks["sweep"]))]
    print(table(["trials", "sweep block s", "sweep driver RSS MiB", "plain Tune block s", "plain Tune driver RSS MiB"], rows))
    for name, run in runs.items():
        store = f", MLflow store {run['store_mib']:.1f} MiB" if "store_mib" in run else ""
        print(f"{name}: wall {run['wall']:.1f} s, driver peak RSS {run['peak_mib']:.0f} MiB{store}")
        if len(blocks[name]) > 2:
            later, first = statistics.median(blocks[name][1:]), blocks[name][0]
            print(f"  later blocks / first block (median): {later / first:.2f}; last / first: "
                  f"{blocks[name][-1] / first:.2f} (flat: about 1)")
        grown = [m for m in rss[name] if m is not None]
        if len(grown) > 1:
            print(f"  driver RSS, first block's end to last's: {grown[0]:.0f} -> {grown[-1]:.0f} MiB "
                  f"(+{(grown[-1] - grown[0]) * 1024 / (trials - block):.1f} KiB a trial)")


def smoke(args, tmp: Path) -> None:
    """``orchestrate --help`` and the smoke study as typed, each repeat in a fresh empty folder."""
    repeats = args.repeats or 3
    commands = {"help": ["--help"], "smoke sweep": ["sweep", FAMILY, "--study", "smoke"]}
    print(f"{FAMILY} smoke: {', '.join(' '.join(['orchestrate', *c]) for c in commands.values())}; {repeats} repeats")
    print(machine_line())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ORCHESTRATE_SPACES_DIR")}
    walls: dict[str, list[float]] = {name: [] for name in commands}
    for rep in range(repeats):
        for name, words in commands.items():
            work = tmp / f"smoke-{rep}-{name.replace(' ', '-')}"
            work.mkdir()
            run = run_measured([sys.executable, "-m", "orchestrator.cli", *words], work, env)
            if run.code != 0:
                raise RuntimeError(f"orchestrate {' '.join(words)} failed (exit {run.code}):\n{run.output[-3000:]}")
            walls[name].append(run.wall)
        print(f"  repeat {rep + 1}: " + ", ".join(f"{name} {w[-1]:.2f} s" for name, w in walls.items()), flush=True)
    print(table(["command", "wall s (min / median)"], [[name, min_median(w)] for name, w in walls.items()]))
    for name, target in SMOKE_TARGETS.items():
        median = statistics.median(walls[name])
        print(f"{name}: median {median:.2f} s (target < {target:g} s: {verdict(median < target)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trials of 0.5-s and 5-s kernels, once")
    parser.add_argument("--many", action="store_true", help="200 trials of 0.2 s: sweep vs plain Tune")
    parser.add_argument("--trivial", type=int, metavar="N", help="N trials of nothing through the sweep")
    parser.add_argument("--block", type=int, default=100, help="trials per timed block of --trivial (default 100)")
    parser.add_argument("--case", action="append", choices=["1-s", "30-s", "0.5-s", "5-s"],
                        help="run only this case of the default comparison (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="orchestrate --help and the smoke sweep, as typed")
    parser.add_argument("--trials", type=int, help="trials per case (default 8; quick 4; many 200)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="trials at once, every way (default: CPUs)")
    parser.add_argument("--repeats", type=int, help="runs of each case (default 2; quick 1; smoke 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmp:
        if args.trivial:
            trivial(args, Path(tmp))
        elif args.many:
            many(args, Path(tmp))
        elif args.smoke:
            smoke(args, Path(tmp))
        else:
            compare(args, Path(tmp))


if __name__ == "__main__":
    main()
