"""Mirror every trial into MLflow from the driver, off Tune's loop.

Tune calls the hooks on its driver loop; they only queue what happened. One writer thread
drains the queue in order and writes with as few requests as it can: the results queued since
its last pass go out as one ``log_batch`` per trial (metrics, node and status tags together), so
the store sees a request per trial per pass instead of several per report, and a slow or dead
tracking server never holds up the trials. The UI still shows each epoch within a pass of it
being reported. ``flush`` (at the experiment's end) waits for the queue to drain.

MLflow failures never stop the sweep: they are warned about, and while the server is unreachable
the writer stays quiet for ``retry_s`` seconds at a time (one failed call per period, not one
per result); what it drops is counted, and :meth:`MlflowCallback.complete` then says the final
sync (or ``orchestrate sync``) must log what is missing.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from mlflow.entities import Metric, RunTag
from ray import tune

from orchestrator.spaces import Study, derive_params
from orchestrator.tracking import (STEP_MARKER, SweepTracker, loggable_metrics, node_tags, result_step,
                                   trial_tags, warn)

MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch


class MlflowCallback(tune.Callback):
    def __init__(self, tracker: SweepTracker, study: Study, retry_s: float = 30.0):
        self.tracker, self.study, self.retry_s = tracker, study, retry_s
        self._reset()

    def _reset(self) -> None:
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._quiet_until = 0.0
        self._down = self._rejected = False
        self.missed = 0  # operations dropped (store down or refusing): the final sync catches up
        self.closed: set[str] = set()  # trials whose run was ended with everything logged
        self.trial_ids: set[str] | None = None  # every trial Tune had at the experiment's end (None: not ended)

    def __getstate__(self) -> dict:
        # Tune pickles its RunConfig (callbacks included) into the experiment; threads do not pickle
        state = dict(self.__dict__)
        state.update(_queue=None, _thread=None)
        return state

    # ------------------------------------------------------------ Tune's hooks: queue only

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put("start", trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        first = result.get("training_iteration") == 1 or result.get("iterations_since_restore") == 1
        tags = node_tags(result) if first else {}
        if result.get("diverged"):
            tags["status"] = "diverged"
        self._put("result", trial, (result_step(result), loggable_metrics(result), tags))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._put("complete", trial, bool((trial.last_result or {}).get("diverged")))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._put("error", trial)

    def on_experiment_end(self, trials, **info):
        self.trial_ids = {t.trial_id for t in trials}
        self.flush()

    def complete(self) -> bool:
        """Whether MLflow holds everything Tune has: every trial's run ended with each of its
        results, and nothing dropped (a final sync would add nothing). Waits for the writer."""
        self.flush()
        return self.missed == 0 and self.trial_ids is not None and self.trial_ids <= self.closed

    def flush(self) -> None:
        if self._queue is not None:
            self._queue.join()

    # ------------------------------------------------------------ the writer thread

    def _put(self, kind: str, trial, payload=None) -> None:
        if self._queue is None:
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
            self._thread.start()
        self._queue.put((kind, trial.trial_id, (trial.config, trial.path), payload))

    def _write_loop(self) -> None:
        while True:
            ops = [self._queue.get()]
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(ops)
            except Exception as exc:  # noqa: BLE001 - never let the writer die: flush would wait forever
                self.missed += 1
                warn(f"MLflow writer: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}; `orchestrate sync` catches up")
            finally:
                for _ in ops:
                    self._queue.task_done()

    def _write(self, ops: list) -> None:
        """Apply ``ops`` in order; a run of consecutive results becomes one batch per trial, and
        a trial's end rides on its last results' batch where they are in the same pass (its
        status tag in that batch: one SQLite transaction less per trial, ~30 ms on the VM)."""
        pending: dict[str, list] = {}
        for kind, trial_id, where, payload in ops:
            if kind == "result":
                pending.setdefault(trial_id, [where]).append(payload)
                continue
            end = {"complete": "diverged" if payload else "finished", "error": "error"}.get(kind)
            tagged = self._write_results(pending, {trial_id: end} if end else {})
            pending = {}
            run_id = self._run_id(trial_id, *where)
            if run_id is None:
                continue
            if kind == "complete":
                self._end(trial_id, run_id, end, "FINISHED", Path(where[1]) / "artifacts", tagged)
            elif kind == "error":
                self._end(trial_id, run_id, end, "FAILED", None, tagged)
        self._write_results(pending)

    def _write_results(self, pending: dict[str, list], status: dict[str, str] | None = None) -> bool:
        """One batch per trial of its queued results; ``status``: trial -> the status tag that
        goes in its batch. True when a status tag went out that way."""
        tagged = False
        for trial_id, (where, *reports) in pending.items():
            run_id = self._run_id(trial_id, *where)
            if run_id is None:
                continue
            metrics, tags, steps = [], {}, []
            now = int(time.time() * 1000)
            for step, values, report_tags in reports:
                tags.update(report_tags)
                if self.tracker.is_logged(run_id, step) or step in steps:
                    continue  # a resumed trial re-reporting a step MLflow has
                values = {k: v for k, v in values.items() if k != STEP_MARKER}
                # the marker last: a step whose marker is in the store was logged whole
                metrics += [Metric(k, v, now, step) for k, v in values.items()] + [Metric(STEP_MARKER, float(step), now, step)]
                steps.append(step)
            if status and trial_id in status:
                tags["status"] = status[trial_id]
            if self._batches(run_id, metrics, [RunTag(k, str(v)) for k, v in tags.items()]):
                self.tracker.mark_logged(run_id, max(steps, default=0))
                self.tracker.stats["steps_logged"] += len(steps)
                tagged |= bool(status and trial_id in status)
        return tagged

    def _batches(self, run_id: str, metrics: list, tags: list) -> bool:
        for start in range(0, max(len(metrics), 1), MAX_BATCH):
            chunk = metrics[start:start + MAX_BATCH]
            if (chunk or tags) and self._safe(self.tracker.client.log_batch, run_id, chunk, (), tags if start == 0 else ()) is None:
                return False
        return True

    def _end(self, trial_id: str, run_id: str, status: str, run_status: str, artifacts: Path | None,
             tagged: bool = False) -> None:
        ok = tagged or self._safe(self.tracker.set_tags, run_id, {"status": status}) is not None
        if artifacts is not None and artifacts.is_dir() and any(artifacts.iterdir()):
            ok &= self._safe(self.tracker.log_artifacts, run_id, artifacts, "artifacts") is not None
        ok &= self._safe(self.tracker.finish, run_id, run_status) is not None
        if ok:
            self.closed.add(trial_id)

    def _run_id(self, trial_id: str, config: dict, path: str) -> str | None:
        run_id = self.tracker.known_run(trial_id)
        if run_id is not None:
            return run_id
        config = derive_params(config, self.study.derive)
        return self._safe(self.tracker.child, trial_id, config, trial_tags(config, path))

    def _safe(self, fn, *args):
        """``fn(*args)`` (one or a few requests to the store); True-ish on success, None on a
        failure or in a quiet period (counted in ``missed``)."""
        if time.monotonic() < self._quiet_until:
            self.missed += 1
            return None
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the tracking store is best effort during a sweep
            from mlflow.exceptions import RestException

            self.missed += 1
            what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if isinstance(exc, RestException):  # the server answered: a refused request, not an outage
                if not self._rejected:
                    warn(f"MLflow refused a request ({what}); `orchestrate sync` logs what is missing")
                    self._rejected = True
                return None
            self._quiet_until = time.monotonic() + self.retry_s
            if not self._down:
                warn(f"MLflow unavailable ({what}); trials go on, what is missed is logged at the end "
                     "or by `orchestrate sync`")
                self._down = True
            return None
        if self._down:
            warn("MLflow reachable again")
            self._down = False
        return True if out is None else out
