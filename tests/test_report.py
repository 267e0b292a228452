"""Reports on a real MLflow store filled (through SweepTracker, as a sweep would) with known
metrics: every table cell against numbers computed here with numpy/scipy, claim statuses on
constructed cases, GitHub table syntax, plots, CSV/JSON, the CLI and artifacts on the parent run."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from scipy import stats

from orchestrator.cli import main
from orchestrator.report_build import build_report
from orchestrator.report_data import load_runs
from orchestrator.tracking import SweepTracker
from trainables.busy_loop import expected_acc

SEEDS3 = [0, 1, 2]
# headline study: three seeds; "same" equals "base" in every seed; "good" is base + a steady gain
BASE_ACC = [0.80, 0.82, 0.81]
GOOD_GAIN = [0.050, 0.051, 0.049]
BASE_ECE = [0.10, 0.12, 0.11]
GOOD_ECE_CUT = [0.020, 0.025, 0.030]
OVERHEAD_MS = [0.20, 0.25, 0.30]
# noise study: four seeds; seed 3 diverges at noise 0.3
NOISE_BASE = [0.80, 0.81, 0.79, 0.80]
NOISE_DROP = {"base": [0.010, 0.011, 0.009], "good": [0.100, 0.102, 0.098]}
# ab study: five seeds, batch 64 clearly worse than the reference 128, 256 within noise
AB_SEED = [0.0, 0.004, -0.003, 0.002, -0.001]
AB_CELL = {64: [-0.020, -0.022, -0.019, -0.021, -0.020], 128: [0.0] * 5, 256: [0.001, -0.002, 0.0015, -0.0005, 0.0]}
TINY_BASE, TINY_GAIN = [0.50, 0.60], [0.10, 0.12]
# wm study: the method comes from the trial (attention: true -> "attention", false -> "base")
WM = {("a", "attention"): [0.70, 0.72], ("a", "base"): [0.60, 0.63], ("b", "attention"): [0.80, 0.83],
      ("b", "base"): [0.75, 0.76]}
TUNE_LR = {0.01: 0.91, 0.1: 0.95, 0.5: 0.80}

DOC = {
    "family": "fam", "description": "a family of known numbers", "objective": {"metric": "val/good/acc", "mode": "max"},
    "default_study": "headline",
    "defaults": {"dataset": "digits", "noise_rate": 0.0, "batch_size": 128, "lr": 0.1, "epochs": 1, "scenario": "a",
                 "attention": True},
    "report": {"baseline": "base", "headline_metrics": ["acc", "ece"], "labels": {"good": "Good method"},
               "focus": ["good"], "reference": {"ab": {"batch_size": 128}}, "drops": {"noise": "noise_rate"}},
    "claims": [
        {"claim": "good beats base on accuracy", "study": "headline",
         "compare": {"metric": "test/good/acc", "baseline": "test/base/acc", "better": "higher"}},
        {"claim": "same beats base on accuracy", "study": "headline",
         "compare": {"metric": "test/same/acc", "baseline": "test/base/acc"}},
        {"claim": "good loses less accuracy at 30% noise than base", "study": "noise",
         "compare": {"metric": "test/good/acc", "baseline": "test/base/acc", "better": "lower"},
         "drop": {"param": "noise_rate", "from": 0.0, "to": 0.3}},
        {"claim": "good's overhead is below 1 ms", "study": "headline",
         "threshold": {"metric": "perf/overhead_ms", "below": 1.0}},
        {"claim": "good beats base with two seeds", "study": "tiny",
         "compare": {"metric": "test/good/acc", "baseline": "test/base/acc"}},
        {"claim": "batch 256 beats batch 128", "study": "ab", "margin": 0.01,
         "compare": {"metric": "test/good/acc", "where": {"batch_size": 256}, "baseline_where": {"batch_size": 128}}},
        {"claim": "good beats base in one run", "study": "single",
         "compare": {"metric": "test/good/acc", "baseline": "test/base/acc"}},
        {"claim": "attention beats the baseline model", "study": "wm",
         "compare": {"metric": "test/attention/acc", "baseline": "test/base/acc"}},
    ],
    "studies": {
        "headline": {"description": "the headline", "seeds": 3, "eval": {"k": [1, 5]}},
        "noise": {"description": "label noise", "grid": {"noise_rate": [0.0, 0.3]}, "seeds": 4},
        "ab": {"description": "batch size A/B", "grid": {"batch_size": [64, 128, 256]},
               "derive": {"lr": {"rule": "linear", "reference_batch": 128, "reference_value": 0.1}}, "seeds": 5},
        "tiny": {"description": "two seeds", "seeds": 2},
        "single": {"description": "one seed", "seeds": 1},
        "wm": {"description": "models from different trials", "grid": {"scenario": ["a", "b"], "attention": [True, False]},
               "seeds": 2},
        "broken": {"description": "every trial diverged", "seeds": 1},
        "tune": {"description": "random search", "space": {"lr": {"loguniform": [0.001, 1.0]}}, "samples": 3},
    },
}


def _sweep(uri, study, sweep_id, trials, family="fam"):
    """``trials``: (config, metrics or None for a diverged trial)."""
    tracker = SweepTracker(uri, family, sweep_id, tags={"family": family, "study": study, "dataset": "digits",
                                                        "git_commit": "test"})
    for i, (config, metrics) in enumerate(trials):
        run_id = tracker.child(f"{sweep_id}-{i}", config, {"seed": config["seed"], "dataset": "digits"})
        tracker.log_result(run_id, {"epoch": 1, **(metrics or {"diverged": 1.0})}, 1)
        tracker.set_tags(run_id, {"status": "finished" if metrics else "diverged"})
        tracker.finish(run_id)
    tracker.finish(tracker.parent_id)
    return tracker.parent_id


def _cfg(seed, **extra):
    return {"dataset": "digits", "noise_rate": 0.0, "batch_size": 128, "lr": 0.1, "epochs": 1, "seed": seed,
            "eval": {"k": [1, 5]}, **extra}


def _headline(acc_shift=0.0):
    trials = []
    for s in SEEDS3:
        base, good = BASE_ACC[s] + acc_shift, BASE_ACC[s] + GOOD_GAIN[s] + acc_shift
        trials.append((_cfg(s), {
            "test/base/acc": base, "test/same/acc": base, "test/good/acc": good, "val/good/acc": good - 0.01,
            "test/base/ece": BASE_ECE[s], "test/same/ece": BASE_ECE[s], "test/good/ece": BASE_ECE[s] - GOOD_ECE_CUT[s],
            "test/good:k:1/acc": good - 0.03, "test/good:k:5/acc": good, "test/base:k:1/acc": base - 0.02,
            "test/base:k:5/acc": base, "perf/overhead_ms": OVERHEAD_MS[s], "info/flag": 1.0}))
    return trials


def fill_store(root) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _sweep(uri, "headline", "fam-headline-old", _headline(acc_shift=-0.5))  # an older sweep: must be left out
    _sweep(uri, "headline", "fam-headline-new", _headline())
    noise = []
    for s in range(4):
        noise.append((_cfg(s), {"test/base/acc": NOISE_BASE[s], "test/good/acc": NOISE_BASE[s] + 0.05,
                                "val/good/acc": NOISE_BASE[s]}))
        if s < 3:
            noise.append((_cfg(s, noise_rate=0.3), {
                "test/base/acc": NOISE_BASE[s] - NOISE_DROP["base"][s],
                "test/good/acc": NOISE_BASE[s] + 0.05 - NOISE_DROP["good"][s], "val/good/acc": NOISE_BASE[s] - 0.1}))
        else:
            noise.append((_cfg(s, noise_rate=0.3), None))
    _sweep(uri, "noise", "fam-noise-1", noise)
    ab = [(_cfg(s, batch_size=b, lr=0.1 * b / 128), {"test/good/acc": 0.9 + AB_SEED[s] + AB_CELL[b][s],
                                                     "test/good/ece": 0.05 + AB_SEED[s] / 10, "val/good/acc": 0.9})
          for b in (64, 128, 256) for s in range(5)]
    _sweep(uri, "ab", "fam-ab-1", ab)
    _sweep(uri, "tiny", "fam-tiny-1", [(_cfg(s, epochs=2), {"test/base/acc": TINY_BASE[s], "test/same/acc": TINY_BASE[s],
                                                  "test/good/acc": TINY_BASE[s] + TINY_GAIN[s]}) for s in range(2)])
    _sweep(uri, "single", "fam-single-1", [(_cfg(0), {"test/base/acc": 0.7, "test/good/acc": 0.8, "val/good/acc": 0.99})])
    _sweep(uri, "wm", "fam-wm-1", [(_cfg(s, scenario=sc, attention=m == "attention"), {f"test/{m}/acc": WM[sc, m][s]})
                                   for sc in "ab" for m in ("attention", "base") for s in range(2)])
    _sweep(uri, "broken", "fam-broken-1", [(_cfg(0), None)])
    _sweep(uri, "tune", "fam-tune-1", [(_cfg(0, lr=lr), {"val/good/acc": acc, "test/good/acc": acc - 0.01})
                                       for lr, acc in TUNE_LR.items()])
    busy = [({"dataset": "digits", "epochs": 3, "seconds_per_epoch": 0.2, "lr": lr, "batch_size": 128, "lr_rule": "none",
              "diverge_at_epoch": 0, "seed": s, "eval": {"k": [1, 5]}}, None) for lr in (0.1, 0.2) for s in (0, 1)]
    busy = [(c, {"val/busy/acc": expected_acc(c, 3), "test/busy/acc": expected_acc(c, 3),
                 "test/busy:k:1/acc": expected_acc(c, 3) - 0.001, "test/busy:k:5/acc": expected_acc(c, 3) - 0.005})
            for c, _ in busy]
    parent = _sweep(uri, "smoke", "busy_loop-smoke-1", busy, family="busy_loop")
    return {"uri": uri, "busy_parent": parent}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return fill_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def report(store, tmp_path_factory):
    plots = tmp_path_factory.mktemp("plots")
    rep = build_report(store["uri"], "fam", plots_dir=plots, link_base=plots.parent, docs={"fam": DOC})
    return rep, rep.markdown(), plots


# ---------------------------------------------------------------- helpers


def tables(markdown: str) -> list[list[list[str]]]:
    """Every GitHub table of the markdown as rows of cells; asserts the table syntax."""
    out, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block]
            assert len(block) >= 2 and re.fullmatch(r"\|( --- \|)+", block[1]), block[:2]
            assert all(len(r) == len(rows[0]) for r in rows), block
            out.append([rows[0]] + rows[2:])
            block = []
    return out


def table_after(markdown: str, title: str) -> pd.DataFrame:
    start = markdown.index(title)
    rows = tables(markdown[start:])[0]
    return pd.DataFrame(rows[1:], columns=rows[0])


def interval(cell: str) -> tuple[float, float | None, int]:
    m = re.fullmatch(r"([-\d.]+)(?: ± ([\d.]+))? \(n=(\d+)(?:, no interval)?\)", cell)
    assert m, cell
    return float(m[1]), (float(m[2]) if m[2] else None), int(m[3])


def expect_interval(cell: str, values) -> None:
    mean, half, n = interval(cell)
    x = np.asarray(values, dtype=float)
    assert n == len(x) and mean == pytest.approx(x.mean(), abs=5e-5)
    if len(x) > 1:
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
        assert half == pytest.approx((hi - lo) / 2, abs=5e-5)
    else:
        assert half is None and "no interval" in cell


def p_value(text: str) -> float:
    return 0.0 if text.startswith("< 0.0001") else float(text)


def holm(p):
    order = np.argsort(p)
    adj, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adj[i] = running
    return adj


# ---------------------------------------------------------------- tests


def test_tidy_frame_has_one_row_per_run_and_metric(store):
    frame = load_runs(store["uri"], "fam", study="headline")
    assert frame["run_id"].nunique() == 6  # both sweeps
    row = frame[(frame["key"] == "test/good:k:1/acc") & (frame["sweep_id"] == "fam-headline-new") & (frame["seed"] == "1")]
    assert len(row) == 1
    assert row.iloc[0][["split", "method", "axes", "metric"]].tolist() == ["test", "good", "k=1", "acc"]
    assert row.iloc[0]["value"] == pytest.approx(BASE_ACC[1] + GOOD_GAIN[1] - 0.03)
    assert row.iloc[0]["param.eval.k"] == "[1, 5]"
    perf = frame[frame["key"] == "perf/overhead_ms"].iloc[0]
    assert (perf["split"], perf["metric"]) == ("perf", "overhead_ms")


def test_headline_cells_equal_hand_computed_intervals(report):
    _, md, _ = report
    head = table_after(md, "Headline: study `headline`").set_index("Method")
    assert list(head.columns) == ["Accuracy", "ECE"]
    assert list(head.index) == ["base", "Good method", "same"]  # baseline first
    expect_interval(head.loc["base", "Accuracy"], BASE_ACC)  # the older sweep (acc - 0.5) is left out
    expect_interval(head.loc["Good method", "Accuracy"], np.add(BASE_ACC, GOOD_GAIN))
    expect_interval(head.loc["Good method", "ECE"], np.subtract(BASE_ECE, GOOD_ECE_CUT))
    assert "older sweeps left out: fam-headline-old" in md


def test_eval_axis_and_grid_tables(report):
    _, md, _ = report
    k_table = table_after(md, "test Accuracy vs k").set_index("k").rename(columns={"Good method": "good"})
    good = np.add(BASE_ACC, GOOD_GAIN)
    expect_interval(k_table.loc["1", "good"], good - 0.03)
    expect_interval(k_table.loc["5", "base"], BASE_ACC)
    noise = table_after(md, "test Accuracy vs noise_rate").set_index("noise_rate")
    expect_interval(noise.loc["0.0", "base"], NOISE_BASE)
    expect_interval(noise.loc["0.3", "Good method"], np.add(NOISE_BASE[:3], 0.05) - NOISE_DROP["good"])  # diverged left out
    assert "noise_rate=0.3 seed 3: diverged" in md


def test_drop_table_pairs_seeds_across_cells(report):
    _, md, _ = report
    drop = table_after(md, "test Accuracy drop from noise_rate=0.0").set_index("Method")
    expect_interval(drop.loc["base", "noise_rate=0.3"], NOISE_DROP["base"])  # seed 3 diverged at 0.3: not paired
    expect_interval(drop.loc["Good method", "noise_rate=0.3"], NOISE_DROP["good"])


def test_baseline_comparisons_match_scipy_with_holm(report):
    rep, md, _ = report
    section = md[md.index("## Study `headline`: details"):md.index("## Best configuration")]
    comp = table_after(section, "paired comparisons against the baseline").set_index(["Method", "Metric"])
    good = np.add(BASE_ACC, GOOD_GAIN)
    ece_good = np.subtract(BASE_ECE, GOOD_ECE_CUT)
    raw = [stats.ttest_rel(good, BASE_ACC).pvalue, stats.ttest_rel(ece_good, BASE_ECE).pvalue]
    adj = holm(np.array(raw))  # the "same" rows have no test (identical): they do not count
    for (metric, a, b), p, p_adj in zip((("Accuracy", good, BASE_ACC), ("ECE", ece_good, BASE_ECE)), raw, adj):
        row = comp.loc[("Good method", metric)]
        shown, shown_adj = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)\)", row["t-test p (Holm)"]).groups())
        assert shown == pytest.approx(p, abs=5e-5) and shown_adj == pytest.approx(p_adj, abs=5e-5)
        d = np.subtract(a, b)
        assert float(row["d_z"]) == pytest.approx(d.mean() / d.std(ddof=1), abs=5e-3)
        assert row["P(A>B)"] == ("1.00" if metric == "Accuracy" else "0.00")
        assert "Wilcoxon p (Holm)" not in row  # n = 3: a Wilcoxon test cannot reach p < 0.05, said once instead
        lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
        nums = [float(x) for x in re.findall(r"[-+][\d.]+", row["A − B [95% CI]"])]
        assert nums == pytest.approx([d.mean(), lo, hi], abs=5e-5)
    same = comp.loc[("same", "Accuracy")]
    assert "identical in every seed" in same["t-test p (Holm)"] and same["P(A>B)"] == "0.50"
    assert "nan" not in md.lower()


def test_claims_statuses_and_numbers(report):
    rep, md, _ = report
    claims = table_after(md, "## Claims").set_index("Claim")
    status = claims["Status"].to_dict()
    assert status == {
        "good beats base on accuracy": "VALIDATED",
        "same beats base on accuracy": "INVALIDATED",  # identical in every seed
        "good loses less accuracy at 30% noise than base": "INVALIDATED",  # it loses more, significantly
        "good's overhead is below 1 ms": "VALIDATED",
        "good beats base with two seeds": "INCONCLUSIVE",  # n = 2, p > 0.05
        "batch 256 beats batch 128": "INVALIDATED",  # 95% CI inside the ±0.01 margin
        "good beats base in one run": "INCONCLUSIVE",  # n = 1
        "attention beats the baseline model": "VALIDATED",
    }
    good = np.add(BASE_ACC, GOOD_GAIN)
    d256 = np.subtract(AB_CELL[256], AB_CELL[128])
    wm_a = WM["a", "attention"] + WM["b", "attention"]  # pairs: (seed, scenario), across attention true/false
    wm_b = WM["a", "base"] + WM["b", "base"]
    raw = np.array([stats.ttest_rel(good, BASE_ACC).pvalue,
                    stats.ttest_rel(NOISE_DROP["good"], NOISE_DROP["base"]).pvalue,
                    stats.ttest_1samp(OVERHEAD_MS, 1.0).pvalue,
                    stats.ttest_rel(np.add(TINY_BASE, TINY_GAIN), TINY_BASE).pvalue,
                    stats.ttest_1samp(d256, 0.0).pvalue,
                    stats.ttest_rel(wm_a, wm_b).pvalue])
    adjusted = holm(raw)
    records = {r["claim"]: r for t in (t for s in rep.sections for t in s.tables) if t.records and "claim" in t.records[0]
               for r in t.records}
    names = ["good beats base on accuracy", "good loses less accuracy at 30% noise than base",
             "good's overhead is below 1 ms", "good beats base with two seeds", "batch 256 beats batch 128",
             "attention beats the baseline model"]
    for name, p, p_adj in zip(names, raw, adjusted):
        assert records[name]["p_t"] == pytest.approx(p, rel=1e-6)
        assert records[name]["p_holm"] == pytest.approx(p_adj, rel=1e-6)
    assert records["good beats base with two seeds"]["n"] == 2 and adjusted[3] > 0.05
    drop = records["good loses less accuracy at 30% noise than base"]
    assert drop["n"] == 3 and drop["mean_a"] == pytest.approx(np.mean(NOISE_DROP["good"]))
    assert "p_holm" in records["good beats base in one run"] and records["good beats base in one run"]["n"] == 1
    assert "Holm" in claims.loc["good beats base on accuracy", "Evidence"]


def test_ab_table_against_reference_cell(report):
    _, md, _ = report
    ab = table_after(md, "A/B: every cell against the reference")
    ab = ab.set_index("Cell")
    acc = {b: 0.9 + np.add(AB_SEED, AB_CELL[b]) for b in (64, 128, 256)}
    ref_label = next(i for i in ab.index if i.endswith("(reference)"))
    assert ref_label.startswith("batch_size=128 (lr=0.1)")
    expect_interval(ab.loc[ref_label, "Accuracy"], acc[128])
    raw = [stats.ttest_rel(acc[b], acc[128]).pvalue for b in (64, 256)]
    adj = holm(np.array(raw))
    for b, p_adj in zip((64, 256), adj):
        label = next(i for i in ab.index if i.startswith(f"batch_size={b} "))
        expect_interval(ab.loc[label, "Accuracy"], acc[b])
        assert p_value(ab.loc[label, "p Accuracy t (Holm)"]) == pytest.approx(p_adj, abs=1e-4)  # n = 5: no Wilcoxon
    assert re.search(r"\*\*batch_size=64 \(lr=0\.05\)\*\* vs reference \(Good method\): Accuracy lower \(worse\), "
                     r"Δ = -0\.02\d+, p (?:= [\d.]+|< 0\.0001) after Holm", md)
    assert re.search(r"batch_size=256 .*Accuracy: no significant difference", md)


def test_methods_from_different_trials_pair_by_seed_and_shared_params(report):
    _, md, _ = report
    section = md[md.index("## Study `wm`"):]
    comp = table_after(section, "paired comparisons against the baseline")
    comp = comp.set_index(["scenario", "attention", "Method"])
    d = np.subtract(WM["a", "attention"], WM["a", "base"])
    nums = [float(x) for x in re.findall(r"[-+][\d.]+", comp.loc[("a", "True", "attention"), "A − B [95% CI]"])]
    lo, hi = stats.t.interval(0.95, 1, loc=d.mean(), scale=stats.sem(d))
    assert nums == pytest.approx([d.mean(), lo, hi], abs=5e-5)
    assert len(comp) == 2  # one row per scenario: baseline has no comparison with itself


def test_search_study_ranks_trials_by_objective(report):
    _, md, _ = report
    ranked = table_after(md[md.index("## Study `tune`"):], "best 3 of 3 trials by val/good/acc (max)")
    assert ranked["lr"].tolist() == ["0.1", "0.01", "0.5"]
    assert ranked["val/good/acc"].tolist() == ["0.9500", "0.9100", "0.8000"]


def test_a_study_without_finished_trials_says_so(report):
    _, md, _ = report
    broken = md[md.index("## Study `broken`"):md.index("## Study `tune`")]
    assert "Not counted: seed 0: diverged" in broken and "_no finished trials with these metrics_" in broken
    assert "study `broken`: sweep fam-broken-1: 1 diverged" in md


def test_single_run_and_best_configuration(report):
    _, md, _ = report
    assert "Every trial differs from the YAML defaults in: epochs=2" in md[md.index("## Study `tiny`"):]
    single = md[md.index("## Study `single`"):]
    assert "0.8000 (n=1, no interval)" in single
    best = table_after(md, "## Best configuration")
    assert best.loc[0, "Study"] == "single" and "(n=1, no interval)" in best.loc[0, "val/good/acc (max)"]
    assert "0.9900" in best.loc[0, "val/good/acc (max)"]  # 0.99 beats the search study's best single run (0.95)


def test_markdown_tables_are_github_tables_and_plots_are_pngs(report):
    rep, md, plots = report
    assert len(tables(md)) >= 10
    pngs = sorted(plots.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"fam-noise-noise_rate.png", "fam-headline-k.png", "fam-ab-batch_size.png", "fam-ab-cells.png"} <= names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"]({plots.name}/{p.name})" in md
    assert "Reliability diagrams: none. No trial of study `headline` logged `artifacts/reliability.json`" in md
    assert "nan" not in md.lower() and "inf" not in re.sub(r"info/", "", md.lower())


def test_csv_and_json_formats(report):
    rep, _, _ = report
    doc = json.loads(rep.json())
    assert any(s["title"] == "Claims" for s in doc["sections"])
    from io import StringIO

    frame = pd.read_csv(StringIO(rep.csv()))
    row = frame[(frame["study"] == "headline") & (frame["key"] == "test/good/acc")].iloc[0]
    assert row["n"] == 3 and row["mean"] == pytest.approx(np.mean(np.add(BASE_ACC, GOOD_GAIN)))
    assert row["ci_high"] - row["mean"] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem(np.add(BASE_ACC, GOOD_GAIN)))


def test_cli_report_formats_and_artifacts(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = tmp_path / "busy.md"
    result = runner.invoke(main, ["report", "busy_loop", "--tracking-uri", store["uri"], "--out", str(out),
                                  "--sweep", "busy_loop-smoke-1"])
    assert result.exit_code == 0, result.output
    md = out.read_text()
    table = table_after(md, "Headline: study `smoke`").set_index(["lr", "Method"])
    values = [expected_acc({"seed": s, "lr": 0.2}, 3) for s in (0, 1)]
    expect_interval(table.loc[("0.2", "busy"), "Accuracy"], values)
    assert (tmp_path / "busy_plots" / "busy_loop-smoke-lr.png").exists()
    artifacts = {a.path for a in MlflowClient(store["uri"]).list_artifacts(store["busy_parent"])}
    assert {"busy.md", "plots"} <= artifacts
    result = runner.invoke(main, ["report", "--all", "--tracking-uri", store["uri"], "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["sections"][0]["title"] == "Cross-family summary"
    result = runner.invoke(main, ["report", "busy_loop", "--tracking-uri", store["uri"], "--sweep", "nope"])
    assert result.exit_code == 2 and "no finished trial runs of busy_loop, sweep nope" in result.output
    result = runner.invoke(main, ["report", "--tracking-uri", store["uri"]])
    assert result.exit_code == 2 and "name a FAMILY or --all" in result.output
    result = runner.invoke(main, ["report", "busy_loop"])  # no store here: one clear line, nothing created
    assert result.exit_code == 2 and "no MLflow store" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy.md", "busy_plots"]


def test_shipped_claims_and_report_keys_parse():
    from orchestrator.claims import parse_claims
    from orchestrator.spaces import available_families, load_family_file

    for family in available_families():
        doc = load_family_file(family)  # checks report: and claims: (orchestrator.report_config.check_settings)
        for claim in parse_claims(doc, family):
            assert claim.study in doc["studies"], (family, claim.text)
    assert len(parse_claims(load_family_file("attn_knn"), "attn_knn")) >= 4


@pytest.mark.parametrize("entry, message", [
    ({"claim": "x", "study": "nope", "compare": {"metric": "test/a/acc"}}, "unknown study 'nope'"),
    ({"claim": "x", "compare": {"metric": "acc"}}, "is not a metric key"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "where": {"nokey": 1}}}, "unknown config key(s) ['nokey']"),
    ({"claim": "x", "compare": {"metric": "test/a/acc"}, "threshold": {"metric": "perf/x_ms", "below": 1}}, "exactly one"),
    ({"claim": "x", "threshold": {"metric": "perf/x_ms", "below": "1"}}, "must be a number"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "better": "up"}}, "higher or lower"),
    ({"claim": "x", "compare": {"metric": "test/a/acc"}}, "both sides are the same"),
    ({"claim": "x", "compare": {"metric": "test/a/acc", "baseline": "test/b/acc"}, "drop": {"param": "lr"}}, "{param, from, to}"),
])
def test_malformed_claims_are_one_clear_error(entry, message):
    from orchestrator.claims import parse_claims
    from orchestrator.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        parse_claims({**DOC, "claims": [entry]}, "fam")


def test_report_opens_with_the_headline_table_and_sentences_read_from_the_tables(report):
    _, md, _ = report
    sections = re.findall(r"^## (.+)$", md, flags=re.M)
    assert sections[:3] == ["Headline: study `headline`", "Summary", "Claims"]
    summary = md[md.index("## Summary"):md.index("## Claims")]
    good = np.add(BASE_ACC, GOOD_GAIN)
    assert "the best method is **Good method**, " + f"{good.mean():.4f} ± " in summary
    raw = [stats.ttest_rel(good, BASE_ACC).pvalue, stats.ttest_rel(np.subtract(BASE_ECE, GOOD_ECE_CUT), BASE_ECE).pvalue]
    adj = holm(np.array(raw))
    assert (f"Significant against the baseline base (paired t-test over seeds, Holm over the table's tests): "
            f"Good method Accuracy higher (better, Δ = +0.0500, p = {adj[0]:.4f}); "
            f"Good method ECE lower (better, Δ = -0.0250, p = {adj[1]:.4f})") in summary
    assert "No test possible: same Accuracy (identical in every seed)" in summary
    assert "Claims: 2 INCONCLUSIVE, 3 INVALIDATED, 3 VALIDATED." in summary
    assert "“good beats base with two seeds” (not significant after Holm (alpha 0.05), n=2)" in summary
    assert md.count("No Wilcoxon signed-rank p-values") == 1 and "`headline` (n ≤ 3)" in summary
    assert "Wilcoxon p (Holm)" not in md  # no study here has 6 seeds


@pytest.mark.parametrize("n", range(1, 9))
def test_wilcoxon_can_decide_exactly_when_its_smallest_p_is_below_alpha(n):
    from orchestrator.stats import wilcoxon_can_decide

    smallest = stats.wilcoxon(np.arange(1.0, n + 1)).pvalue  # every difference positive: the smallest exact p
    assert wilcoxon_can_decide(n) == (smallest < 0.05)


def test_headline_text_is_what_the_report_opens_with(store):
    from types import SimpleNamespace

    from orchestrator.report import headline_text

    outcome = SimpleNamespace(tracking_uri=store["uri"], sweep_id="busy_loop-smoke-1")
    text = headline_text(outcome, SimpleNamespace(family="busy_loop"))
    assert text.startswith("# busy_loop (sweep busy_loop-smoke-1)") and "## Summary" in text
    assert "| 0.2 | busy |" in text and "## Claims" not in text
    assert headline_text(SimpleNamespace(tracking_uri=store["uri"], sweep_id="nope"), SimpleNamespace(family="busy_loop")) == ""
