"""Mutation testing of the science-critical code with mutmut (3.x), each module against its own tests.

    pip install mutmut                                      # not a project dependency
    python bench/mutation.py --module orchestrator/stats.py # one module (repeatable)
    python bench/mutation.py                                # every module below (hours on 2 cores: bench/README.md)
    python bench/mutation.py --list                         # the modules and the tests each one runs
    python bench/mutation.py --module trainables/subtask_meta.py --function check --function 'fit_*'
                                                            # some functions only (a release run in parts)
    python bench/mutation.py --module orchestrator/stats.py --workdir .mutation --rerun-survivors
                                                            # after adding tests: only that run's survivors again

Each module is mutated in its own copy of the working tree (``--workdir``, default a temporary
folder; the tree itself is never touched, so it is safe beside other work), and every mutant
runs only that module's own tests (:data:`MODULES`; mutmut narrows them further to the tests
that reach the mutated function). mutmut runs the tests once unmutated, then each mutant in a
forked worker (``--max-children``, default the CPU count: a release run on a quiet machine;
pass 1 beside other work), with ``bench/mutmut_fixture_credit.py`` loaded so a shared fixture's
work counts for every test that uses it. Printed per module: mutants, killed, survived, no
test reaches it, timeouts, the kill rate (killed / (killed + survived)) and the wall time; then
each surviving mutant by name, with its diff under ``--diffs``. The exit code is 0 when every
module ran (a kill rate is a finding to read, not a failure). Not part of CI: run it before a
release and record the figures and the survivors in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the tests that are its own (the ones a change to it should answer to)
MODULES: dict[str, list[str]] = {
    "orchestrator/stats.py": ["tests/test_stats.py"],
    "orchestrator/claims.py": ["tests/test_claims.py"],
    "orchestrator/power.py": ["tests/test_power.py"],
    "orchestrator/sequential.py": ["tests/test_sequential.py"],
    "orchestrator/report_data.py": ["tests/test_report_data.py", "tests/test_reliability.py"],
    "orchestrator/report_tables.py": ["tests/test_report_tables.py"],
    "orchestrator/reliability.py": ["tests/test_reliability.py"],
    "trainables/common/metrics.py": ["tests/test_metrics.py", "tests/test_lifecycle.py"],
    "trainables/common/knn.py": ["tests/test_knn.py"],
    "trainables/common/data.py": ["tests/test_data.py"],
    "trainables/common/training.py": ["tests/test_training.py", "tests/test_lifecycle.py"],
    "trainables/common/lifecycle.py": ["tests/test_lifecycle.py"],
    "trainables/common/calibration.py": ["tests/test_calibration.py"],
    "trainables/common/encoders.py": ["tests/test_encoders.py"],
    "trainables/common/features.py": ["tests/test_features.py"],
    "trainables/attn_knn.py": ["tests/test_attn_knn.py", "tests/test_wiring_attn_knn.py"],
    "trainables/set_anomaly.py": ["tests/test_set_anomaly.py", "tests/test_wiring_set_anomaly.py"],
    "trainables/clip_fusion.py": ["tests/test_clip_fusion.py", "tests/test_wiring_clip_fusion.py"],
    "trainables/subtask_meta.py": ["tests/test_subtask_meta.py", "tests/test_wiring_subtask_meta.py"],
    "trainables/wm_attention.py": ["tests/test_wm_attention.py", "tests/test_wiring_wm_attention.py"],
    "trainables/wm_tasks.py": ["tests/test_wm_attention.py", "tests/test_wiring_wm_attention.py"],
}
COPY_IGNORE = shutil.ignore_patterns(".git", "runs", "mutants", "mlruns", "mlartifacts", "*.db", "__pycache__",
                                     "*.egg-info", ".pytest_cache")


def copy_tree(target: Path) -> None:
    """The working tree as it is (uncommitted changes included, so code and tests match)."""
    shutil.copytree(ROOT, target, ignore=COPY_IGNORE)


def configure(copy: Path, module: str, tests: list[str]) -> None:
    """mutmut's settings for one module, appended to the copy's pyproject.toml."""
    settings = {
        "source_paths": [module.split("/")[0]],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        # bench/mutmut_fixture_credit.py: a shared fixture's work counts for every test using it
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "bench.mutmut_fixture_credit", "-x", "-q"],
        "also_copy": ["search_spaces", "bench", "trainables" if module.startswith("orchestrator") else "orchestrator"],
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    with open(copy / "pyproject.toml", "a") as out:
        out.write("\n".join(lines) + "\n")


def decorated_functions(source: str) -> list[str]:
    """The functions and methods in ``source`` mutmut leaves unmutated: it skips every decorated
    one but a ``@staticmethod`` or ``@classmethod`` (a decorator runs at definition time). Printed
    with each module's figures, so code out of the tool's sight is named, not silently left out;
    a family's evaluation runs under ``with torch.no_grad():`` rather than the decorator for this."""
    return [node.name
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.decorator_list
            and [ast.unparse(d) for d in node.decorator_list] not in (["staticmethod"], ["classmethod"])]


def mutant_globs(module: str, functions: list[str]) -> list[str]:
    """mutmut's names for the mutants of ``functions`` (fnmatch patterns) in ``module``: a
    function's are ``pkg.mod.x_NAME__mutmut_N``, a method's ``pkg.mod.xǁClassǁNAME__mutmut_N``."""
    dotted = module.removesuffix(".py").replace("/", ".")
    return [glob for name in functions for glob in (f"{dotted}.x_{name}__mutmut_*", f"{dotted}.xǁ*ǁ{name}__mutmut_*")]


class EarlierRunUnusable(Exception):
    """``--rerun-survivors`` found no earlier run of the module it can extend."""


def survivors_to_rerun(copy: Path, module: str, globs: list[str]) -> list[str]:
    """Prepare ``copy``, where ``module`` was mutated before, to retest that run's survivors
    (and the mutants no test reached then, or that it never ran: an interrupted run resumes)
    against today's tests; returns their names. Its killed mutants stay killed: adding tests
    cannot revive one (changing or deleting tests can, so run afresh after those). The module
    itself must be as it was: its mutants are that code."""
    meta = copy / "mutants" / f"{module}.meta"
    if not meta.exists():
        raise EarlierRunUnusable(f"no earlier run of {module} in {copy}: run it once without --rerun-survivors")
    if (copy / module).read_bytes() != (ROOT / module).read_bytes():
        raise EarlierRunUnusable(f"{module} changed since the run in {copy}: its mutants are stale, run it afresh")
    for tests in (copy / "tests", copy / "mutants" / "tests"):
        shutil.copytree(ROOT / "tests", tests, dirs_exist_ok=True, ignore=COPY_IGNORE)
    # mutmut maps each function to the tests that reach it once, in its stats pass; tests edited
    # since must be remapped, not only new ones, so the pass runs again (one clean run of the tests)
    (copy / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return sorted(name for name, code in codes.items()
                  if code in (0, 33, None) and (not globs or any(fnmatch(name, g) for g in globs)))  # survived, no tests, not run


def run_module(module: str, workdir: Path, children: int, diffs: bool, functions: list[str] | None = None,
               rerun_survivors: bool = False) -> dict:
    from mutmut.stats import status_by_exit_code  # what mutmut calls each exit code

    copy = workdir / module.replace("/", "_").removesuffix(".py")
    globs = mutant_globs(module, functions or [])
    chosen = globs
    if rerun_survivors:
        try:
            chosen = survivors_to_rerun(copy, module, globs)
        except EarlierRunUnusable as exc:
            return {"module": module, "error": str(exc), "wall_s": 0.0}
    else:
        if copy.exists():
            shutil.rmtree(copy)
        copy_tree(copy)
        configure(copy, module, MODULES[module])
    # mutmut puts its mutants/ folder first on the import path, ahead of the editable install's
    # finder (appended last); one thread per test process on a shared machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    began = time.perf_counter()
    run = subprocess.run(["mutmut", "run", "--max-children", str(children), *chosen], cwd=copy, env=env,
                         capture_output=True, text=True) if chosen or not rerun_survivors else None
    wall = time.perf_counter() - began
    meta = copy / "mutants" / f"{module}.meta"
    if run is not None and (run.returncode != 0 or not meta.exists()):
        tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
        return {"module": module, "error": " | ".join(tail) or f"mutmut exited {run.returncode}", "wall_s": wall}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    if functions:  # the module's other mutants were not run: counted in no figure
        codes = {name: code for name, code in codes.items() if any(fnmatch(name, g) for g in globs)}
    status = {name: status_by_exit_code.get(code, str(code)) for name, code in codes.items()}
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    survivors = sorted(name for name, s in status.items() if s == "survived")
    shown = _diffs(survivors, module, copy, env) if diffs and survivors else survivors
    killed, survived = counts.get("killed", 0), counts.get("survived", 0)
    return {"module": module + (f" ({', '.join(functions)})" if functions else ""), "mutants": len(status),
            "decorated": [] if functions else decorated_functions((ROOT / module).read_text()), "counts": counts, "wall_s": wall,
            "kill_rate": killed / (killed + survived) if killed + survived else None, "survivors": shown}


_DIFFS = """import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
names, path = json.loads(sys.stdin.read())
print(json.dumps([f"# {name}\\n" + get_diff_for_mutant(name, path=path) for name in names]))
"""


def _diffs(names: list[str], module: str, copy: Path, env: dict) -> list[str]:
    """Every survivor's diff from one process (``mutmut show`` per mutant starts mutmut each
    time: ~3 s a survivor under load, longer than the mutants' own run for 100 survivors)."""
    run = subprocess.run([sys.executable, "-c", _DIFFS], input=json.dumps([names, module]), cwd=copy, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def line(result: dict) -> str:
    if "error" in result:
        return f"{result['module']}: not run ({result['error']})"
    c = result["counts"]
    rate = "n/a" if result["kill_rate"] is None else f"{100 * result['kill_rate']:.1f}%"
    rest = ", ".join(f"{v} {k}" for k, v in c.items() if k not in ("killed", "survived"))
    return (f"{result['module']}: {result['mutants']} mutants, {c.get('killed', 0)} killed, "
            f"{c.get('survived', 0)} survived{', ' + rest if rest else ''}; kill rate {rate}; {result['wall_s']:.0f} s"
            + (f"; not mutated (decorated): {', '.join(result['decorated'])}" if result["decorated"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="Mutate only this module (repeatable).")
    parser.add_argument("--workdir", type=Path, help="Where the copies go (default: a temporary folder, removed after).")
    parser.add_argument("--max-children", type=int, default=os.cpu_count(),
                        help="Mutants tested at once (default: the CPU count; 1 on a shared machine).")
    parser.add_argument("--function", action="append", default=[],
                        help="Mutate only this function or method of each --module (an fnmatch pattern; repeatable).")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="Retest only the survivors (and untested mutants) of the last run in --workdir against "
                             "today's tests, keeping its kills; figures cover the whole module.")
    parser.add_argument("--diffs", action="store_true", help="Print each survivor's diff, not only its name.")
    parser.add_argument("--list", action="store_true", help="Print the modules and their tests, run nothing.")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    if args.function and not args.module:
        print("--function needs --module (which module's functions)", file=sys.stderr)
        return 2
    if args.rerun_survivors and (args.workdir is None or not args.module):
        print("--rerun-survivors needs --workdir (where the earlier run is) and --module", file=sys.stderr)
        return 2
    if shutil.which("mutmut") is None:
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mutation-"))
    results = []
    try:
        for module in args.module or list(MODULES):
            result = run_module(module, workdir, args.max_children, args.diffs, args.function, args.rerun_survivors)
            results.append(result)
            print(line(result), flush=True)
        for result in results:
            if result.get("survivors"):
                print(f"\nsurvivors in {result['module']} ({len(result['survivors'])}):")
                print("\n".join(f"  {s}" for s in result["survivors"]))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
