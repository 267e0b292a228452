"""How long a sweep will take, from the Tune results of an earlier sweep of the same study.

The earlier sweep's span (its first trial's start to its last trial's end) already holds what
the trials' own times leave out: trials waiting for a free CPU, a worker process starting per
trial, Tune's bookkeeping. The estimate scales that span by the ratio of trial counts. Only
local storage is read (``--dry-run`` must stay quick and offline); Ray's start-up is extra.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Timing:
    sweep_id: str
    trials: int
    span_s: float  # first trial start to last trial end
    mean_trial_s: float

    def estimate_s(self, trials: int) -> float:
        return self.span_s * trials / self.trials


def _trial_times(result_file: Path) -> tuple[float, float, float] | None:
    """(start, end, time_total_s) of one trial from its result.json lines."""
    lines = [line for line in result_file.read_text().splitlines() if line.strip()]
    if not lines:
        return None
    try:
        first, last = json.loads(lines[0]), json.loads(lines[-1])
        return first["timestamp"] - first["time_this_iter_s"], last["timestamp"], last["time_total_s"]
    except (ValueError, KeyError, TypeError):
        return None


def earlier_timing(storage: str, family: str, study: str) -> Timing | None:
    """The newest earlier sweep of ``family``/``study`` under ``storage`` that has trial results."""
    root = Path(storage).expanduser()
    if "://" in storage or not root.is_dir():
        return None
    pattern = re.compile(rf"{re.escape(family)}-{re.escape(study)}-\d{{8}}-\d{{6}}")
    for sweep in sorted((p for p in root.iterdir() if pattern.fullmatch(p.name)), reverse=True):
        times = [t for t in map(_trial_times, sweep.glob("*/result.json")) if t is not None]
        if times:
            span = max(t[1] for t in times) - min(t[0] for t in times)
            return Timing(sweep.name, len(times), max(span, 0.0), sum(t[2] for t in times) / len(times))
    return None


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def estimate_line(storage: str, family: str, study: str, trials: int) -> str:
    timing = earlier_timing(storage, family, study)
    if timing is None:
        return f"estimated wall time: unknown (no earlier sweep of {family}/{study} under {storage})"
    return (f"estimated wall time: ~{format_duration(timing.estimate_s(trials))} plus Ray start-up "
            f"(sweep {timing.sweep_id}: {timing.trials} trials in {format_duration(timing.span_s)}, "
            f"{timing.mean_trial_s:.1f} s per trial on average)")
