"""The search-space compiler: expansion of grid x seeds x derive, and every rejected input."""

import math
import textwrap

import pytest

from orchestrator.errors import UsageError
from orchestrator.spaces import available_families, derive_params, load_study
from orchestrator.runner import param_space


def test_every_shipped_study_compiles():
    for family in available_families():
        from orchestrator.spaces import load_family_file

        for name in load_family_file(family)["studies"]:
            study = load_study(family, name)
            assert study.num_trials >= 1
            assert study.trial_configs(), (family, name)


def test_grid_times_seeds_with_derived_lr():
    study = load_study("busy_loop", "scaling")
    configs = study.trial_configs()
    assert study.num_trials == len(configs) == 2 * 3 * 1
    by_cell = {(c["batch_size"], c["lr_rule"]): c["lr"] for c in configs}
    assert by_cell[(256, "linear")] == pytest.approx(0.1 * 2)
    assert by_cell[(256, "sqrt")] == pytest.approx(0.1 * math.sqrt(2))
    assert by_cell[(64, "linear")] == pytest.approx(0.05)
    assert by_cell[(64, "sqrt")] == pytest.approx(0.1 * math.sqrt(0.5))
    assert by_cell[(64, "none")] == by_cell[(256, "none")] == pytest.approx(0.1)


def test_seeds_multiply_grid_and_eval_axes_stay_in_one_trial():
    study = load_study("busy_loop", "smoke")
    assert study.seeds == [0, 1]
    assert study.num_trials == 4
    assert study.eval_axes == {"k": [1, 5]}
    space = param_space(study)
    assert space["eval"] == {"k": [1, 5]}  # one trial evaluates every k
    assert space["seed"] == {"grid_search": [0, 1]}


def test_derive_rules():
    rule = {"rule_from": "lr_rule", "reference_batch": 128, "reference_value": 1e-3, "batch_key": "batch_size"}
    for name, factor in (("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)):
        cfg = derive_params({"batch_size": 512, "lr_rule": name, "lr": 0.5}, {"lr": rule})
        assert cfg["lr"] == pytest.approx(1e-3 * factor)


def test_cli_overrides_are_coerced_to_the_default_type():
    study = load_study("busy_loop", "smoke", {"epochs": "5", "lr": "1e-3", "seconds_per_epoch": "0"})
    assert study.base["epochs"] == 5 and study.base["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("family, study, overrides, message", [
    ("nope", None, {}, "unknown family 'nope'"),
    ("busy_loop", "nope", {}, "unknown study 'nope'"),
    ("busy_loop", None, {"no_such_key": "1"}, "unknown key 'no_such_key'"),
    ("busy_loop", None, {"epochs": "three"}, "expected int"),
    ("busy_loop", None, {"lr": "-0.1"}, "lr=-0.1 is out of range"),
    ("busy_loop", None, {"lr": "0"}, "must be > 0"),
    ("busy_loop", None, {"lr_rule": "cubic"}, "not one of"),
])
def test_bad_input_is_one_clear_error(family, study, overrides, message):
    with pytest.raises(UsageError, match=message):
        load_study(family, study, overrides)


def _write(tmp_path, text):
    (tmp_path / "fam.yaml").write_text(textwrap.dedent(text))
    return tmp_path


BASE = """
family: fam
objective: {metric: val/x/acc, mode: max}
defaults: {dataset: digits, lr: 0.1, epochs: 1, noise_rate: 0.0, batch_size: 8, lr_rule: none}
params:
  k: {min: 1}
  noise_rate: {min: 0, max: 1, exclusive_max: true}
  lr: {min: 0, exclusive_min: true}
studies:
"""


@pytest.mark.parametrize("study_yaml, message", [
    ("  s: {eval: {k: [0, 5]}}", "k=0 is out of range"),
    ("  s: {grid: {noise_rate: [0.0, 1.0]}}", "noise_rate=1.0 is out of range"),
    ("  s: {grid: {lr: 0.1}}", "expected a non-empty list"),
    ("  s: {space: {lr: {loguniform: [0, 1]}}}", "loguniform needs low > 0"),
    ("  s: {space: {lr: {gaussian: [0, 1]}}}", "expected one of"),
    ("  s: {search: optuna, grid: {lr: [0.1]}, space: {epochs: {randint: [1, 3]}}}", "search optuna needs"),
    ("  s: {scheduler: hyperband}", "not one of"),
    ("  s: {seeds: 0}", "at least 1 seed"),
    ("  s: {eval: {lr: [0.1]}}", "is a training parameter"),
    ("  s: {derive: {lr: {rule: cubic, reference_batch: 8, reference_value: 0.1}}}", "not one of"),
    ("  s: {derive: {lr: {rule_from: lr_rule, reference_batch: 8}}}", "needs reference_batch"),
    ("  s: {bogus: 1}", "unknown key"),
    ("  s: {grid: {lr: [0.1}", "malformed YAML"),
])
def test_bad_yaml_is_rejected_before_anything_starts(tmp_path, monkeypatch, study_yaml, message):
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, BASE + study_yaml + "\n")))
    with pytest.raises(UsageError, match=message):
        load_study("fam", "s")
