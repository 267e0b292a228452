"""``orchestrate server``: a real MLflow tracking server for sweeps to log to.

Kept out of ``orchestrator.tracking`` so starting it does not import MLflow twice (the server
process imports it anyway).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.errors import UsageError


def backend_store(uri: str | None) -> str:
    """The run store to serve: the one given, a local ``$MLFLOW_TRACKING_URI``, or the
    ``./mlflow.db`` the embedded sweeps write (so their runs stay visible)."""
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    uri = uri or (env_uri if env_uri.startswith("sqlite:") else f"sqlite:///{Path('mlflow.db').resolve()}")
    if uri.startswith("http"):
        raise UsageError(f"{uri} is a tracking server already; give the server a store (sqlite:///PATH)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise UsageError(f"no directory for the MLflow store {uri}")
    return uri


def serve(host: str, port: int, backend_uri: str, artifacts: Path, workers: int = 1) -> int:
    """Run a real ``mlflow server`` until it exits or this process is told to stop.

    It runs in its own process group, stopped as a whole: ``mlflow server`` leaves its uvicorn
    workers behind when only it is signalled. Job execution (MLflow's GenAI job runner, a dozen
    extra processes) is off: sweeps need only tracking and artifacts."""
    with socket.socket() as probe:
        if probe.connect_ex((host, port)) == 0:
            raise UsageError(f"{host}:{port} is already in use")
    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", str(workers),
               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(command, env=env, start_new_session=True)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop_group(server)


def _stop_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + grace_s  # the leader is gone; give its workers the same grace
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
