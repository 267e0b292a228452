"""Reliability diagrams in the report, end to end: per-bin artifacts written by the family
lifecycle helper from a real classifier (scikit-learn on digits), logged into a real MLflow
store the way the runner logs a trial's ``artifacts/``, read back by the report; and bounded
intervals clipped in its tables. The integration check (the store costs ~12 s, the Ray sweep
~30 s); orchestrator/reliability.py's own fast tests, the ones bench/mutation.py runs, are in
tests/test_reliability.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from orchestrator.reliability import diagrams, read_artifacts
from orchestrator.report_build import build_report
from orchestrator.report_data import CLIPPED_NOTE, Interval
from orchestrator.tracking import SweepTracker
from trainables.common.lifecycle import Trial
from trainables.common.metrics import ECE_BINS, classification_metrics, metric_key

SEEDS = [0, 1, 2]
TEMPERATURES = [0.5, 2.0]  # an eval axis that changes calibration: softmax(logits / T)
CLIP_ACC = [0.99, 1.0, 0.97]  # a 95% t-interval over these reaches past 1
CLIP_ECE = [0.001, 0.02, 0.003]  # ... and below 0

DOC = {
    "family": "rel", "description": "logistic regression on digits", "objective": {"metric": "val/logreg/acc", "mode": "max"},
    "default_study": "headline", "defaults": {"dataset": "digits", "C": 1.0},
    "report": {"headline_metrics": ["acc", "ece"], "labels": {"logreg": "LogReg"}},
    "studies": {"headline": {"description": "three seeds", "seeds": 3, "eval": {"temperature": TEMPERATURES}},
                "clip": {"description": "near the bounds", "seeds": 3}},
}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def one_trial(seed: int, artifact_dir) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """A real model per seed (its own split); metrics as a family reports them; the reliability
    artifact written by the family-side helper."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed)
    model = LogisticRegression(C=0.05, max_iter=300).fit(x_train, y_train)
    logits = model.decision_function(x_test)
    methods = {"logreg": softmax(logits)}
    methods.update({f"logreg:temperature:{t:g}": softmax(logits / t) for t in TEMPERATURES})
    config = {"seed": seed, "artifact_dir": str(artifact_dir)}
    reports = []
    trial = Trial(config, lambda metrics, checkpoint=None: reports.append(metrics))
    metrics = {metric_key("val", "logreg", "acc"): float(model.score(x_train, y_train))}
    for method, probs in methods.items():  # the method part of a key carries its axes: logreg:temperature:2
        trial.reliability("test", method, probs, y_test)
        metrics.update({metric_key("test", method, m): v for m, v in classification_metrics(probs, y_test).items()})
    trial.report(1, metrics, done=True)
    return reports[0], {m: (p, y_test) for m, p in methods.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = SweepTracker(uri, "rel", "rel-headline-1", tags={"family": "rel", "study": "headline", "dataset": "digits",
                                                               "git_commit": "test"})
    raw, run_ids = {}, {}
    for seed in SEEDS:
        artifacts = root / f"trial{seed}" / "artifacts"
        metrics, raw[seed] = one_trial(seed, artifacts)
        if seed == 2:  # a family whose logged ECE disagrees with its bins must be caught
            metrics["test/logreg/ece"] += 0.01
        run_id = tracker.child(f"t{seed}", {"dataset": "digits", "C": 0.05, "seed": seed,
                                             "eval": {"temperature": TEMPERATURES}}, {"seed": seed, "dataset": "digits"})
        tracker.log_result(run_id, metrics, 1)
        tracker.log_artifacts(run_id, artifacts, "artifacts")  # what the runner does with a trial's artifacts/
        tracker.set_tags(run_id, {"status": "finished"})
        tracker.finish(run_id)
        run_ids[seed] = run_id
    tracker.finish(tracker.parent_id)
    clip = SweepTracker(uri, "rel", "rel-clip-1", tags={"family": "rel", "study": "clip", "dataset": "digits",
                                                         "git_commit": "test"})
    for seed, acc, ece in zip(SEEDS, CLIP_ACC, CLIP_ECE):
        run_id = clip.child(f"c{seed}", {"dataset": "digits", "C": 0.05, "seed": seed}, {"seed": seed})
        clip.log_result(run_id, {"test/logreg/acc": acc, "test/logreg/ece": ece}, 1)
        clip.set_tags(run_id, {"status": "finished"})
        clip.finish(run_id)
    plots = root / "plots"
    report = build_report(uri, "rel", plots_dir=plots, link_base=root, docs={"rel": DOC})
    return {"uri": uri, "raw": raw, "run_ids": run_ids, "plots": plots, "md": report.markdown()}


def independent_bins(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin count, mean confidence, accuracy with numpy's digitize (bins (b/15, (b+1)/15])."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    idx = np.clip(np.digitize(conf, np.linspace(0, 1, ECE_BINS + 1), right=True) - 1, 0, ECE_BINS - 1)
    count = np.bincount(idx, minlength=ECE_BINS)
    with np.errstate(invalid="ignore"):
        return (count, np.bincount(idx, conf, ECE_BINS) / count, np.bincount(idx, correct.astype(float), ECE_BINS) / count)


def test_the_report_reads_the_logged_bins_and_their_ece_equals_the_logged_ece(store):
    client = MlflowClient(store["uri"])
    artifacts = read_artifacts(store["uri"], list(store["run_ids"].values()))
    assert len(artifacts) == len(SEEDS)
    logged = {}
    for seed, run_id in store["run_ids"].items():
        metrics = client.get_run(run_id).data.metrics
        logged.update({(run_id, k): v for k, v in metrics.items() if k.endswith("/ece")})
        doc = artifacts[run_id]
        assert doc["bins"] == ECE_BINS and set(doc["splits"]["test"]) == {"logreg", "logreg:temperature:0.5",
                                                                           "logreg:temperature:2"}
        for method, (probs, labels) in store["raw"][seed].items():
            entry = doc["splits"]["test"][method]
            count, conf, acc = independent_bins(probs, labels)
            assert entry["count"] == count.tolist()
            filled = count > 0
            assert np.allclose(np.array(entry["confidence"], dtype=float)[filled], conf[filled], atol=1e-12)
            assert np.allclose(np.array(entry["accuracy"], dtype=float)[filled], acc[filled], atol=1e-12)
            assert all(entry["accuracy"][b] is None for b in np.flatnonzero(~filled))
            ece_from_logged_bins = float(np.sum(count[filled] / count.sum() * np.abs(acc[filled] - conf[filled])))
            expected = metrics[f"test/{method}/ece"] - (0.01 if seed == 2 and method == "logreg" else 0.0)
            assert ece_from_logged_bins == pytest.approx(expected, abs=1e-12)
    seeds = {run_id: str(seed) for seed, run_id in store["run_ids"].items()}
    found = {d.method: d for d in diagrams(artifacts, logged, seeds)}
    plain = found["logreg"]
    assert plain.runs == 3 and len(plain.mismatched) == 1 and plain.mismatched[0].startswith("seed 2: bins give")
    assert not found["logreg:temperature:2"].mismatched
    # the mean over seeds of a bin's accuracy, and its band, against scipy over the seeds with that bin filled
    b = int(np.argmax(plain.count))
    per_seed = [independent_bins(*store["raw"][s]["logreg"]) for s in SEEDS]
    values = [acc[b] for count, _, acc in per_seed if count[b]]
    assert plain.accuracy[b] == pytest.approx(np.mean(values))
    assert plain.count[b] == pytest.approx(np.mean([count[b] for count, _, _ in per_seed]))
    if len(values) > 1 and np.ptp(values) > 0:
        lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert plain.accuracy_low[b] == pytest.approx(max(lo, 0.0)) and plain.accuracy_high[b] == pytest.approx(min(hi, 1.0))


def test_headline_report_draws_one_diagram_per_method_and_the_temperature_pair(store):
    md, plots = store["md"], store["plots"]
    names = {"rel-headline-reliability-logreg.png", "rel-headline-reliability-logreg-temperature.png"}
    # the axis variants are shown by the pair, not each on its own
    assert {p.name for p in plots.glob("rel-headline-reliability-*.png")} == names
    for name in names:
        path = plots / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10000
        assert f"](plots/{name})" in md
    assert "Reliability diagrams: 3 of 3 trials logged per-bin data" in md
    assert "ECE from the logged bins differs from the logged ECE: logreg: seed 2: bins give" in md
    assert "temperature 0.5 vs 2" in md  # the before/after pair's title
    assert "rel-clip-reliability" not in md  # only the headline study gets diagrams


def test_bounded_intervals_are_clipped_in_tables_with_a_footnote(store):
    acc = Interval.of(CLIP_ACC, "test/logreg/acc")
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(CLIP_ACC), scale=stats.sem(CLIP_ACC))
    assert hi > 1 and acc.clipped and acc.low == pytest.approx(lo) and acc.high == 1.0
    ece = Interval.of(CLIP_ECE, "test/logreg/ece")
    assert stats.t.interval(0.95, 2, loc=np.mean(CLIP_ECE), scale=stats.sem(CLIP_ECE))[0] < 0 and ece.low == 0.0
    loss = Interval.of([-1.0, 0.5, 2.0], "train/logreg/loss")  # no bounds in the metric table: never clipped
    assert not loss.clipped and math.isclose(loss.high - loss.mean, loss.mean - loss.low)
    md = store["md"]
    clip = md[md.index("## Study `clip`"):]
    assert f"{np.mean(CLIP_ACC):.4f} [{lo:.4f}, 1.0000] (n=3)" in clip
    assert f"[0.0000, " in clip and CLIPPED_NOTE in clip
    assert "± " not in clip.split("**")[2]  # both cells of the clip table are clipped


FAMILY_PY = '''
"""Logistic regression on digits; the temperature of its softmax is an eval axis."""

from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from trainables.common.lifecycle import Trial
from trainables.common.metrics import classification_metrics, metric_key


def softmax(z):
    import numpy as np

    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def train(config, report, restore=None):
    trial = Trial(config, report, restore)
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x / 16.0, y, test_size=0.3, random_state=config["seed"])
    for epoch in trial.epochs(1):
        model = LogisticRegression(C=config["C"], max_iter=200).fit(x_train, y_train)
        logits = model.decision_function(x_test)
        metrics = {metric_key("val", "logreg", "acc"): float(model.score(x_train, y_train))}
        for t in [None] + list(config["eval"].get("temperature", [])):
            method = "logreg" if t is None else metric_key("test", "logreg", "x", temperature=t).split("/")[1]
            probs = softmax(logits if t is None else logits / t)
            trial.reliability("test", method, probs, y_test)
            metrics.update({f"test/{method}/{k}": v for k, v in classification_metrics(probs, y_test).items()})
        trial.report(epoch, metrics, done=True)
'''

FAMILY_YAML = {
    "entrypoint": "relfam:train", "family": "relfam", "description": "logistic regression, temperature as an eval axis",
    "objective": {"metric": "val/logreg/acc", "mode": "max"}, "default_study": "headline",
    "defaults": {"dataset": "digits", "C": 0.05}, "report": {"headline_metrics": ["acc", "ece"]},
    "studies": {"headline": {"description": "two seeds", "seeds": 2, "eval": {"temperature": [0.5, 2.0]}}},
}


def test_a_sweep_through_ray_logs_the_bins_and_its_report_draws_them(tmp_path, monkeypatch):
    """The whole path: the family writes artifacts/reliability.json into config["artifact_dir"],
    Tune copies it to the trial's storage folder, the MLflow callback logs it, the sweep's report
    draws the diagrams beside its other plots."""
    import ray
    import yaml
    from click.testing import CliRunner

    from orchestrator.cli import main

    spaces = tmp_path / "spaces"
    spaces.mkdir()
    (spaces / "relfam.py").write_text(FAMILY_PY)
    (spaces / "relfam.yaml").write_text(yaml.safe_dump(FAMILY_YAML, sort_keys=False))
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(spaces))
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        result = CliRunner().invoke(main, ["sweep", "relfam", "--tracking-uri", uri, "--storage", str(tmp_path / "runs")])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    reports = list((tmp_path / "runs").glob("relfam-headline-*/report.md"))
    assert len(reports) == 1, result.output
    report = reports[0]
    md = report.read_text()
    assert "Reliability diagrams: 2 of 2 trials logged per-bin data" in md and "differs from the logged ECE" not in md
    for name in ("relfam-headline-reliability-logreg.png", "relfam-headline-reliability-logreg-temperature.png"):
        png = report.parent / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"](plots/{name})" in md
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("relfam").experiment_id], "tags.role = 'trial'")
    assert len(children) == 2
    for run in children:
        assert "artifacts/reliability.json" in {a.path for a in client.list_artifacts(run.info.run_id, "artifacts")}
