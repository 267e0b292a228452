"""A real `mlflow server` (started by `orchestrate server`) that sweeps log to: down at the start
is a clear exit 2; stopped and restarted mid-sweep, the trials go on and every trial's metrics
end up in MLflow once; `orchestrate sync` rebuilds a store from Tune's results, idempotently."""

import json
import os
import signal
import socket
import urllib.request

import pytest
from click.testing import CliRunner
from fault_helpers import finish, results_on_disk, start, steps, trial_runs, wait_for

from orchestrator.cli import main
from orchestrator.study_record import load_records
from orchestrator.sync import SWEEP_META
from trainables.busy_loop import expected_acc

EPOCHS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_server_down_at_start_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["sweep", "busy_loop", "--tracking-uri", url, "--storage", "runs"])
    assert result.exit_code == 2
    assert result.output.strip() == f"Error: MLflow tracking server {url} is not reachable: [Errno 111] Connection refused"
    assert not (tmp_path / "runs").exists()


def check_every_trial_once(uri: str, trial_ids) -> None:
    runs = trial_runs(uri, "busy_loop")
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trial_ids)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert steps(uri, run.info.run_id, "val/busy/acc") == list(range(1, EPOCHS + 1))
        assert steps(uri, run.info.run_id, "test/busy/acc") == [EPOCHS]
        config = {"seed": int(run.data.params["seed"]), "lr": float(run.data.params["lr"])}
        assert run.data.metrics["test/busy/acc"] == pytest.approx(expected_acc(config, EPOCHS))


@pytest.mark.slow
def test_server_restarted_mid_sweep_then_sync_logs_everything_once(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_args = ["server", "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                   "--artifacts-destination", str(tmp_path / "artifacts")]
    storage, log = tmp_path / "runs", tmp_path / "sweep.log"

    server = start(server_args, tmp_path, tmp_path / "server1.log")
    sweep = None
    try:
        wait_for(lambda: healthy(url), 180, "the tracking server", server, tmp_path / "server1.log")
        sweep = start(["sweep", "busy_loop", "--study", "smoke", "--set", f"epochs={EPOCHS}", "--set", "seconds_per_epoch=1.0",
                       "--tracking-uri", url, "--storage", str(storage), "--no-report"],
                      tmp_path, log, ORCHESTRATE_MLFLOW_RETRY_S="2")

        def progress():
            return sum(len(r) for r in results_on_disk(storage).values())

        wait_for(lambda: progress() >= 2, 300, "the first results", sweep, log)
        server.terminate()  # `orchestrate server` stops its whole process group
        assert finish(server, 60) is not None and not healthy(url)
        down_at = progress()
        wait_for(lambda: progress() >= down_at + 2, 120, "results while the server is down", sweep, log)
        # hold the driver while the server boots (tens of seconds on a loaded machine), so the
        # restart lands mid-sweep; its trials wait for it
        assert sweep.poll() is None, "the sweep ended while the server was down"
        os.kill(sweep.pid, signal.SIGSTOP)
        try:
            server = start(server_args, tmp_path, tmp_path / "server2.log")
            wait_for(lambda: healthy(url), 180, "the restarted server", server, tmp_path / "server2.log")
        finally:
            os.kill(sweep.pid, signal.SIGCONT)
        assert finish(sweep, 400) == 0, log.read_text()[-3000:]
        output = log.read_text()
        assert "MLflow unavailable" in output and "MLflow reachable again" in output
        assert "4 trials (0 errored, 0 diverged)" in output

        trial_ids = list(results_on_disk(storage))
        check_every_trial_once(url, trial_ids)  # the callback after the restart and the sweep's final sync
        again = CliRunner().invoke(main, ["sync", "busy_loop", "--storage", str(storage), "--tracking-uri", url])
        assert again.exit_code == 0 and "4 trials; nothing added" in again.output, again.output
    finally:
        server.terminate()
        finish(server, 60)
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            finish(sweep, 30)

    # Tune's results alone rebuild a store that never saw the sweep; a second pass adds nothing
    fresh = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    first = CliRunner().invoke(main, ["sync", "--storage", str(storage), "--tracking-uri", fresh])
    assert first.exit_code == 0 and f"4 trials; 5 runs closed, 5 runs created, {4 * EPOCHS} steps logged" in first.output, first.output
    check_every_trial_once(fresh, trial_ids)
    # and the rebuilt parent holds the record of what the sweep ran (the report reads it, not today's YAML)
    meta = json.loads(next(storage.glob(f"*/{SWEEP_META}")).read_text())
    record = load_records(fresh, "busy_loop", [meta["sweep_id"]]).get(meta["sweep_id"])
    assert record == json.loads(json.dumps(meta["record"])) and record["study"] == "smoke"
    second = CliRunner().invoke(main, ["sync", "--storage", str(storage), "--tracking-uri", fresh])
    assert second.exit_code == 0 and "4 trials; nothing added" in second.output, second.output
