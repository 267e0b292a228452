"""What the benchmarks share: a study file of one's own, a timed ``orchestrate sweep`` through
the real CLI, the trial runs it left in MLflow, and small tables. Imports only the standard
library at the top (gpu_check.py runs where Ray, MLflow and PyYAML may be missing)."""

from __future__ import annotations

import os
import statistics
import subprocess
from dataclasses import dataclass
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine_line() -> str:
    """What the figures were measured on, load included (this machine is often shared)."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {os.uname().nodename}, {os.cpu_count()} CPUs, load average {load}"


def write_spaces(work: Path, family: str, studies: dict, drop_eval: bool = False) -> Path:
    """A spaces directory (for ``ORCHESTRATE_SPACES_DIR``) holding the shipped ``family.yaml``
    with its studies replaced by ``studies`` (its claims and report settings, which name the
    shipped studies, dropped); ``drop_eval`` also removes the file-wide eval axes, so a study
    without ``eval`` gives its trials none (the family's own defaults apply)."""
    import yaml  # not at the top: gpu_check.py imports this module where PyYAML may be missing

    doc = yaml.safe_load((ROOT / "search_spaces" / f"{family}.yaml").read_text())
    if drop_eval:
        doc.pop("eval", None)
    doc["studies"] = studies
    for key in ("claims", "report"):  # they name the shipped studies; bench sweeps write no report
        doc.pop(key, None)
    doc["default_study"] = next(iter(studies))
    spaces = work / "spaces"
    spaces.mkdir(parents=True, exist_ok=True)
    (spaces / f"{family}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return spaces


@dataclass
class Measured:
    """One process run by :func:`run_measured`: its wall time, output and exit code, and its own
    memory (not Ray's processes or the workers'): the kernel's high-water mark (``VmHWM``) and
    (epoch seconds, resident MiB) samples every 0.2 s while it ran."""

    wall: float
    output: str
    code: int
    peak_mib: float
    rss: list[tuple[float, float]]

    def rss_at(self, when: float) -> float | None:
        """The resident MiB sampled last before ``when`` (epoch seconds); None before any sample."""
        before = [mib for t, mib in self.rss if t <= when]
        return before[-1] if before else None


def run_measured(cmd: list[str], cwd: Path, env: dict | None = None) -> Measured:
    """Run ``cmd`` to its end, sampling its memory from ``/proc`` (Linux)."""
    began = time.perf_counter()
    peak, rss = 0.0, []
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            status = _memory_mib(proc.pid)
            if status:
                peak = max(peak, status["VmHWM"])
                rss.append((time.time(), status["VmRSS"]))
            time.sleep(0.2)
        wall = time.perf_counter() - began
        out.seek(0)
        return Measured(wall, out.read(), proc.returncode, peak, rss)


def _memory_mib(pid: int) -> dict[str, float]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # exited between poll and read
        return {}
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("VmHWM:", "VmRSS:")))
    return {k: int(v.split()[0]) / 1024 for k, v in fields.items()} if len(fields) == 2 else {}


def sweep_measured(family: str, study: str, spaces: Path, work: Path, cpus_per_trial: float,
                   extra: tuple[str, ...] = ()) -> tuple[float, str, Measured]:
    """Run ``orchestrate sweep`` in a fresh process (``--address local``: a Ray of its own, started
    and stopped inside it, never another session's cluster; MLflow in a SQLite store under
    ``work``); returns (wall seconds, tracking URI, the driver process's :class:`Measured`). A failed sweep
    raises with the end of its output. ``cpus_per_trial`` sets how many trials run at once (as
    many as fit in the CPUs)."""
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", family, "--study", study, "--storage", str(work / "runs"),
           "--tracking-uri", uri, "--cpus-per-trial", str(cpus_per_trial), "--no-report", "--address", "local", *extra]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "ORCHESTRATE_SPACES_DIR": str(spaces)}
    run = run_measured(cmd, work, env)
    (work / "sweep.log").write_text(run.output)
    if run.code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {run.code}):\n{run.output[-3000:]}")
    return run.wall, uri, run


def sweep(family: str, study: str, spaces: Path, work: Path, cpus_per_trial: float, extra: tuple[str, ...] = ()) -> tuple[float, str]:
    """:func:`sweep_measured` without the memory figure: (wall seconds, tracking URI)."""
    wall, uri, _ = sweep_measured(family, study, spaces, work, cpus_per_trial, extra)
    return wall, uri


def store_mib(work: Path) -> float:
    """Size of the MLflow store a bench sweep left under ``work`` (database and artifacts)."""
    paths = [work / "mlflow.db", *(work / "mlartifacts").rglob("*")]
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def trial_runs(uri: str, family: str) -> list[dict]:
    """Every trial run in the store: ``{"params", "metrics" (final values), "seconds" (run start to
    end), "start", "end" (epoch seconds)}``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(family)
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.role = 'trial'", max_results=10_000)
    return [{"params": run.data.params, "metrics": run.data.metrics,
             "seconds": (run.info.end_time - run.info.start_time) / 1000,
             "start": run.info.start_time / 1000, "end": run.info.end_time / 1000} for run in runs]


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
