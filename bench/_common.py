"""What the benchmarks share: a study file of one's own, a timed ``orchestrate sweep`` through
the real CLI, the trial runs it left in MLflow, and small tables. Imports only the standard
library at the top (gpu_check.py runs where Ray, MLflow and PyYAML may be missing)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_line() -> str:
    """What the figures were measured on, load included (this machine is often shared)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs, load average {load}"


def write_spaces(work: Path, family: str, studies: dict, drop_eval: bool = False) -> Path:
    """A spaces directory (for ``ORCHESTRATE_SPACES_DIR``) holding the shipped ``family.yaml``
    with its studies replaced by ``studies``; ``drop_eval`` also removes the file-wide eval axes,
    so a study without ``eval`` gives its trials none (the family's own defaults apply)."""
    import yaml  # not at the top: gpu_check.py imports this module where PyYAML may be missing

    doc = yaml.safe_load((ROOT / "search_spaces" / f"{family}.yaml").read_text())
    if drop_eval:
        doc.pop("eval", None)
    doc["studies"] = studies
    doc["default_study"] = next(iter(studies))
    spaces = work / "spaces"
    spaces.mkdir(parents=True, exist_ok=True)
    (spaces / f"{family}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return spaces


def sweep(family: str, study: str, spaces: Path, work: Path, cpus_per_trial: float, extra: tuple[str, ...] = ()) -> tuple[float, str]:
    """Run ``orchestrate sweep`` in a fresh process (``--address local``: a Ray of its own, started
    and stopped inside it, never another session's cluster; MLflow in a SQLite store under
    ``work``); returns (wall seconds, tracking URI). A failed sweep raises with the end of its
    output. ``cpus_per_trial`` sets how many trials run at once (as many as fit in the CPUs): Ray
    2.60's Tune ignores ``--max-concurrent`` for grid studies (see bench/README.md)."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", family, "--study", study, "--storage", str(work / "runs"),
           "--tracking-uri", uri, "--cpus-per-trial", str(cpus_per_trial), "--no-report", "--address", "local", *extra]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "ORCHESTRATE_SPACES_DIR": str(spaces)}
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    (work / "sweep.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return wall, uri


def trial_runs(uri: str, family: str) -> list[dict]:
    """Every trial run in the store: ``{"params", "metrics" (final values), "seconds" (run start to end)}``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(family)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'trial'", max_results=10_000)
    return [{"params": run.data.params, "metrics": run.data.metrics,
             "seconds": (run.info.end_time - run.info.start_time) / 1000} for run in runs]


def min_median(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table(headers: list[str], rows: list[list]) -> str:
    """A plain fixed-width table; floats with 3 significant decimals unless already strings."""
    cells = [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"
