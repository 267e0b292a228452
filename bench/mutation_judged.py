"""Surviving mutants a person has judged, recorded in ``bench/mutation_judged.json`` so that later
runs of ``bench/mutation.py`` skip them instead of paying for them again.

An equivalent mutant survives every test by definition, and mutmut reruns every test that reaches
its function to find that out: a family's survivor costs its trained tests, 25-125 s on the 2-core
VM, and some 300 equivalent ones were the floor of a whole run (bench/README.md). A judgement holds
for one mutant of one version of its function: it is keyed by mutmut's mutant name and the hash
mutmut itself gives the function (its AST: comments and layout aside), so it lapses the moment the
function changes, and that mutant is run, and shown, again.

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEDGER = Path(__file__).with_name("mutation_judged.json")

# what a judgement may say; the last two are real differences this machine cannot test
KINDS = {
    "equivalent": "no input the code can receive gives a different result",
    "harmless": "a result differs, but not in anything reported (another fixed random stream, a message)",
    "gpu-only": "differs only where CUDA is present",
    "clip-only": "differs only with open_clip and its weights installed",
}
NOT_EQUIVALENT = ("harmless", "gpu-only", "clip-only")


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
    """module -> mutant name -> {"function_hash", "kind", "why", "diff"}."""
    path = path or LEDGER
    return json.loads(path.read_text()) if path.exists() else {}


def save(ledger: dict[str, dict[str, dict]], path: Path | None = None) -> None:
    path = path or LEDGER
    partial = path.with_name(path.name + ".partial")      # renamed over the record: never half-written
    partial.write_text(json.dumps(ledger, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    partial.replace(path)


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
    with open(Path(str(path or LEDGER) + ".lock"), "w") as lock:   # two people judging at once lose nothing
        fcntl.flock(lock, fcntl.LOCK_EX)
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

