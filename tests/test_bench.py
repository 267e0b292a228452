"""The benchmarks' own logic: the studies they compile, the cells they compare, the pool
baseline, the kNN bench end to end (small), and the GPU check's CPU dry run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is scripts, not an installed package

from bench import eval_axes, gpu_check, overhead  # noqa: E402
from bench._common import store_mib, sweep_measured, trial_runs, write_spaces  # noqa: E402
from orchestrator.spaces import load_study  # noqa: E402
from trainables.common.metrics import metric_key  # noqa: E402


def run_script(*args, timeout=300):
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout.strip().splitlines()


def test_eval_axes_studies_compile(tmp_path, monkeypatch):
    """The naive study is one trial per cell with no eval axes; the axes study one trial per seed."""
    spaces = write_spaces(tmp_path, "attn_knn", eval_axes.bench_studies([1, 5, 16], [1, 5], 3, {"epochs": 2}), drop_eval=True)
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(spaces))
    axes, naive = load_study("attn_knn", "axes"), load_study("attn_knn", "naive")
    assert axes.num_trials == 3 and axes.eval_axes == {"k": [1, 5, 16], "tta_views": [1, 5]}
    assert naive.num_trials == 18 and naive.eval_axes == {}
    cells = {(c["k_eval"], c["tta_eval"], c["seed"]) for c in naive.trial_configs()}
    assert len(cells) == 18 and all(c["epochs"] == 2 for c in naive.trial_configs())


def test_eval_axes_times_one_trials_train_alone(tmp_path):
    """The no-orchestration figure runs a study's own compiled trial (derived values and all)
    through the family's train() in a fresh process (here the naive grid's last, its dearest
    cell: largest k, most TTA views)."""
    settings = {"epochs": 1, "max_train": 60, "max_test": 30, "device": "cpu"}
    spaces = write_spaces(tmp_path, "attn_knn", eval_axes.bench_studies([1, 5], [1, 2], 1, settings), drop_eval=True)
    assert 0 < eval_axes.in_process_seconds("naive", spaces, 1, -1) < 120


def test_cells_compare_only_a_naive_trials_own_cell():
    def run(seed, metrics, **params):
        return {"params": {"seed": str(seed), **{k: str(v) for k, v in params.items()}}, "metrics": metrics, "seconds": 1.0}

    axes_metrics = {metric_key("test", "attn_knn", "acc", k=5, tta_views=2): 0.9,
                    metric_key("test", "attn_knn", "acc", k=5, tta_views=1): 0.8,
                    metric_key("test", "cnn", "acc", tta_views=2): 0.7, "test/attn_knn/acc": 0.8, "perf/epoch_ms": 3.0}
    naive_metrics = {metric_key("test", "attn_knn", "acc", k=5, tta_views=2): 0.9,
                     metric_key("test", "attn_knn", "acc", k=5, tta_views=1): 0.5,  # not this trial's cell: ignored
                     metric_key("test", "cnn", "acc", tta_views=2): 0.75}
    axes = eval_axes.cell_values([run(0, axes_metrics, k_eval=16, tta_eval=5)], naive=False)
    naive = eval_axes.cell_values([run(0, naive_metrics, k_eval=5, tta_eval=2)], naive=True)
    assert set(naive) == {(0, "test", "attn_knn", "5", "2", "acc"), (0, "test", "cnn", None, "2", "acc")}
    diff = eval_axes.compare(axes, naive)
    assert diff["compared"] == 2 and diff["nonzero"] == 1 and diff["missing"] == []
    assert diff["max"] == pytest.approx(0.05) and diff["where"][2] == "cnn"
    assert eval_axes.compare({}, naive)["missing"]  # a cell the eval-axes run lacks is reported


def test_pool_baseline_runs_the_sweeps_configs(tmp_path, monkeypatch):
    configs = overhead.trial_configs(2, 1, 0.2)
    studies = {"bench": {"description": "d", "seeds": 2, "set": {"epochs": 1, "seconds_per_epoch": 0.2}}}
    monkeypatch.setenv("ORCHESTRATE_SPACES_DIR", str(write_spaces(tmp_path, "busy_loop", studies, drop_eval=True)))
    assert [{**c, "eval": {}} for c in load_study("busy_loop", "bench").trial_configs()] == configs
    wall = overhead.pool_wall(configs, 2)  # checks every kernel's reported metrics itself
    assert 0.2 <= wall < 30


def test_trivial_blocks_are_the_gaps_between_every_hundredth_end():
    ends = [0.5, 1.0, 1.5, 2.0, 4.0, 6.0, 6.5]  # sorted trial ends; the 7th trial fills no block of 2
    assert overhead.block_times(ends, 2) == [1.0, 1.0, 4.0]
    assert overhead.block_times(ends[:1], 2) == []


@pytest.mark.slow
def test_plain_tune_baseline_runs_every_trial(tmp_path):
    """The baseline a Tune user would write: checks itself that each trial reported every epoch."""
    run = overhead.tune_run(tmp_path, trials=2, epochs=2, seconds=0.05, workers=2, reuse=True)
    assert 0.1 < run["wall"] < 300 and run["peak_mib"] > 50
    # each trial's end, from the first start, with the driver's memory then (what --trivial tabulates)
    assert len(run["ends"]) == 2 and 0 < run["ends"][0] <= run["ends"][1] < run["wall"]
    assert all(mib is not None and 50 < mib <= run["peak_mib"] for mib in run["rss"])


def test_knn_bench_quick_agrees_and_prints_the_ratio():
    lines = run_script("bench/knn.py", "--quick", "--n", "3000", "--queries", "300", "--repeats", "1", "--threads", "1")
    assert any("same neighbours as FAISS: True; queries with FAISS's class probabilities: project 100.00%" in line for line in lines)
    assert lines[-1].startswith("ratio project / raw FAISS total time:")


def test_gpu_check_reads_defaults_without_yaml():
    text = (ROOT / "search_spaces" / "attn_knn.yaml").read_text()
    assert gpu_check.parse_defaults(text) == yaml.safe_load(text)["defaults"]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run():
    lines = run_script("bench/gpu_check.py", "--cpu-dry-run", "--quick", "--pack", "0")
    assert "none imported" in lines[1]
    assert lines[-1].startswith("ratio cpu / cpu train() wall time:")


@pytest.mark.slow
def test_sweep_helper_times_a_real_sweep(tmp_path):
    studies = {"bench": {"description": "d", "seeds": 1, "set": {"epochs": 1, "seconds_per_epoch": 0.1}}}
    spaces = write_spaces(tmp_path, "busy_loop", studies, drop_eval=True)
    wall, uri, driver = sweep_measured("busy_loop", "bench", spaces, tmp_path / "work", 1)
    runs = trial_runs(uri, "busy_loop")
    assert len(runs) == 1 and runs[0]["metrics"]["test/busy/acc"] > 0 and 0.1 < runs[0]["seconds"] < wall
    # MiB of the driver alone: a Python process with Ray and MLflow loaded, sampled while the trial ran
    assert runs[0]["start"] < runs[0]["end"] and driver.peak_mib > 50 and 50 < driver.rss_at(runs[0]["end"]) <= driver.peak_mib
    assert 0 < store_mib(tmp_path / "work") < 50


@pytest.mark.slow
def test_attn_knn_bf16_path_runs(monkeypatch):
    """The CUDA path's bf16 autocast, with CPU autocast standing in: dtypes meet (bf16 forward,
    float32 bank and search), the losses stay finite, and the model still learns digits."""
    import torch

    from trainables import attn_knn

    monkeypatch.setattr(attn_knn, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    config = {**gpu_check.load_defaults(), "seed": 0, "device": "cpu", "epochs": 2, "max_train": 300, "max_test": 150,
              "mixup_alpha": 0.2, "eval": {"k": [5], "tta_views": [1, 2]}}
    reports = []
    attn_knn.train(config, lambda metrics, checkpoint=None: reports.append(metrics))
    assert "diverged" not in reports[-1] and reports[-1]["test/distance_knn/acc"] > 0.5


def test_mutmut_fixture_credit_gives_a_shared_fixtures_hits_to_every_test_that_uses_it(tmp_path):
    """mutmut gathers the functions hit since the last teardown into the test ending there; a
    module fixture runs in its first user's setup. With the plugin, every user of the fixture
    (and no other test) is mapped to what the fixture reached. Run in-process with a stand-in
    for mutmut's hit set and its teardown hook (mutmut is not a project dependency)."""
    from bench.mutmut_fixture_credit import FixtureCredit

    hits, by_test = set(), {}

    class Mutmut:  # mutmut's StatsCollector.pytest_runtest_teardown, as it is in mutmut 3.8
        def pytest_runtest_teardown(self, item, nextitem):
            by_test[item.name] = set(hits)
            hits.clear()

    (tmp_path / "test_shared.py").write_text(
        "import pytest\n"
        "import builtins\n"
        "@pytest.fixture(scope='module')\n"
        "def trained():\n"
        "    builtins.HITS.add('train')\n"
        "    return 1\n"
        "@pytest.fixture\n"
        "def uses_trained(trained):\n"
        "    return trained\n"
        "def test_first(trained):\n"
        "    builtins.HITS.add('evaluate')\n"
        "def test_reads_only(trained):\n"
        "    pass\n"
        "def test_through_another_fixture(uses_trained):\n"
        "    pass\n"
        "def test_unrelated():\n"
        "    builtins.HITS.add('other')\n")
    import builtins

    builtins.HITS = hits
    try:
        for active, expected in ((True, {"test_first": {"train", "evaluate"}, "test_reads_only": {"train"},
                                         "test_through_another_fixture": {"train"}, "test_unrelated": {"other"}}),
                                 (False, {"test_first": {"train", "evaluate"}, "test_reads_only": set(),
                                          "test_through_another_fixture": set(), "test_unrelated": {"other"}})):
            by_test.clear()
            code = pytest.main(["-q", "-p", "no:cacheprovider", str(tmp_path / "test_shared.py")],
                               plugins=[FixtureCredit(lambda: hits, lambda: active), Mutmut()])
            assert code == 0
            assert by_test == expected, active
    finally:
        del builtins.HITS


def test_mutation_names_the_functions_mutmut_cannot_mutate():
    """mutmut 3 skips every decorated function but a staticmethod or classmethod: the script
    names them (an evaluation under ``@torch.no_grad()`` was silently never mutated)."""
    from bench.mutation import decorated_functions

    source = ("import functools, torch\n"
              "@torch.no_grad()\ndef evaluate(x):\n    return x\n"
              "def plain(x):\n    return x\n"
              "def wrapped(x):\n    return x\n"
              "cached = functools.lru_cache()(wrapped)\n"
              "@functools.lru_cache(maxsize=8)\ndef boundaries(n):\n    return n\n"
              "@functools.total_ordering\nclass Thing:\n"
              "    @staticmethod\n    def make():\n        return 1\n"
              "    @classmethod\n    def build(cls):\n        return cls()\n"
              "    @property\n    def size(self):\n        return 1\n"
              "    def method(self):\n        return 2\n")
    assert decorated_functions(source) == ["evaluate", "boundaries", "size"]


def test_mutation_function_filter_selects_one_functions_mutants():
    """``--function`` becomes mutmut's own mutant names (mutmut 3.8: ``pkg.mod.x_NAME__mutmut_N``
    for a function, ``pkg.mod.xǁClassǁNAME__mutmut_N`` for a method); a look-alike's are not
    selected, and ``--function`` without ``--module`` is refused before anything runs."""
    from fnmatch import fnmatch

    from bench.mutation import main, mutant_globs

    names = ["trainables.subtask_meta.x_check__mutmut_1", "trainables.subtask_meta.x_check__mutmut_12",
             "trainables.subtask_meta.x__check_two__mutmut_1", "trainables.subtask_meta.x_precheck__mutmut_1",
             "trainables.wm_attention.xǁSmallCNNǁforward__mutmut_3", "trainables.wm_attention.x_forward_all__mutmut_1"]
    def chosen(module, functions):
        return [n for n in names if any(fnmatch(n, g) for g in mutant_globs(module, functions))]

    assert chosen("trainables/subtask_meta.py", ["check"]) == names[:2]
    assert chosen("trainables/wm_attention.py", ["forward"]) == [names[4]]
    assert chosen("trainables/wm_attention.py", ["forward*"]) == names[4:]
    assert chosen("trainables/subtask_meta.py", ["train"]) == []
    assert main(["--function", "check"]) == 2


def test_cheapest_first_orders_by_own_cost_plus_fixtures_not_yet_live():
    """Greedy: a test whose shared fixture is already live costs only itself; a module-scoped
    fixture dies when the tests move to another file, a session-scoped one does not."""
    from bench.mutmut_test_order import cheapest_first

    tests = ["a::slow", "a::uses_trained", "a::uses_trained_too", "b::fast", "b::session", "c::session_again", "c::new"]
    own = {"a::slow": 5.0, "a::uses_trained": 0.1, "a::uses_trained_too": 0.2, "b::fast": 0.01, "b::session": 0.5,
           "c::session_again": 0.3}
    fixture_cost = {"a::trained": 3.0, "::cluster": 2.0}
    fixtures = {t: [] for t in tests} | {"a::uses_trained": [("a::trained", "module")], "a::uses_trained_too": [("a::trained", "module")],
                                         "b::session": [("::cluster", "session")], "c::session_again": [("::cluster", "session")]}
    file_of = {t: t.split("::")[0] for t in tests}
    order = cheapest_first(tests, own, fixture_cost, fixtures, file_of)
    # c::new has no recorded cost (0) and goes first; c::session_again (2.3 with the cluster) before
    # b::session (2.5), which then costs 0.5; the trained run (3.1) before the 5 s test, and its
    # sibling right after it (0.2: the fixture is live)
    assert order == ["c::new", "b::fast", "c::session_again", "b::session", "a::uses_trained", "a::uses_trained_too", "a::slow"]
    # leaving file a tears its module fixture down: the sibling pays for it again
    assert cheapest_first(["a::uses_trained", "b::fast", "a::uses_trained_too"], {"a::uses_trained": 0.1, "b::fast": 0.0,
                          "a::uses_trained_too": 0.2}, fixture_cost, fixtures, file_of) == \
        ["b::fast", "a::uses_trained", "a::uses_trained_too"]
    assert cheapest_first([], own, fixture_cost, fixtures, file_of) == []


def test_mutmut_test_order_plugin_records_costs_then_runs_cheapest_first(tmp_path):
    """Through pytest itself: the stats pass (MUTANT_UNDER_TEST=stats) writes each test's cost
    and the module fixture's; a mutant run given the tests slow first runs them cheapest first,
    and stops at the first failure as mutmut's ``-x`` asks."""
    pytest.importorskip("mutmut")

    (tmp_path / "test_slow.py").write_text(
        "import time, pytest\n\n\n@pytest.fixture(scope='module')\ndef trained():\n    time.sleep(0.4)\n    return 1\n\n\n"
        "def test_reads_trained(trained):\n    open('order.log', 'a').write('reads_trained\\n')\n    assert trained\n\n\n"
        "def test_slow():\n    time.sleep(0.2)\n    open('order.log', 'a').write('slow\\n')\n")
    (tmp_path / "test_fast.py").write_text("import os\n\n\ndef test_fast():\n    open('order.log', 'a').write('fast\\n')\n"
                                           "    assert os.environ['MUTANT_UNDER_TEST'] != 'kills_fast'\n")
    ids = ["test_slow.py::test_reads_trained", "test_slow.py::test_slow", "test_fast.py::test_fast"]

    def pytest_run(mutant: str) -> list[str]:
        (tmp_path / "order.log").unlink(missing_ok=True)
        env = {**os.environ, "MUTANT_UNDER_TEST": mutant, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "bench.mutmut_test_order", *ids],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
        return (tmp_path / "order.log").read_text().split()

    assert pytest_run("stats") == ["reads_trained", "slow"] + ["fast"]      # the order given
    costs = json.loads((tmp_path / "mutmut-test-costs.json").read_text())
    assert costs["fixture_cost"]["test_slow.py::trained"] >= 0.4 > costs["own"]["test_slow.py::test_reads_trained"]
    assert costs["own"]["test_slow.py::test_slow"] >= 0.2 > costs["own"]["test_fast.py::test_fast"]
    assert pytest_run("some_mutant") == ["fast", "slow", "reads_trained"]
    assert pytest_run("kills_fast") == ["fast"]


def _tiny_project(root: Path) -> None:
    """A package of two functions and a test that leaves one mutant of ``clip`` alive (its upper
    bound is never checked), with the plugins bench/mutation.py loads into mutmut."""
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "bench").mkdir()
    for plugin in ("mutmut_fixture_credit.py", "mutmut_test_order.py"):
        (root / "bench" / plugin).write_text((ROOT / "bench" / plugin).read_text())
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "calc.py").write_text("def scale(x, k):\n    return x * k\n\n\n"
                                          "def clip(x):\n    return min(max(x, 0), 10)\n")
    (root / "tests" / "test_calc.py").write_text("from pkg.calc import clip, scale\n\n\n"
                                                 "def test_scale():\n    assert scale(3, 2) == 6\n\n\n"
                                                 "def test_clip():\n    assert clip(-1) == 0 and clip(4) == 4\n")
    (root / "pyproject.toml").write_text('[project]\nname = "tiny"\nversion = "0"\n')


def test_mutation_runs_only_what_is_not_known_and_keeps_the_record(tmp_path, monkeypatch):
    """A real mutmut run of a tiny project: the first run tries every mutant and records the
    kills; a survivor judged with ``--judge`` is skipped while its function is unchanged, and so
    are the recorded kills; ``--include-judged`` runs the judged ones (one a new test kills is
    reported as misjudged); after a function changes only its mutants run and its judgements
    lapse; ``--fresh`` runs everything again."""
    pytest.importorskip("mutmut")
    import bench.mutation as mutation
    import bench.mutation_record as record

    root, work = tmp_path / "project", tmp_path / "work"
    _tiny_project(root)
    monkeypatch.setattr(mutation, "ROOT", root)
    monkeypatch.setattr(mutation, "MODULES", {"pkg/calc.py": ["tests/test_calc.py"]})
    monkeypatch.setattr(record, "ROOT", root)
    monkeypatch.setattr(record, "LEDGER", tmp_path / "judged.json")
    monkeypatch.setattr(record, "KILLED", tmp_path / "killed.json")

    def run(**options):
        result = mutation.run_module("pkg/calc.py", work, 1, **options)
        assert "error" not in result, result
        return result

    first = run()
    everything, killed = first["mutants"], first["counts"]["killed"]
    survivors = [m.name for m in first["survivors"]]
    upper = [m.name for m in first["survivors"] if m.diff == ["-    return min(max(x, 0), 10)", "+    return min(max(x, 0), 11)"]]
    assert first["ran"] == everything == killed + len(survivors) and upper and len(survivors) < everything
    assert all(name.startswith("pkg.calc.x_clip__mutmut_") for name in survivors)
    on_record = record.load(record.KILLED)["pkg/calc.py"]
    assert sum(len(record._numbers(entry["killed"])) for entry in on_record.values()) == killed

    assert run()["ran"] == len(survivors)                              # the kills stand, the survivors retry
    assert mutation.main(["--judge", "harmless", "--why", "an upper bound no caller reaches", *survivors]) == 0
    again = run()
    assert again["ran"] == 0 and again["survivors"] == [] and again["counts"] == {"killed": killed, "judged harmless": len(survivors)}
    assert again["not_equivalent"] == (killed, everything) and again["kill_rate"] == killed / everything

    tests = root / "tests" / "test_calc.py"
    tests.write_text(tests.read_text() + "\n\ndef test_clip_top():\n    assert clip(12) == 10\n")
    checked = run(include_judged=True)
    assert checked["ran"] == len(survivors) and set(upper) <= set(checked["misjudged"])

    calc = root / "pkg" / "calc.py"
    calc.write_text(calc.read_text().replace("min(max(x, 0), 10)", "max(min(x, 10), 0)"))
    changed = run()
    clips = [n for n in record.mutants_of("pkg/calc.py", root) if n.startswith("pkg.calc.x_clip__")]
    assert changed["ran"] == len(clips) and changed["lapsed"] == sorted(survivors)
    assert run(fresh=True)["ran"] == changed["mutants"]


def test_mutation_judge_refuses_unknown_mutants_and_records_nothing(tmp_path, monkeypatch):
    pytest.importorskip("mutmut")
    import bench.mutation as mutation
    import bench.mutation_record as record

    monkeypatch.setattr(record, "LEDGER", tmp_path / "judged.json")
    name = "orchestrator.stats.x_fmt__mutmut_12"
    assert mutation.main(["--judge", "equivalent", "--why", "w", name, "orchestrator.stats.x_fmt__mutmut_99999"]) == 2
    assert mutation.main(["--judge", "equivalent", "--why", " ", name]) == 2
    assert mutation.main(["--judge", "equivalent", "--why", "w", "orchestrator.nothing.x_f__mutmut_1"]) == 2
    assert mutation.main(["--judge", "equivalent", name]) == 2
    assert mutation.main(["--show"]) == 2 and mutation.main([name]) == 2
    assert not (tmp_path / "judged.json").exists()
    assert mutation.main(["--judge", "equivalent", "--why", "the infinity branch", name]) == 0
    assert record.load()["orchestrator/stats.py"][name]["diff"][0].startswith("-")


def test_mutation_record_of_kills_keeps_each_functions_numbers_and_forgets_a_changed_function(tmp_path):
    """The kills are stored as number ranges per function with its hash: a run's verdicts add and
    remove numbers, a function whose hash changed starts afresh, a function with no kill left
    leaves the record, and only kills of an unchanged function are settled."""
    from bench.mutation_record import Mutant, _numbers, _ranges, load, note_verdicts, settled

    assert _ranges([9, 1, 2, 3, 7, 10]) == "1-3,7,9-10" and _numbers("1-3,7,9-10") == {1, 2, 3, 7, 9, 10}
    path = tmp_path / "killed.json"
    mutants = {f"p.m.x_f__mutmut_{n}": Mutant(f"p.m.x_f__mutmut_{n}", "x_f", "aaa", []) for n in range(1, 7)}
    mutants |= {f"p.m.x_g__mutmut_{n}": Mutant(f"p.m.x_g__mutmut_{n}", "x_g", "bbb", []) for n in (1, 2)}
    note_verdicts("p/m.py", mutants, {"p.m.x_f__mutmut_1": "killed", "p.m.x_f__mutmut_2": "killed",
                                      "p.m.x_f__mutmut_3": "survived", "p.m.x_f__mutmut_5": "timeout",
                                      "p.m.x_g__mutmut_1": "killed"}, path)
    assert load(path) == {"p/m.py": {"x_f": {"function_hash": "aaa", "killed": "1-2", "timeout": "5"},
                                     "x_g": {"function_hash": "bbb", "killed": "1"}}}
    note_verdicts("p/m.py", mutants, {"p.m.x_f__mutmut_2": "survived", "p.m.x_f__mutmut_3": "killed",
                                      "p.m.x_g__mutmut_1": "no tests"}, path)
    assert load(path) == {"p/m.py": {"x_f": {"function_hash": "aaa", "killed": "1,3", "timeout": "5"}}}
    assert settled("p/m.py", mutants, path) == {"p.m.x_f__mutmut_1": "killed", "p.m.x_f__mutmut_3": "killed",
                                                "p.m.x_f__mutmut_5": "timeout"}
    changed = {name: Mutant(name, m.function, "ccc" if m.function == "x_f" else m.function_hash, [])
               for name, m in mutants.items()}
    assert settled("p/m.py", changed, path) == {}
    note_verdicts("p/m.py", changed, {"p.m.x_f__mutmut_4": "killed"}, path)
    assert load(path) == {"p/m.py": {"x_f": {"function_hash": "ccc", "killed": "4"}}}
