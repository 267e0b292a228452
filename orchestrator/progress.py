"""What a researcher sees while a sweep runs: one progress line and one line per finished trial.

``LiveView`` is a Tune callback on the driver. On a terminal it keeps a tqdm bar at the bottom
(trials done / running / pending / errored, elapsed, ETA, the best cell so far) and writes a
line above it for every finished trial; errors go to stderr in full. Anywhere else (CI logs,
a file) it writes plain lines only: no carriage returns or colour codes, the progress line at
most every ``interval_s`` seconds when something changed and every ``heartbeat_s`` otherwise.
With ``-v`` Tune's own tables and per-trial boxes come on top, and the bar becomes plain lines.

``console`` quiets the libraries' own chatter for the length of a sweep without ``-v``, and
``interruptions`` turns SIGTERM into the same graceful stop as Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from ray import tune
from tqdm import tqdm

from orchestrator.spaces import Study

FINISHED_STATES = ("TERMINATED", "ERROR")
# Tune's own words on an interrupted run: a pointer to Tuner.restore(), the unfinished trials'
# reprs, and a warning per results grid that trials which never started have no results.
# The summary names those trials and prints the orchestrate --resume command instead, so
# without -v these are dropped (by logger, as filters do not reach child loggers).
TUNE_INTERRUPT_NOISE = {"ray.tune.tune": ("Experiment has been interrupted", "Trials did not complete"),
                        "ray.tune.analysis.experiment_analysis": ("Failed to fetch metrics for",)}
# Without -v: Tune's new output engine prints an experiment box even at verbose=0 (its legacy
# one is silent there), and MLflow draws a progress bar for every artifact download.
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
# Quiet without -v: MLflow's and Ray's info logs, and Ray's start-up note that the local
# cluster it starts uses token authentication (its default; nothing to act on).
QUIET_LOGGERS = {"mlflow": logging.WARNING, "ray": logging.WARNING,
                 "ray._private.authentication.authentication_token_setup": logging.ERROR}


def fmt_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def cell_label(config: dict, keys: list[str]) -> str:
    """The cell of a trial: the values of what the study varies, seed aside."""
    return " ".join(f"{k}={fmt_value(config.get(k))}" for k in keys) or "defaults"


def trial_label(config: dict, keys: list[str]) -> str:
    return f"{cell_label(config, keys)} seed={config.get('seed')}"


def group_by_cell(labels: list[tuple[str, int]]) -> list[str]:
    """``[(cell, seed), ...]`` -> ``["cell: seeds 0, 1", ...]`` in first-seen order."""
    seeds: dict[str, list] = defaultdict(list)
    for cell, seed in labels:
        seeds[cell].append(seed)
    return [f"{cell}: seed{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))}" for cell, s in seeds.items()]


class _Discard:
    """A file for the bar when it is not drawn: tqdm keeps the counts and clocks, we print."""

    def write(self, _text):
        pass

    def flush(self):
        pass


class LiveView(tune.Callback):
    """The live view of one sweep (see the module docstring).

    Trial states are the ones Tune saved for --resume: taken at each step and from the
    complete/error hooks, never from ``on_experiment_end``, because on an interrupted run
    Tune stops (and marks TERMINATED) the running and pending trials before calling it."""

    def __init__(self, study: Study, stream=None, err=None, verbose: int = 0,
                 interval_s: float = 10.0, heartbeat_s: float = 60.0):
        self.study = study
        self.stream = stream or sys.stdout
        self.err = err or sys.stderr
        self.keys = sorted(study.grid) + sorted(study.space)
        self.metric, self.mode = study.objective["metric"], study.objective["mode"]
        self.total = study.num_trials
        # Tune's tables would tear a redrawn bar apart, so with -v the view writes lines only.
        self.draw = self._isatty(self.stream) and not verbose
        self.interval_s, self.heartbeat_s = interval_s, heartbeat_s
        self.bar: tqdm | None = None
        self._last_line, self._last_state = 0.0, None
        self._forget_trials()

    def _forget_trials(self) -> None:
        """The per-trial bookkeeping, kept up to date per event so a step costs the same at the
        1,000th trial as at the first (a rescan of every trial per step made 400 trivial trials
        spend 11.8 s of the driver's time here, growing with the square of the trial count)."""
        self.trials: dict[str, object] = {}  # trial id -> Tune's Trial, in order of appearance
        self.status: dict[str, str] = {}  # trial id -> its state as of the last step
        self._listed = 0  # how many of Tune's (append-only) trial list have been seen
        self._open: dict[str, object] = {}  # trials not yet TERMINATED or ERROR: the ones a step rechecks
        self._counts: Counter = Counter()  # state -> trials in it
        self._scores: dict[str, tuple[str, float]] = {}  # finished, non-diverged trial -> (cell, objective)
        self._cells: dict[str, list[float]] = {}  # cell -> [sum, count] of those objectives
        self._best: tuple[str, float, int] | None = None
        self._best_stale = False

    def __getstate__(self):
        """Tune pickles its callbacks with the experiment; streams, the bar and trials stay
        behind (a resumed sweep gets a fresh view)."""
        trial_state = ("trials", "status", "_listed", "_open", "_counts", "_scores", "_cells", "_best", "_best_stale")
        return {k: v for k, v in self.__dict__.items() if k not in ("stream", "err", "bar", *trial_state)}

    def __setstate__(self, state):
        self.__dict__.update(state, stream=sys.stdout, err=sys.stderr, bar=None)
        self._forget_trials()

    @staticmethod
    def _isatty(stream) -> bool:
        return bool(getattr(stream, "isatty", lambda: False)())

    # ------------------------------------------------------------ Tune callback hooks

    def setup(self, **info):
        bar_format = ("{desc}{percentage:3.0f}%|{bar:16}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
                      if self.draw else "{desc}{n_fmt}/{total_fmt} trials done [{elapsed} elapsed, ETA {remaining}]{postfix}")
        # smoothing=0: the ETA uses the average rate since the start; trials end in bursts.
        self.bar = tqdm(total=self.total, desc=f"{self.study.family}/{self.study.name} ", file=self.stream if self.draw
                        else _Discard(), bar_format=bar_format, smoothing=0, mininterval=0.5, dynamic_ncols=True)

    def on_step_end(self, iteration, trials, **info):
        self._see(trials)
        self._update()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._see(trials, trial, "TERMINATED")
        result = trial.last_result or {}
        if result.get("diverged"):
            outcome = f"diverged at epoch {result.get('epoch', '?')}"
        else:
            value = result.get(self.metric)
            outcome = f"{self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"{self.metric} not reported"
        self._line(f"{self._count()} {trial_label(trial.config, self.keys)}: {outcome} in {self._wall(trial)}")
        self._update()

    def on_trial_error(self, iteration, trials, trial, **info):
        self._see(trials, trial, "ERROR")
        self._line(f"{self._count()} {trial_label(trial.config, self.keys)}: ERROR {self._failure(trial)}", err=True)
        self._update()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._line(f"warning: {trial_label(trial.config, self.keys)} failed (trial {trial.trial_id}, traceback above); "
                   "retrying from its last checkpoint", err=True)

    def on_experiment_end(self, trials, **info):
        for trial in trials:  # only trials never seen in a step; see the class docstring
            if trial.trial_id not in self.trials:
                self._add(trial)
        self._update(force=True)
        if self.bar is not None:
            self.bar.close()

    # ------------------------------------------------------------ what the runner and summary need

    def _labels(self, finished: bool) -> list[tuple[str, int]]:
        return [(cell_label(t.config, self.keys), t.config.get("seed")) for tid, t in self.trials.items()
                if (self.status[tid] in FINISHED_STATES) == finished]

    def finished(self) -> list[tuple[str, int]]:
        return self._labels(True)

    def unfinished(self) -> list[tuple[str, int]]:
        return self._labels(False)

    def unfinished_ids(self) -> list[str]:
        return [tid for tid, status in self.status.items() if status not in FINISHED_STATES]

    def not_created(self) -> int:
        """Trials the searcher had not generated yet when the sweep ended."""
        return max(self.total - len(self.trials), 0)

    def best(self) -> tuple[str, float, int] | None:
        """The best cell so far by the objective's mean over its finished, non-diverged seeds."""
        if self._best_stale:
            pick = max if self.mode == "max" else min
            cell = pick(self._cells, key=lambda c: self._cells[c][0] / self._cells[c][1]) if self._cells else None
            self._best = None if cell is None else (cell, self._cells[cell][0] / self._cells[cell][1], self._cells[cell][1])
            self._best_stale = False
        return self._best

    # ------------------------------------------------------------ bookkeeping

    def _add(self, trial) -> None:
        self.trials[trial.trial_id] = trial
        self._set_status(trial, trial.status)

    def _set_status(self, trial, status: str) -> None:
        """Move one trial to ``status``: the counts, the open set and the best-cell sums follow."""
        tid = trial.trial_id
        old = self.status.get(tid)
        if old == status:
            return
        if old is not None:
            self._counts[old] -= 1
        self._counts[status] += 1
        self.status[tid] = status
        if status in FINISHED_STATES:
            self._open.pop(tid, None)
        else:
            self._open[tid] = trial
        if tid in self._scores:  # left TERMINATED (not seen in practice; kept exact regardless)
            self._score(*self._scores.pop(tid), sign=-1)
        result = trial.last_result or {}
        value = result.get(self.metric)
        if status == "TERMINATED" and not result.get("diverged") and isinstance(value, (int, float)):
            self._scores[tid] = (cell_label(trial.config, self.keys), float(value))
            self._score(*self._scores[tid], sign=1)

    def _score(self, cell: str, value: float, sign: int) -> None:
        total = self._cells.setdefault(cell, [0.0, 0])
        total[0] += sign * value
        total[1] += sign
        if not total[1]:
            del self._cells[cell]
        self._best_stale = True

    # ------------------------------------------------------------ output

    def _see(self, trials, trial=None, status: str | None = None) -> None:
        """Take in trials new to Tune's list and the states of those not finished yet (a
        finished trial's state is final within a run)."""
        for t in trials[self._listed:]:
            if t.trial_id not in self.trials:
                self._add(t)
        self._listed = max(self._listed, len(trials))
        for t in list(self._open.values()):
            self._set_status(t, t.status)
        if trial is not None:  # Tune sets the state itself after the callbacks have run
            self.trials.setdefault(trial.trial_id, trial)
            self._set_status(trial, status)

    def _count(self) -> str:
        done = sum(self._counts[s] for s in FINISHED_STATES)
        return f"[{done:>{len(str(self.total))}}/{self.total}]"

    @staticmethod
    def _failure(trial) -> str:
        """The exception's last line: Tune has just logged its traceback in full ("Trial task
        failed"), and keeps every failure's in the trial's error.txt."""
        local = getattr(trial, "error_file", None)  # written now; the copy in storage is synced later
        text = Path(local).read_text() if local and Path(local).is_file() else (trial.get_error() or "")
        lines = text.strip().splitlines()
        return (f"{lines[-1] if lines else 'no error text saved'} (trial {trial.trial_id}; traceback above, "
                f"every attempt's in {trial.path}/error.txt)")

    @staticmethod
    def _wall(trial) -> str:
        seconds = (trial.last_result or {}).get("time_total_s")
        if not isinstance(seconds, (int, float)):
            return "?"
        return f"{seconds:.1f} s" if seconds < 60 else tqdm.format_interval(seconds)

    def _state(self) -> tuple[int, int, int, int]:
        counts = self._counts
        pending = counts["PENDING"] + counts["PAUSED"] + self.not_created()
        return counts["TERMINATED"], counts["RUNNING"], pending, counts["ERROR"]

    def _update(self, force: bool = False) -> None:
        if self.bar is None:
            return
        done, running, pending, errored = state = self._state()
        best = self.best()
        best_text = (f"; best {self.metric} {best[1]:.4f} at {best[0]} (n={best[2]})" if best else "")
        self.bar.set_postfix_str(f"{running} running, {pending} pending, {errored} errored{best_text}", refresh=False)
        self.bar.update(done + errored - self.bar.n)
        now = time.monotonic()
        since = now - self._last_line
        if self.draw:  # redrawn in place; once a second keeps the elapsed time and ETA moving
            if force or since >= 1.0:
                self.bar.refresh()
                self._last_line = now
            return
        changed = state != self._last_state
        if (force and changed) or (changed and since >= self.interval_s) or since >= self.heartbeat_s:
            print(str(self.bar), file=self.stream, flush=True)
            self._last_line, self._last_state = now, state

    def _line(self, text: str, err: bool = False) -> None:
        stream = self.err if err else self.stream
        with tqdm.external_write_mode(file=stream) if self.draw else contextlib.nullcontext():  # the bar steps aside
            print(text, file=stream, flush=True)


# ---------------------------------------------------------------- the console around a sweep


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def console(verbose: int):
    """Without -v: MLflow's and Ray's info chatter off (warnings and errors stay), Tune's
    console output and MLflow's download bars off, Tune's restore hint replaced by ours.
    Always: colour codes stripped from whatever is not a terminal (Ray colours worker-log
    prefixes unconditionally)."""
    import colorama

    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    noise = {logging.getLogger(name): _DropMessages(prefixes) for name, prefixes in TUNE_INTERRUPT_NOISE.items()}
    colorama.init()  # wraps only streams that are not terminals, and strips ANSI codes there
    if not verbose:
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        for logger, drop in noise.items():
            logger.addFilter(drop)
        os.environ.update(QUIET_ENV)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for logger, drop in noise.items():
            logger.removeFilter(drop)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        colorama.deinit()


def quiet_worker_logs() -> None:
    """Run in every Ray worker of a sweep without -v (``worker_process_setup_hook``)."""
    logging.getLogger("ray").setLevel(logging.WARNING)


class Interruptions:
    """The SIGTERMs a sweep received (SIGINT is Tune's or Python's to handle); ``exit_code``
    is the shell's 128 + signal number."""

    def __init__(self):
        self.received: list[int] = []

    @property
    def exit_code(self) -> int:
        return 128 + (self.received[0] if self.received else signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.received[0]).name if self.received else "SIGINT"

    def on_sigterm(self, signum, frame) -> None:
        self.received.append(signum)
        signal.raise_signal(signal.SIGINT)


_active: list[Interruptions] = []  # the sweep's, while ``interruptions`` is entered


@contextlib.contextmanager
def interruptions():
    """SIGTERM stops a sweep as Ctrl-C does: Tune's SIGINT handler during ``fit`` (trials stop,
    the experiment state is saved for --resume), KeyboardInterrupt outside it."""
    seen = Interruptions()
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield seen
        return
    previous = signal.signal(signal.SIGTERM, seen.on_sigterm)
    _active.append(seen)
    try:
        yield seen
    finally:
        _active.remove(seen)
        signal.signal(signal.SIGTERM, previous)


def catch_sigterm() -> None:
    """Take SIGTERM back after ``ray.init``: Ray's core installs its own handler in the driver,
    which aborts the process (exit 134, the experiment state unsaved)."""
    if _active:
        signal.signal(signal.SIGTERM, _active[-1].on_sigterm)
