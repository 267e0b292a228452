"""`sweep --until-decided` through real Ray and a real MLflow store, on busy_loop's `decide`
study: test accuracy = ... + 0.1 * lr + noise, so the lr claim has a large effect (+0.01
against a paired sd of about 0.0014 at noise 0.001) and the batch-size claim none."""

import pytest
import ray
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.report_data import load_runs
from orchestrator.sequential import INCONCLUSIVE, OPEN, VALIDATED
from orchestrator.spaces import load_family_file, load_study
from orchestrator.until_decided import (TAG, compared_cells, next_round, replay, round_seeds, study_claims,
                                        sub_grid)

pytestmark = pytest.mark.slow
ARGS = ["sweep", "busy_loop", "--study", "decide", "--set", "noise=0.001", "--until-decided", "--max-seeds", "6",
        "--batch", "2", "--no-report"]


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """One until-decided sweep for the module (three rounds of ~0.1 s trials)."""
    tmp = tmp_path_factory.mktemp("until")
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    result = CliRunner().invoke(main, [*ARGS, "--tracking-uri", uri, "--storage", str(tmp / "runs")])
    yield tmp, uri, result
    ray.shutdown()
    mp.undo()


def runs(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("busy_loop")
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return ([r for r in found if r.data.tags.get("role") == "parent"],
            [r for r in found if r.data.tags.get("role") == "trial"])


def test_stops_early_on_a_large_effect_and_runs_to_max_seeds_on_none(decided):
    tmp, uri, result = decided
    assert result.exit_code == 0, result.output
    out = result.output
    assert "round 1: seeds 0-1 in 4 cells" in out and "claim 1 OPEN" in out.split("round 2")[0]
    assert "claim 1 (under seed noise, lr 0.2 beats lr 0.1" in out and "VALIDATED at look 2 with 4 seeds" in out
    assert "INCONCLUSIVE with 6 seeds" in out and "round 3: seeds 4-5 in 2 cells (lr=[0.1], batch_size=[128, 256])" in out
    parents, children = runs(uri)
    assert len(parents) == 1  # every round logs under the one parent
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.data.tags["sweep_id"] for c in children} == {parent.data.tags["sweep_id"]}
    assert len(children) == 4 * 2 + 4 * 2 + 2 * 2  # round 1, round 2 (both claims open), round 3 (lr=0.1 only)
    seeds = {}
    for c in children:
        seeds.setdefault((c.data.params["lr"], c.data.params["batch_size"]), set()).add(int(c.data.params["seed"]))
    assert seeds[("0.1", "128")] == seeds[("0.1", "256")] == set(range(6))  # the null claim ran to --max-seeds
    assert seeds[("0.2", "128")] == seeds[("0.2", "256")] == set(range(4))  # decided: no seeds after round 2
    assert parent.data.tags[TAG] and parent.data.tags["rounds"] == "3"
    assert sorted(p.name for p in (tmp / "runs").iterdir() if p.is_dir()) == [
        parent.data.tags["sweep_id"], parent.data.tags["sweep_id"] + "-round2", parent.data.tags["sweep_id"] + "-round3"]


def test_replay_rebuilds_the_rounds_and_an_interrupted_round_is_run_again(decided):
    tmp, uri, _ = decided
    study = load_study("busy_loop", "decide", {"noise": "0.001"})
    claims = study_claims(study, load_family_file("busy_loop"))
    frame = load_runs(uri, "busy_loop", "decide")
    rounds = replay(study, claims, frame, batch=2, max_seeds=6)
    assert [r.number for r in rounds] == [1, 2, 3]
    assert [[d.status for d in r.decisions] for r in rounds] == [[OPEN, OPEN], [VALIDATED, OPEN],
                                                                [VALIDATED, INCONCLUSIVE]]
    assert next_round(study, claims, rounds, 2, 6) is None
    # drop one trial of round 3, as an interruption would leave it: round 3 is what comes next
    cut = frame.drop(frame[(frame["seed"] == "5") & (frame["param.batch_size"] == "256")].index)
    partial = replay(study, claims, cut, batch=2, max_seeds=6)
    again = next_round(study, claims, partial, 2, 6)
    assert len(partial) == 2 and again.number == 3 and again.seeds == [4, 5] and again.grid == rounds[2].grid


def test_resume_of_a_finished_until_decided_sweep_adds_no_run(decided):
    tmp, uri, result = decided
    sweep_id = runs(uri)[0][0].data.tags["sweep_id"]
    before = len(runs(uri)[1])
    again = CliRunner().invoke(main, [*ARGS, "--tracking-uri", uri, "--storage", str(tmp / "runs"), "--resume", sweep_id])
    assert again.exit_code == 0, again.output
    assert len(runs(uri)[1]) == before and len(runs(uri)[0]) == 1
    assert "VALIDATED at look 2 with 4 seeds" in again.output


def test_the_plan_of_rounds():
    study = load_study("busy_loop", "decide")
    lr_claim, batch_claim = study_claims(study, load_family_file("busy_loop"))
    assert [round_seeds([0, 1], 2, 7, r) for r in (1, 2, 3, 4, 5)] == [[0, 1], [2, 3], [4, 5], [6], []]
    assert compared_cells(study, lr_claim) == [{"lr": 0.1, "batch_size": 128}, {"lr": 0.2, "batch_size": 128}]
    assert sub_grid(study, compared_cells(study, batch_claim)) == {"lr": [0.1], "batch_size": [128, 256]}


def test_the_report_shows_the_sequential_verdicts_not_only_the_fixed_n_claims(decided):
    tmp, uri, _ = decided
    out = tmp / "report.md"
    result = CliRunner().invoke(main, ["report", "busy_loop", "--study", "decide", "--tracking-uri", uri, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    section = text.split("## Seeds until decided: study `decide`")[1]
    assert "--batch 2, --max-seeds 6" in section
    assert "| VALIDATED | 4 | 2 |" in section and "| INCONCLUSIVE | 6 | — |" in section
    assert "| 3 | seeds 4-5 | 2 cells (lr=[0.1], batch_size=[128, 256]) | 6 | VALIDATED | INCONCLUSIVE |" in section
