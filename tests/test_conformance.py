"""Every registered family honours the family contract, so a new family gets these checks for free.

For each family, on its ``smoke`` study's first trial config (at least two epochs, CPU):

* its module imports without Ray or MLflow;
* every reported name follows the metric contract (``<split>/<method>/<metric>``, ``perf/...``,
  ``info/...``, or the bookkeeping keys), every value a finite number;
* a run resumed from each mid-run checkpoint reports exactly what an uninterrupted run reports
  (timings aside), and a run resumed from its final checkpoint reports nothing more;
* a NaN in the model's parameters (so a NaN loss) ends in a ``diverged`` report;
* ``check`` accepts the config and refuses each of the family's ``INVALID_CONFIGS``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from orchestrator.registry import families, family_code
from orchestrator.spaces import load_study
from trainables.common.checks import ConfigError
from trainables.common.metrics import parse_metric_key

BOOKKEEPING = {"epoch", "diverged"}
FAMILIES = sorted(families())


def family_config(family: str, tmp_path) -> dict:
    study = load_study(family, "smoke")
    config = dict(study.trial_configs()[0])
    config["eval"] = dict(study.eval_axes)
    config["device"] = "cpu"
    config["artifact_dir"] = str(tmp_path / "artifacts")
    if "epochs" in config:
        config["epochs"] = max(2, int(config["epochs"]))
    if "min_epochs" in config:
        config["min_epochs"] = config["epochs"]  # no early stop: every epoch reports
    return config


class Stop(Exception):
    """The worker dies right after a report."""


def run(train, config: dict, restore=None, stop_after: int | None = None) -> list[tuple[dict, dict | None]]:
    reports = []

    def report(metrics, checkpoint=None):
        reports.append((dict(metrics), checkpoint))
        if stop_after is not None and len(reports) == stop_after:
            raise Stop

    try:
        train(dict(config), report, restore)
    except Stop:
        pass
    return reports


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One full run per family, shared by the checks below."""
    cache = {}

    def get(family):
        if family not in cache:
            config = family_config(family, tmp_path_factory.mktemp(family))
            cache[family] = (config, run(family_code(family).train, config))
        return cache[family]

    return get


def test_family_modules_import_without_ray_or_mlflow():
    modules = sorted({family_code(f).entrypoint.split(":")[0] for f in FAMILIES})
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps([m for m in ('ray', 'mlflow') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_reported_names_follow_the_metric_contract(family, uninterrupted):
    config, reports = uninterrupted(family)
    assert reports, "a trial reports at least once"
    for metrics, checkpoint in reports:
        assert isinstance(metrics.get("epoch"), int)
        assert checkpoint is not None, "every report carries a checkpoint"
        for key, value in metrics.items():
            assert key in BOOKKEEPING or key.startswith(("perf/", "info/")) or parse_metric_key(key), key
            assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    final = reports[-1][0]
    assert any(k.startswith("test/") for k in final), "the last report holds the test metrics"
    objective = load_study(family, "smoke").objective["metric"]
    assert objective in final


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_from_every_checkpoint_reports_what_an_uninterrupted_run_reports(family, uninterrupted):
    config, full = uninterrupted(family)
    train = family_code(family).train
    expected = [comparable(m) for m, _ in full]
    for cut in range(1, len(full)):
        torch.manual_seed(12345)  # whatever ran before in this process must not matter
        rest = run(train, config, restore=full[cut - 1][1])
        assert [comparable(m) for m, _ in rest] == expected[cut:], f"resumed after report {cut}"
    assert run(train, config, restore=full[-1][1]) == [], "a finished trial does not run again"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_nan_loss_ends_in_a_diverged_report(family, tmp_path, uninterrupted):
    uninterrupted(family)  # warm the feature cache first: the hook below would poison an encoder trained now
    config = family_config(family, tmp_path)
    if "diverge_at_epoch" in config:  # no model to break: the family has its own switch
        config["diverge_at_epoch"] = 1
        reports = run(family_code(family).train, config)
    else:
        def poison(optimizer, args, kwargs):
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

        handle = register_optimizer_step_post_hook(poison)
        try:
            reports = run(family_code(family).train, config)
        finally:
            handle.remove()
    assert reports and reports[-1][0].get("diverged") == 1.0
    assert all(not m.get("diverged") for m, _ in reports[:-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_check_accepts_the_smoke_config_and_refuses_bad_ones(family, tmp_path):
    check = family_code(family).check
    if check is None:
        pytest.skip(f"{family} declares no cross-field rules")
    config = family_config(family, tmp_path)
    check(config)
    invalid = getattr(sys.modules[family_code(family).entrypoint.split(":")[0]], "INVALID_CONFIGS", [])
    assert invalid, f"{family} has a check but no INVALID_CONFIGS examples to hold it to"
    for overrides in invalid:
        with pytest.raises(ConfigError):
            check({**config, **overrides})
