"""The search-space compiler: expansion of grid x seeds x derive, and every rejected input."""

import math
import textwrap

import pytest

from orchestrator.errors import UsageError
from orchestrator.runner import param_space
from orchestrator.spaces import available_families, checked_configs, derive_params, load_family_file, load_study


def test_every_shipped_study_compiles():
    for family in available_families():
        for name in load_family_file(family)["studies"]:
            study = load_study(family, name)  # also runs the family's check on every trial config
            assert study.num_trials >= 1
            assert study.trial_configs(), (family, name)
            assert study.entrypoint == f"trainables.{family}:train"


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
    ("busy_loop", None, {"lr": "nan"}, "--set lr=nan: not a finite number"),
    ("busy_loop", None, {"lr": "-inf"}, "not a finite number"),
])
def test_bad_input_is_one_clear_error(family, study, overrides, message):
    with pytest.raises(UsageError, match=message):
        load_study(family, study, overrides)


CODE = """
from trainables.common.checks import ConfigError


def train(config, report, restore=None):
    report({"epoch": 1, "val/x/acc": 1.0})


def check(config):
    if config["batch_size"] % 4:
        raise ConfigError(f"batch_size {config['batch_size']} must be a multiple of 4")
    if config["lr"] * config["epochs"] > 10:
        raise ConfigError(f"lr {config['lr']:g} x epochs {config['epochs']} is more than 10")
"""


def _write(tmp_path, text, monkeypatch=None):
    (tmp_path / "fam.yaml").write_text(textwrap.dedent(text))
    (tmp_path / "fam_code.py").write_text(CODE)
    if monkeypatch is not None:  # another test's fam_code.py may be imported already
        monkeypatch.delitem(__import__("sys").modules, "fam_code", raising=False)
    return tmp_path


BASE = """
family: fam
entrypoint: fam_code:train
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
    ("  s: {grid: {lr: [0.1, .nan]}}", r"fam.yaml.studies.s.grid.lr\[1\]: nan is not a finite number"),
    ("  s: {set: {noise_rate: .inf}}", "inf is not a finite number"),
    # the family's own check, on every grid point x seed, numbered as --dry-run numbers trials
    ("  s: {grid: {batch_size: [8, 6]}, seeds: 2}", r"fam.yaml studies.s trial 2 \(batch_size=6 seed=0\): "
                                                   "batch_size 6 must be a multiple of 4"),
    # space studies: every combination of the distributions' bounds
    ("  s: {space: {lr: {loguniform: [0.01, 2.0]}, epochs: {randint: [1, 7]}}}", r"\(lr=2.0 epochs=6 seed=0\): "
                                                                               "lr 2 x epochs 6 is more than 10"),
    ("  s: {space: {batch_size: {choice: [8, 12, 10]}}}", "batch_size 10 must be"),
])
def test_bad_yaml_is_rejected_before_anything_starts(tmp_path, monkeypatch, study_yaml, message):
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, BASE + study_yaml + "\n", monkeypatch)))
    with pytest.raises(UsageError, match=message):
        load_study("fam", "s")


LISTS = BASE.replace("lr_rule: none}", "lr_rule: none, cuts: [0.5, 2], names: [a, b], table: [1, 0], mixed: [1, a]}") \
            .replace("params:\n", "params:\n  cuts: {min: 0}\n")


@pytest.mark.parametrize("study_yaml, message", [
    ("  s: {set: {cuts: [false, true]}}", r"s\.set: cuts\[0\]=False has the wrong type \(expected float\)"),
    ("  s: {set: {cuts: 0.5}}", r"cuts=0\.5 has the wrong type \(expected list\)"),
    ("  s: {set: {cuts: null}}", r"cuts=None has the wrong type \(expected list\)"),
    ("  s: {grid: {names: [[a, b], [a, 3]]}}", r"names\[1\]=3 has the wrong type \(expected str\)"),
    ("  s: {set: {table: [1, 0.5]}}", r"table\[1\]=0\.5 has the wrong type \(expected int\)"),
    ("  s: {set: {table: [1, true]}}", r"table\[1\]=True has the wrong type \(expected int\)"),
    ("  s: {set: {cuts: [0.5, -1]}}", r"cuts\[1\]=-1\.0 is out of range \(must be >= 0\)"),
    ("  s: {space: {cuts: {choice: [[0.5, 1], [1, yes]]}}}", r"cuts\[1\]=True has the wrong type"),
])
def test_list_knobs_take_lists_of_their_defaults_element_type(tmp_path, monkeypatch, study_yaml, message):
    """A list default types its elements as a scalar default types its value (booleans are not
    numbers), and ``params`` rules apply to each element."""
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, LISTS + study_yaml + "\n", monkeypatch)))
    with pytest.raises(UsageError, match=message):
        load_study("fam", "s")


def test_list_knob_elements_are_coerced_like_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, LISTS + "  s: {set: {cuts: [1, 3], mixed: [true, 2.5]}}\n",
                                                             monkeypatch)))
    study = load_study("fam", "s", {"names": "[x, y, z]"})
    assert study.base["cuts"] == [1.0, 3.0] and all(type(c) is float for c in study.base["cuts"])
    assert study.base["mixed"] == [True, 2.5]  # a default of mixed elements types the list only
    assert study.base["names"] == ["x", "y", "z"]


def test_check_failure_names_the_cli_override(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, BASE + "  s: {seeds: 1}\n", monkeypatch)))
    with pytest.raises(UsageError, match=r"trial 0 \(seed=0; --set batch_size=6\): batch_size 6 must"):
        load_study("fam", "s", {"batch_size": "6"})
    assert load_study("fam", "s", {"batch_size": "12"}).base["batch_size"] == 12


def test_checked_configs_are_what_the_trainable_receives(tmp_path, monkeypatch):
    """Each config the check sees is a trial's: grid point, seed, derived lr, eval axes, device."""
    study_yaml = ("  s: {grid: {batch_size: [8, 16]}, seeds: 2, eval: {k: [1, 3]},\n"
                  "      derive: {lr: {rule: linear, reference_batch: 8, reference_value: 0.1}}}\n")
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(_write(tmp_path, BASE + study_yaml, monkeypatch)))
    study = load_study("fam", "s")
    checked = checked_configs(study)
    assert [label for label, _ in checked] == ["batch_size=8 seed=0", "batch_size=8 seed=1",
                                                "batch_size=16 seed=0", "batch_size=16 seed=1"]
    space = param_space(study)
    for (_, config), planned in zip(checked, study.trial_configs()):
        assert config == {**planned, "eval": space["eval"], "device": space["device"]}
    assert [c["lr"] for _, c in checked] == pytest.approx([0.1, 0.1, 0.2, 0.2])
