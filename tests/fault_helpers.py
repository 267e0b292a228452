"""Helpers for the cluster, fault-tolerance and tracking-server tests: run ``orchestrate`` as a
real process, read Tune's results from disk while it runs, and clean up after killed drivers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ORCHESTRATE = [sys.executable, "-m", "orchestrator.cli"]
ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """``orchestrate ARGS`` in its own session (so everything it starts can be found again)."""
    return subprocess.Popen(ORCHESTRATE + args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def results_on_disk(storage: Path) -> dict[str, list[dict]]:
    """Trial id -> every result line Tune wrote, in order (a line being written is skipped)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(storage.glob("*/*/result.json")):
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.setdefault(result["trial_id"], []).append(result)
    return out


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_session(session_id: int) -> None:
    """SIGKILL what is left of a session this test started (Ray's agents outlive a killed driver)."""
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == session_id:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            continue


def finish(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for ``proc``; whatever happens, leave nothing of its session running."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        kill_session(proc.pid)


def trial_runs(tracking_uri: str, family: str) -> list:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    return client.search_runs([exp.experiment_id], "tags.role = 'trial'", max_results=1000) if exp else []


def steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(tracking_uri).get_metric_history(run_id, key))
