"""What is known about each mutant between runs of ``bench/mutation.py``, so a run pays only for
what it cannot know: the mutants of code changed since, and the survivors nobody has judged.

Two records, both committed, both keyed by mutmut's mutant name and the hash mutmut itself gives
the mutated function (its AST: comments and layout aside), so an entry lapses the moment its
function changes and that mutant is run again:

- ``bench/mutation_judged.json``: survivors a person judged equivalent, harmless or untestable
  here, with why (``--judge``). An equivalent mutant survives every test by definition, and
  mutmut reruns every test reaching its function to find that out: a family's survivor costs its
  trained tests, 25-125 s on the 2-core VM, and some 300 of them were the floor of a whole run.
- ``bench/mutation_killed.json``: the mutants a run killed (or caught looping), per function.
  As with mutmut's own cache, a kill stands while its function is unchanged: adding tests cannot
  revive it; weakening or deleting one can, so run ``--fresh`` after that.

    python bench/mutation.py --show trainables.attn_knn.x_train__mutmut_25      # its diff, nothing run
    python bench/mutation.py --judge harmless --why "mixup's lambda from another fixed stream" \\
        trainables.attn_knn.x_train__mutmut_25                                  # recorded, with its diff
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEDGER = Path(__file__).with_name("mutation_judged.json")
KILLED = Path(__file__).with_name("mutation_killed.json")
CAUGHT = ("killed", "timeout")  # mutmut's verdicts that settle a mutant

# what a judgement may say; the last two are real differences this machine cannot test
KINDS = {
    "equivalent": "no input the code can receive gives a different result",
    "harmless": "a result differs, but not in anything reported (another fixed random stream, a message)",
    "gpu-only": "differs only where CUDA is present",
    "clip-only": "differs only with open_clip and its weights installed",
}
NOT_EQUIVALENT = tuple(kind for kind in KINDS if kind != "equivalent")
ELSEWHERE = ("gpu-only", "clip-only")  # real differences, for a machine with CUDA or open_clip


@dataclass(frozen=True)
class Mutant:
    name: str            # mutmut's: pkg.mod.x_NAME__mutmut_N, or pkg.mod.xǁClassǁNAME__mutmut_N
    function: str        # mutmut's key of the function it mutates: x_NAME or xǁClassǁNAME
    function_hash: str   # mutmut's hash of that function's AST today
    diff: list[str]      # the lines the mutation removes (-) and adds (+)


def module_of(name: str) -> str:
    """The source file of a mutant name (``trainables.attn_knn.x_train__mutmut_3`` ->
    ``trainables/attn_knn.py``)."""
    return name.rpartition(".")[0].replace(".", "/") + ".py"


_GENERATE = """import difflib, json, sys
from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.utils.format_utils import get_mutant_name, mangled_name_from_mutant_name
from pathlib import Path
module = sys.argv[1]
made = mutate_file_contents(module, Path(module).read_text())
lines = made.code.split("\\n")
def body(generated, function):               # a generated copy's lines, named as the original
    span = made.line_span_by_function_name[generated]
    return [l.replace(generated, function) for l in lines[span.start:span.end]]
out = []
for short in made.mutant_names:
    name = get_mutant_name(Path(module), short)
    function = mangled_name_from_mutant_name(name).rpartition(".")[2]
    changed = [l for l in difflib.unified_diff(body(function + "__mutmut_orig", function), body(short, function), lineterm="", n=0)
               if l[:1] in "+-" and l[:3] not in ("+++", "---")]
    out.append([name, function, made.hash_by_function_name[function], changed])
print(json.dumps(out))
"""


def mutants_of(module: str, root: Path | None = None) -> dict[str, Mutant]:
    """Every mutant mutmut makes of ``module`` as it is under ``root``, generated (nothing run) in
    a scratch folder configured for mutmut, which needs a settings file to mutate at all."""
    with tempfile.TemporaryDirectory(prefix="mutants-of-") as scratch:
        target = Path(scratch) / module
        target.parent.mkdir(parents=True)
        shutil.copy((root or ROOT) / module, target)
        (Path(scratch) / "pyproject.toml").write_text(f'[tool.mutmut]\nsource_paths = ["{module.split("/")[0]}"]\n')
        run = subprocess.run([sys.executable, "-c", _GENERATE, module], cwd=scratch, capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"mutmut could not mutate {module}: {run.stderr.strip().splitlines()[-1:]}")
    return {name: Mutant(name, function, digest, diff) for name, function, digest, diff in json.loads(run.stdout)}


def load(path: Path | None = None) -> dict[str, dict[str, dict]]:
    """The judgements (module -> mutant name -> {"function_hash", "kind", "why", "diff"}), or with
    ``path=KILLED`` the caught mutants (module -> function -> {"function_hash", "killed": "1-3,7", ...})."""
    path = path or LEDGER
    return json.loads(path.read_text()) if path.exists() else {}


def save(ledger: dict[str, dict[str, dict]], path: Path | None = None) -> None:
    path = path or LEDGER
    partial = path.with_name(path.name + ".partial")      # renamed over the record: never half-written
    partial.write_text(json.dumps(ledger, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    partial.replace(path)


@contextmanager
def _locked(path: Path):
    """One writer at a time (two people judging, or a run finishing while one judges, lose nothing)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _number(name: str) -> int:
    return int(name.rpartition("__mutmut_")[2])


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3,7,9-10": a function's kills on one line of the record."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _numbers(text: str) -> set[int]:
    return {n for part in text.split(",") if part
            for a, _, b in [part.partition("-")] for n in range(int(a), int(b or a) + 1)}


def settled(module: str, mutants: dict[str, Mutant], path: Path | None = None) -> dict[str, str]:
    """The mutants of ``module`` an earlier run caught (name -> "killed" or "timeout") whose
    function is unchanged since."""
    record = load(path or KILLED).get(module, {})
    hashes = {m.function: m.function_hash for m in mutants.values()}
    caught = {function: {verdict: _numbers(entry.get(verdict, "")) for verdict in CAUGHT}  # parsed once a function
              for function, entry in record.items() if hashes.get(function) == entry["function_hash"]}
    return {name: verdict for name, mutant in mutants.items() if mutant.function in caught
            for verdict, numbers in caught[mutant.function].items() if _number(name) in numbers}


def note_verdicts(module: str, mutants: dict[str, Mutant], verdicts: dict[str, str], path: Path | None = None) -> None:
    """Fold a run's verdicts (name -> mutmut's status) into the record of caught mutants: a
    function whose hash changed starts afresh; each mutant that ran is caught or not as it ran."""
    path = path or KILLED
    with _locked(path):
        record = load(path)
        functions = record.setdefault(module, {})
        by_function: dict[str, tuple[str, dict[int, str]]] = {}  # function -> (its hash, number -> verdict)
        for name, verdict in verdicts.items():
            mutant = mutants[name]
            by_function.setdefault(mutant.function, (mutant.function_hash, {}))[1][_number(name)] = verdict
        for function, (digest, ran) in by_function.items():
            entry = functions.get(function)
            if entry is None or entry["function_hash"] != digest:
                functions[function] = entry = {"function_hash": digest}
            for verdict in CAUGHT:
                numbers = (_numbers(entry.get(verdict, "")) - set(ran)) | {n for n, v in ran.items() if v == verdict}
                entry.pop(verdict, None)
                if numbers:
                    entry[verdict] = _ranges(sorted(numbers))
            if set(entry) == {"function_hash"}:
                del functions[function]
        save(record, path)


def standing(module: str, mutants: dict[str, Mutant], ledger: dict[str, dict[str, dict]]) -> tuple[dict[str, dict], list[str]]:
    """The judgements of ``module`` that still hold (their mutant exists and its function is as it
    was when judged), and the names of those that lapsed (function changed, or mutant gone)."""
    holding, lapsed = {}, []
    for name, entry in ledger.get(module, {}).items():
        mutant = mutants.get(name)
        if mutant is not None and mutant.function_hash == entry["function_hash"]:
            holding[name] = entry
        else:
            lapsed.append(name)
    return holding, sorted(lapsed)


class BadJudgement(ValueError):
    """A ``--judge`` that names no mutant of today's code, or gives no kind or reason."""


def judge(names: list[str], kind: str, why: str, path: Path | None = None, root: Path | None = None) -> list[str]:
    """Record ``names`` (mutmut's full names, any modules) as judged ``kind`` for ``why``, each with
    today's function hash and diff; returns one line per mutant recorded. All or nothing: one
    unknown name records none."""
    if kind not in KINDS:
        raise BadJudgement(f"--judge: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not why.strip():
        raise BadJudgement("--judge needs --why: the reason a reader of the record can check")
    found = {}
    for module in sorted({module_of(name) for name in names}):
        if not ((root or ROOT) / module).is_file():
            raise BadJudgement(f"--judge: no source file {module} (from {[n for n in names if module_of(n) == module][0]})")
        found |= mutants_of(module, root)
    unknown = [name for name in names if name not in found]
    if unknown:
        raise BadJudgement(f"--judge: no such mutant of today's code: {', '.join(unknown)}")
    with _locked(path or LEDGER):
        ledger = load(path)
        for name in names:
            mutant = found[name]
            ledger.setdefault(module_of(name), {})[name] = {
                "function_hash": mutant.function_hash, "kind": kind, "why": why.strip(), "diff": mutant.diff}
        save(ledger, path)
    return [f"{name}: {kind}  {' | '.join(found[name].diff)}" for name in names]


def show(names: list[str], root: Path | None = None) -> list[str]:
    """Each mutant's diff from today's code, and its judgement if one holds."""
    ledger, out = load(), []
    for module in sorted({module_of(name) for name in names}):
        mutants = mutants_of(module, root)
        holding, _ = standing(module, mutants, ledger)
        for name in (n for n in names if module_of(n) == module):
            if name not in mutants:
                out.append(f"# {name}: no such mutant of today's {module}")
                continue
            judged = holding.get(name)
            out.append(f"# {name}" + (f"  [judged {judged['kind']}: {judged['why']}]" if judged else ""))
            out.extend(f"  {line}" for line in mutants[name].diff)
    return out

