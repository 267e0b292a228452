"""``orchestrate sweep FAMILY --study S --until-decided``: add seeds where a claim is still open.

Round 1 runs the study as declared. After each round every claim of the study is decided by
the group-sequential rule of :mod:`orchestrator.sequential` (never by re-running the fixed-n
t-test); if some are still open and fewer than ``--max-seeds`` seeds have run, the next round
adds ``--batch`` new seeds to the cells the open claims compare (the smallest sub-grid holding
them). Each round is a Tune experiment of its own (``<sweep id>-round<k>`` beside the sweep's
own directory) logged under the sweep's one MLflow parent run, so every added seed is one more
child run of the same parent, and ``--resume`` restarts an interrupted round where it stopped.

Which seeds a round adds follows from the study's seeds, ``--batch`` and the decisions so far,
and the decisions follow from the data, so :func:`replay` rebuilds every round from the runs
alone: the loop uses it to pick the next round (and so resumes exactly), the report to show
the verdicts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.claims import ALPHA, Claim, parse_claims, paired_values, rows_of, same_value
from orchestrator.errors import UsageError
from orchestrator.sequential import OPEN, Decision, Look, decide_all, look_of

DEFAULT_MAX_SEEDS, DEFAULT_BATCH = 10, 2
TAG = "until_decided"  # parent-run tag: {"seeds": [...], "batch": B, "max_seeds": M} as JSON


# ---------------------------------------------------------------- checks and the plan of rounds


def study_claims(study, doc: dict) -> list[Claim]:
    return [c for c in parse_claims(doc, study.family) if c.study == study.name]


def check_until_decided(study, claims: list[Claim], max_seeds: int, batch: int) -> None:
    """Bad input, before anything starts: one clear line each."""
    if not claims:
        raise UsageError(f"--until-decided: study {study.family}/{study.name} declares no claims to decide "
                         f"(add some under claims: in {study.family}.yaml)")
    if study.space or study.search == "optuna":
        raise UsageError(f"--until-decided: study {study.name} samples configurations ('space'); "
                         "seeds can only be added to the fixed cells of a grid study")
    if batch < 1:
        raise UsageError(f"--batch {batch}: a round must add at least 1 seed")
    if max_seeds < len(study.seeds):
        raise UsageError(f"--max-seeds {max_seeds} is below the {len(study.seeds)} seeds study {study.name} "
                         "already runs")


def check_until_decided_options(study, max_seeds: int | None, batch: int | None) -> tuple[int, int]:
    """``--max-seeds`` and ``--batch`` with their defaults, checked against the study."""
    from orchestrator.spaces import load_family_file

    max_seeds = max(DEFAULT_MAX_SEEDS, len(study.seeds)) if max_seeds is None else max_seeds
    batch = DEFAULT_BATCH if batch is None else batch
    check_until_decided(study, study_claims(study, load_family_file(study.family)), max_seeds, batch)
    return max_seeds, batch


def round_seeds(study_seeds: list[int], batch: int, max_seeds: int, round_no: int) -> list[int]:
    """The seeds round ``round_no`` (1-based) runs: the study's own, then ``batch`` new ones a
    round after the study's largest seed, never past ``max_seeds`` in all."""
    if round_no == 1:
        return list(study_seeds)
    first = max(study_seeds) + 1 + (round_no - 2) * batch
    room = max_seeds - len(study_seeds) - (round_no - 2) * batch
    return list(range(first, first + max(min(batch, room), 0)))


def grid_cells(grid: dict) -> list[dict]:
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def compared_cells(study, claim: Claim) -> list[dict]:
    """The grid cells whose trials a claim reads: those matching either side's ``where`` (and,
    for a drop claim, at one of the drop's two values)."""
    sides = [claim.a] + ([claim.b] if claim.b else [])
    out = []
    for cell in grid_cells(study.grid):
        config = {**study.base, **cell}
        if claim.drop and not any(same_value(config.get(claim.drop["param"]), claim.drop[end]) for end in ("from", "to")):
            continue
        if any(all(same_value(str(config.get(p)), v) for p, v in side.where) for side in sides):
            out.append(cell)
    return out


def sub_grid(study, cells: list[dict]) -> dict[str, list]:
    """The smallest grid (per-axis values, in the study's order) holding every cell given:
    Tune grids are products, so a round may also cover a cell no open claim needs."""
    return {k: [v for v in values if any(c[k] == v for c in cells)] for k, values in study.grid.items()}


def round_study(study, grid: dict, seeds: list[int]):
    return dataclasses.replace(study, grid=grid, seeds=seeds)


# ---------------------------------------------------------------- decisions from the runs


@dataclass
class Round:
    number: int
    seeds: list[int]  # the seeds this round added
    grid: dict  # the cells it ran them in (the study's grid in round 1)
    decisions: list[Decision]  # every claim after this round's look
    seeds_so_far: int


ENDED = ("finished", "diverged", "error")  # a trial in one of these will not run again by itself


def with_seed(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["seed_int"] = pd.to_numeric(out["seed"], errors="coerce")
    return out


def round_ran(frame: pd.DataFrame, grid: dict, seeds: list[int]) -> bool:
    """Every (cell, seed) of the round has a trial that ended (finished, diverged or failed)."""
    runs = frame[frame["status"].isin(ENDED) & frame["seed_int"].isin(seeds)].drop_duplicates("run_id")
    ended = set()
    for _, run in runs.iterrows():
        for cell in grid_cells(grid):
            if all(same_value(run.get(f"param.{k}"), v) for k, v in cell.items()):
                ended.add((tuple(cell.items()), int(run["seed_int"])))
    return len(ended) == len(grid_cells(grid)) * len(seeds)


def claim_look(claim: Claim, frame: pd.DataFrame, cell_params: list[str], seeds: set[int], seeds_so_far: int) -> Look:
    """The claim's paired values over the trials with a seed in ``seeds``."""
    rows = frame[frame["seed_int"].isin(seeds)]
    if claim.b is None:
        values = rows_of(rows, claim.a).groupby("run_id")["value"].mean().to_numpy()
        return look_of(values - claim.threshold, None, seeds_so_far)
    pairs = paired_values(rows, cell_params, claim.a, claim.b, claim.drop)
    if pairs.empty:
        return look_of([], None, seeds_so_far)
    return look_of(pairs["a"].to_numpy(), pairs["b"].to_numpy(), seeds_so_far)


def replay(study, claims: list[Claim], frame: pd.DataFrame, batch: int, max_seeds: int,
           alpha: float = ALPHA) -> list[Round]:
    """Every round the data holds, in order, with the decisions after each. A round counts
    when each of its trials has ended; the replay stops at the first that has not (the loop
    runs or resumes it next) or when nothing is left to decide."""
    frame = with_seed(frame)
    done = frame[(frame["status"] == "finished") & (frame["key"] != "")]
    cell_params = list(study.grid) + list(study.derive)
    rounds: list[Round] = []
    looks: list[list[Look]] = [[] for _ in claims]
    seen: set[int] = set()
    grid = dict(study.grid)
    number = 1
    while True:
        seeds = round_seeds(study.seeds, batch, max_seeds, number)
        if not seeds or not round_ran(frame, grid, seeds):
            return rounds
        seen |= set(seeds)
        for i, claim in enumerate(claims):
            looks[i].append(claim_look(claim, done, cell_params, seen, len(seen)))
        decisions = decide_all(looks, max_seeds, alpha, [c.better for c in claims], [c.margin for c in claims])
        rounds.append(Round(number, seeds, grid, decisions, len(seen)))
        still_open = [c for c, d in zip(claims, decisions) if d.status == OPEN]
        if not still_open or len(seen) >= max_seeds:
            return rounds
        grid = sub_grid(study, [cell for c in still_open for cell in compared_cells(study, c)])
        number += 1


def next_round(study, claims: list[Claim], rounds: list[Round], batch: int, max_seeds: int) -> Round | None:
    """The round to run after ``rounds`` (None: every claim decided, or no seeds left)."""
    if not rounds:
        return Round(1, list(study.seeds), dict(study.grid), [], len(study.seeds))
    last = rounds[-1]
    still_open = [c for c, d in zip(claims, last.decisions) if d.status == OPEN]
    seeds = round_seeds(study.seeds, batch, max_seeds, last.number + 1)
    if not still_open or not seeds:
        return None
    grid = sub_grid(study, [cell for c in still_open for cell in compared_cells(study, c)])
    return Round(last.number + 1, seeds, grid, [], last.seeds_so_far + len(seeds))


# ---------------------------------------------------------------- describing rounds


def grid_text(grid: dict) -> str:
    cells = int(np.prod([len(v) for v in grid.values()])) if grid else 1
    return f"{cells} cell{'s' * (cells != 1)}" + (f" ({', '.join(f'{k}={v}' for k, v in grid.items())})" if grid else "")


def seeds_text(seeds: list[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def decision_text(decision: Decision, seeds: int | None = None, status: bool = True) -> str:
    interval = decision.interval
    ci = f", repeated CI of Δ [{interval[0]:+.4g}, {interval[1]:+.4g}]" if interval and np.isfinite(interval).all() else ""
    if not status:
        return decision.reason + ci
    at = f" at look {decision.look}" if decision.look else ""
    used = f" with {seeds} seeds" if seeds is not None else ""
    return f"{decision.status}{at}{used}: {decision.reason}{ci}"


def rounds_table(study, claims: list[Claim], rounds: list[Round]) -> pd.DataFrame:
    """One row per round: seeds added, where, and every claim's status after it."""
    rows = []
    for r in rounds:
        row = {"Round": r.number, "Seeds added": seeds_text(r.seeds), "Cells": grid_text(r.grid), "Seeds so far": r.seeds_so_far}
        row.update({f"claim {i + 1}": d.status for i, d in enumerate(r.decisions)})
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_per_cell(study, frame: pd.DataFrame) -> pd.DataFrame:
    frame = with_seed(frame)
    done = frame[frame["status"] == "finished"].drop_duplicates("run_id")
    names = list(study.grid)
    if not names:
        return pd.DataFrame([{"cell": "all trials", "seeds": done["seed_int"].nunique()}])
    counts = done.groupby([f"param.{n}" for n in names])["seed_int"].nunique().reset_index()
    counts.columns = names + ["seeds"]
    return counts


def final_lines(claims: list[Claim], rounds: list[Round]) -> list[str]:
    """Each claim's verdict and the seeds it used (those run up to the look that decided it)."""
    last = rounds[-1].decisions
    lines = []
    for i, (claim, decision) in enumerate(zip(claims, last), start=1):
        seeds = rounds[decision.look - 1].seeds_so_far if decision.look else rounds[-1].seeds_so_far
        lines.append(f"claim {i} ({claim.text}): {decision_text(decision, seeds)}")
    return lines


# ---------------------------------------------------------------- the loop


@dataclass
class UntilDecidedOutcome:
    outcome: object  # the SweepOutcome of round 1 (the sweep's own directory and parent run)
    last: object  # the SweepOutcome of the last round run
    rounds: list[Round]
    claims: list[Claim]
    per_cell: pd.DataFrame


def storage_of(opts) -> str:
    from orchestrator.cluster import STORAGE_ENV
    from orchestrator.sync import storage_location

    return storage_location(opts.storage or os.environ.get(STORAGE_ENV) or str(opts.workdir / "runs"))


def run_until_decided(study, opts, doc: dict, max_seeds: int, batch: int, echo=print) -> UntilDecidedOutcome:
    """Run round after round (see the module doc); stops early when a round is interrupted
    (``last.complete`` is False) so that ``--resume`` carries on from there."""
    from mlflow.tracking import MlflowClient
    from ray import tune

    from orchestrator.report_data import load_runs
    from orchestrator.runner import run_sweep
    from orchestrator.tracking import warn

    claims = study_claims(study, doc)
    check_until_decided(study, claims, max_seeds, batch)
    first = run_sweep(study, opts)
    last = first
    if not first.complete:
        return UntilDecidedOutcome(first, first, [], claims, pd.DataFrame())
    sweep_id, storage = first.sweep_id, storage_of(opts)
    client = MlflowClient(first.tracking_uri)
    client.set_tag(first.parent_run_id, TAG, json.dumps({"seeds": study.seeds, "batch": batch, "max_seeds": max_seeds}))
    while True:
        frame = load_runs(first.tracking_uri, study.family, study.name, sweep_id)
        rounds = replay(study, claims, frame, batch, max_seeds)
        if rounds:
            r = rounds[-1]
            echo(f"round {r.number}: {seeds_text(r.seeds)} in {grid_text(r.grid)}; "
                 + "; ".join(f"claim {i + 1} {d.status}" for i, d in enumerate(r.decisions)))
        if last is not first and len(rounds) < planned.number:  # the round just run did not end everywhere
            warn(f"round {planned.number} has trials that did not end; stopping (--resume retries them)")
            break
        planned = next_round(study, claims, rounds, batch, max_seeds)
        if planned is None:
            break
        name = f"{sweep_id}-round{planned.number}"
        resume = name if tune.Tuner.can_restore(f"{storage}/{name}") else None
        round_opts = dataclasses.replace(opts, resume=resume, name=name, sweep_id=sweep_id, seeds=None)
        last = run_sweep(round_study(study, planned.grid, planned.seeds), round_opts)
        if not last.complete:
            return UntilDecidedOutcome(first, last, rounds, claims, pd.DataFrame())
    client.set_tag(first.parent_run_id, "rounds", str(len(rounds)))
    return UntilDecidedOutcome(first, last, rounds, claims, seeds_per_cell(study, frame))


def sweep_until_decided(study, opts, max_seeds: int | None, batch: int | None, no_report: bool, echo) -> int:
    """The CLI's ``sweep --until-decided``: the loop, then every claim's verdict, the seeds
    per cell and the report. Returns the exit code."""
    from orchestrator.spaces import load_family_file

    max_seeds, batch = check_until_decided_options(study, max_seeds, batch)
    result = run_until_decided(study, opts, load_family_file(study.family), max_seeds, batch, echo)
    if not result.last.complete:
        sweep_id = result.outcome.sweep_id
        echo(f"interrupted; resume with: orchestrate sweep {study.family} --study {study.name} --until-decided "
             f"--max-seeds {max_seeds} --batch {batch} --resume {sweep_id}")
        return 130
    for line in final_lines(result.claims, result.rounds):
        echo(line)
    echo("seeds per cell: " + "; ".join(
        ", ".join(f"{k}={v}" for k, v in row.items() if k != "seeds") + f": {row['seeds']}"
        for row in result.per_cell.to_dict("records")))
    report_path = None
    if not no_report:
        from orchestrator.report import write_sweep_report

        report_path = write_sweep_report(result.outcome, study)
    first = result.outcome
    echo(f"{len(result.rounds)} round(s) in sweep {first.sweep_id}; results: {first.experiment_path} (rounds beside it)")
    echo(f"mlflow:  {first.tracking_uri} (parent run {first.parent_run_id})")
    if report_path:
        echo(f"report:  {report_path}")
    return 0


# ---------------------------------------------------------------- the report's section


def until_decided_sections(tracking_uri: str, family: str, studies: list) -> list:
    """For each study of a report whose sweep ran ``--until-decided`` (its parent run carries
    the TAG): the rounds replayed from the runs and every claim's sequential verdict. These,
    not the fixed-n claims table, are the valid verdicts after seeds were added on the way."""
    from mlflow.tracking import MlflowClient

    from orchestrator.report_data import load_runs
    from orchestrator.report_render import Section, Table
    from orchestrator.spaces import load_family_file, load_study

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(family)
    out = []
    for runs in studies:
        if exp is None or len(runs.sweeps) != 1:
            continue
        parents = client.search_runs([exp.experiment_id], f"tags.sweep_id = '{runs.sweeps[0]}' and tags.role = 'parent'",
                                     max_results=1)
        plan = json.loads(parents[0].data.tags[TAG]) if parents and TAG in parents[0].data.tags else None
        if plan is None:
            continue
        study = dataclasses.replace(load_study(family, runs.name), seeds=plan["seeds"])
        claims = study_claims(study, load_family_file(family))
        frame = load_runs(tracking_uri, family, runs.name, runs.sweeps[0])
        rounds = replay(study, claims, frame, plan["batch"], plan["max_seeds"])
        if not rounds:
            continue
        sec = Section(f"Seeds until decided: study `{runs.name}`", 2, [
            f"Sweep {runs.sweeps[0]} ran with --until-decided (--batch {plan['batch']}, --max-seeds {plan['max_seeds']}): "
            "after each round every claim of the study was decided by a group-sequential rule (Lan-DeMets "
            "O'Brien-Fleming alpha spending on the paired t statistic, repeated confidence intervals, sequential Holm "
            f"over the study's {len(claims)} claims; docs/statistics.md), and the cells of the open claims got new "
            "seeds. These are the verdicts to quote: the claims table above re-tests all seeds at a fixed level, "
            "which is not valid after seeds were added on the way."])
        verdicts = pd.DataFrame([{"Claim": c.text, "Status": d.status,
                                  "Seeds used": rounds[d.look - 1].seeds_so_far if d.look else rounds[-1].seeds_so_far,
                                  "Decided at round": d.look or "—", "Why": decision_text(d, status=False)}
                                 for c, d in zip(claims, rounds[-1].decisions)])
        sec.tables += [Table("sequential verdicts", verdicts),
                       Table("rounds (claim columns: status after the round's look)", rounds_table(study, claims, rounds)),
                       Table("seeds per cell", seeds_per_cell(study, frame))]
        out.append(sec)
    return out
