"""Mutation testing of the science-critical code with mutmut (3.x), each module against its own tests.

    pip install mutmut                                      # not a project dependency
    python bench/mutation.py --module orchestrator/stats.py # one module (repeatable)
    python bench/mutation.py --diffs                        # every module below: what changed since the last run
    python bench/mutation.py --fresh --diffs                # every mutant of every module (hours: bench/README.md)
    python bench/mutation.py --list                         # the modules and the tests each one runs
    python bench/mutation.py --status                       # each module's figures from the records, nothing run
    python bench/mutation.py --module trainables/subtask_meta.py --function check --function 'fit_*'
                                                            # some functions only
    python bench/mutation.py --show NAME...                 # a mutant's change (and judgement), nothing run
    python bench/mutation.py --judge equivalent --why "..." NAME...   # record survivors as judged

Each module is mutated in its own copy of the working tree (``--workdir``, default a temporary
folder; the tree itself is never touched, so it is safe beside other work), and every mutant
runs only that module's own tests (:data:`MODULES`; mutmut narrows them further to the tests
that reach the mutated function). mutmut runs the tests once unmutated, then each mutant in a
forked worker (``--max-children``, default the CPU count: a release run on a quiet machine;
pass 1 beside other work), with ``bench/mutmut_fixture_credit.py`` loaded so a shared fixture's
work counts for every test that uses it, and ``bench/mutmut_test_order.py`` so each mutant's tests
run cheapest first (a mutant a unit test kills dies before a wiring test trains a family).

A run pays only for what is not known already (``bench/mutation_record.py``): mutants an
earlier run caught are on record in ``bench/mutation_killed.json`` and survivors judged
equivalent or harmless by a person in ``bench/mutation_judged.json`` (``--judge``), both keyed by
mutmut's hash of the mutated function, so both are skipped while their function is unchanged.
A release run therefore tries the mutants of code changed since the last one, and the survivors
nobody has judged, against today's tests. ``--fresh`` runs the caught ones again (do so after
weakening or deleting a test: a kill is otherwise kept, as in mutmut's own cache);
``--include-judged`` runs the judged ones, to check the record.

Printed per module: mutants, killed, survived, judged (by kind), no test reaches it, timeouts,
the kill rate (killed / (killed + survived + judged), as in bench/README.md's tables), the
non-equivalent killed (killed / all but the judged equivalent, and again without the judged
gpu-only and clip-only ones, which are real but need a machine this one is not), how many
mutants ran and the wall time; then each unjudged survivor (its change under ``--diffs``), any
judged mutant that was killed (a wrong record) and any judgement that lapsed. The exit code is 0
when every module ran (a kill rate is a finding to read, not a failure). Not part of CI: run it
before a release and record the figures in ``bench/README.md``.
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
sys.path.insert(0, str(ROOT))
from bench.mutation_record import (ELSEWHERE, KILLED, KINDS, LEDGER, NOT_EQUIVALENT, BadJudgement, judge,  # noqa: E402
                                   mutants_of, note_verdicts, settled, show, standing)
from bench.mutation_record import load as load_judged  # noqa: E402

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


def _ignoring(*paths: Path):
    """COPY_IGNORE, and ``paths`` themselves: the workdir when it lies in the tree (``.mutation``
    was copied into each copy, recursively, until the path was too long)."""
    skipped = {path.resolve() for path in paths}
    return lambda folder, names: set(COPY_IGNORE(folder, names)) | {n for n in names if (Path(folder) / n).resolve() in skipped}


def copy_tree(target: Path) -> None:
    """The working tree as it is (uncommitted changes included, so code and tests match)."""
    shutil.copytree(ROOT, target, ignore=_ignoring(target.parent))


def configure(copy: Path, module: str, tests: list[str]) -> None:
    """mutmut's settings for one module, appended to the copy's pyproject.toml."""
    settings = {
        "source_paths": [module.split("/")[0]],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": tests,
        # bench/mutmut_fixture_credit.py: a shared fixture's work counts for every test using it;
        # bench/mutmut_test_order.py: each mutant's tests run cheapest first
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-p", "bench.mutmut_fixture_credit", "-p", "bench.mutmut_test_order",
                                "-x", "-q"],
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


def _verdicts(copy: Path, module: str) -> dict | None:
    """mutmut's exit code for each mutant of ``module`` in ``copy`` (None: not run), if it ran."""
    meta = copy / "mutants" / f"{module}.meta"
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else None


def run_module(module: str, workdir: Path, children: int, functions: list[str] | None = None,
               fresh: bool = False, include_judged: bool = False, status_only: bool = False) -> dict:
    """Mutate ``module`` in a fresh copy under ``workdir`` and run the mutants nothing is known
    about: not caught by an earlier run (``bench/mutation_killed.json``; all of them if ``fresh``)
    and not judged by a person (``bench/mutation_judged.json``; those too if ``include_judged``,
    which checks the judgements: a judged mutant that is killed was misjudged), each while its
    function is unchanged. What ran is added to the record of caught mutants. ``status_only``:
    the figures the records give, nothing run (the mutants nothing is known about "not checked")."""
    from mutmut.stats import status_by_exit_code

    began = time.perf_counter()                          # generation and copying count too
    copy = workdir / module.replace("/", "_").removesuffix(".py")
    mutants = mutants_of(module, ROOT)
    globs = mutant_globs(module, functions or [])
    wanted = sorted(n for n in mutants if not globs or any(fnmatch(n, g) for g in globs))
    holding, lapsed = standing(module, mutants, load_judged())
    caught = {} if fresh else settled(module, mutants)
    chosen = [n for n in wanted if n not in caught and (include_judged or n not in holding)]
    codes = {}
    if chosen and not status_only:
        shutil.rmtree(copy, ignore_errors=True)
        copy_tree(copy)
        configure(copy, module, MODULES[module])
        # mutmut puts its mutants/ folder first on the import path, ahead of the editable install's
        # finder (appended last); one thread per test process on a shared machine; the tests' temporary
        # files stay in the copy (forked children never clean pytest's: 32 GB in /tmp after a day's runs)
        (copy / "tmp").mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(copy / "tmp")}
        run = subprocess.run(["mutmut", "run", "--max-children", str(children), *chosen], cwd=copy, env=env,
                             capture_output=True, text=True)
        codes = _verdicts(copy, module) or {}
        # mutmut writes each verdict as it comes: a run stopped part-way (interrupted, or mutmut
        # killed) keeps what it decided, and the next run starts where it stopped
        note_verdicts(module, mutants, {n: status_by_exit_code[codes[n]] for n in chosen if codes.get(n) is not None})
        if run.returncode != 0 or not codes:
            tail = (run.stdout + run.stderr).strip().splitlines()[-5:]
            return {"module": module, "error": " | ".join(tail) or f"mutmut exited {run.returncode}",
                    "wall_s": time.perf_counter() - began}
    wall = time.perf_counter() - began
    ran = {n: status_by_exit_code[codes.get(n)] for n in chosen}

    def verdict(name: str) -> str:
        found = ran.get(name) or caught.get(name)
        if name in holding and found != "killed":  # a judged mutant a test kills was misjudged: shown as killed
            return "judged " + holding[name]["kind"]
        return found

    status = {n: verdict(n) for n in wanted}
    misjudged = sorted(n for n in holding if status.get(n) == "killed")
    counts = {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))}
    killed, survived = counts.get("killed", 0), counts.get("survived", 0)
    judged = sum(v for k, v in counts.items() if k.startswith("judged "))
    not_equivalent = killed + survived + sum(counts.get("judged " + k, 0) for k in NOT_EQUIVALENT)
    return {"module": module + (f" ({', '.join(functions)})" if functions else ""), "mutants": len(status),
            "ran": 0 if status_only else len(chosen), "decorated": [] if functions else decorated_functions((ROOT / module).read_text()),
            "counts": counts, "wall_s": wall,
            "kill_rate": killed / (killed + survived + judged) if killed + survived + judged else None,
            "not_equivalent": (killed, not_equivalent),
            "survivors": [mutants[n] for n in wanted if status[n] == "survived"],
            "lapsed": lapsed, "misjudged": misjudged}


def line(result: dict) -> str:
    if "error" in result:
        return f"{result['module']}: not run ({result['error']})"
    c = result["counts"]
    rate = "n/a" if result["kill_rate"] is None else f"{100 * result['kill_rate']:.1f}%"
    judged = ", ".join(f"{v} {k.removeprefix('judged ')}" for k, v in c.items() if k.startswith("judged "))
    rest = ", ".join(f"{v} {k}" for k, v in c.items() if k not in ("killed", "survived") and not k.startswith("judged "))
    killed, not_equivalent = result["not_equivalent"]
    share = f" ({100 * killed / not_equivalent:.1f}%)" if not_equivalent else ""
    elsewhere = sum(c.get("judged " + kind, 0) for kind in ELSEWHERE)  # real, but not testable on this machine
    here = (f", {killed} / {not_equivalent - elsewhere} ({100 * killed / (not_equivalent - elsewhere):.1f}%) testable here"
            if elsewhere and not_equivalent > elsewhere else "")
    return (f"{result['module']}: {result['mutants']} mutants, {c.get('killed', 0)} killed, "
            f"{c.get('survived', 0)} survived{', ' + rest if rest else ''}{', judged: ' + judged if judged else ''}; "
            f"kill rate {rate}; non-equivalent killed {killed} / {not_equivalent}{share}{here}; "
            f"{result['ran']} run in {result['wall_s']:.0f} s"
            + (f"; {len(result['lapsed'])} judgements lapsed" if result["lapsed"] else "")
            + (f"; not mutated (decorated): {', '.join(result['decorated'])}" if result["decorated"] else ""))


def details(result: dict, diffs: bool) -> list[str]:
    """What a reader must act on: unjudged survivors (a missing test, or a judgement to record),
    judged mutants that were killed (the record is wrong), judgements that lapsed (re-judge)."""
    out = []
    if result.get("survivors"):
        out.append(f"\nsurvivors in {result['module']} ({len(result['survivors'])}):")
        for mutant in result["survivors"]:
            out.append(f"  {mutant.name}")
            out.extend(f"      {change}" for change in (mutant.diff if diffs else []))
    if result.get("misjudged"):
        out.append(f"\njudged but killed in {result['module']} (remove from {LEDGER.name}): {', '.join(result['misjudged'])}")
    if result.get("lapsed"):
        out.append(f"\njudgements lapsed in {result['module']} (function changed: run, then judge again): "
                   f"{', '.join(result['lapsed'])}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="Mutant names, for --show and --judge.")
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="Mutate only this module (repeatable).")
    parser.add_argument("--workdir", type=Path, help="Where the copies go, kept (default: a temporary folder, removed after).")
    parser.add_argument("--fresh", action="store_true",
                        help=f"Run the mutants caught before too ({KILLED.name} is ignored, then updated).")
    parser.add_argument("--max-children", type=int, default=os.cpu_count(),
                        help="Mutants tested at once (default: the CPU count; 1 on a shared machine).")
    parser.add_argument("--function", action="append", default=[],
                        help="Mutate only this function or method of each --module (an fnmatch pattern; repeatable).")
    parser.add_argument("--include-judged", action="store_true",
                        help=f"Run the survivors judged in {LEDGER.name} too (a check of the record).")
    parser.add_argument("--diffs", action="store_true", help="Print each survivor's change, not only its name.")
    parser.add_argument("--list", action="store_true", help="Print the modules and their tests, run nothing.")
    parser.add_argument("--status", action="store_true",
                        help="Print each module's figures from the records, run nothing (seconds).")
    parser.add_argument("--show", action="store_true", help="Print the named mutants' changes and judgements, run nothing.")
    parser.add_argument("--judge", choices=list(KINDS), help=f"Record the named survivors in {LEDGER.name} as this kind ("
                        + "; ".join(f"{kind}: {meaning}" for kind, meaning in KINDS.items()) + ").")
    parser.add_argument("--why", default="", help="With --judge: why, in words a reader can check against the diff.")
    args = parser.parse_args(argv)
    if args.list:
        for module, tests in MODULES.items():
            print(f"{module}: {' '.join(tests)}")
        return 0
    if bool(args.show or args.judge) != bool(args.names):
        print("mutant names go with --show or --judge, and those need names", file=sys.stderr)
        return 2
    if args.function and not args.module:
        print("--function needs --module (which module's functions)", file=sys.stderr)
        return 2
    if shutil.which("mutmut") is None:
        print("mutmut is not installed: pip install mutmut", file=sys.stderr)
        return 2
    if args.show:
        print("\n".join(show(args.names)))
        return 0
    if args.judge:
        try:
            print("\n".join(judge(args.names, args.judge, args.why)))
        except BadJudgement as exc:
            print(exc, file=sys.stderr)
            return 2
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mutation-"))
    results = []
    try:
        for module in args.module or list(MODULES):
            result = run_module(module, workdir, args.max_children, args.function, args.fresh, args.include_judged,
                                args.status)
            results.append(result)
            print(line(result), flush=True)
        for result in results:
            if found := details(result, args.diffs):
                print("\n".join(found))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
