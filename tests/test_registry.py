"""The family registry: where family files are found, which one wins, and every way a family's
code can be wrong, each refused with the file and the entry point named (before Ray starts)."""

import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from orchestrator import registry
from orchestrator.errors import UsageError
from orchestrator.registry import family_code, families, find_family, resolve_entrypoint, set_spaces_dirs

SHIPPED = sorted(p.stem for p in Path(str(resources.files("search_spaces"))).glob("*.yaml"))

GOOD = """
def train(config, report, restore=None):
    report({"epoch": 1, "val/x/acc": config["lr"]})


def check(config):
    pass
"""


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No --spaces or $ORCHESTRATE_SPACES_DIR from elsewhere; test modules imported afresh."""
    monkeypatch.delenv(registry.SPACES_ENV, raising=False)
    set_spaces_dirs([])
    before = set(sys.modules)
    yield
    set_spaces_dirs([])
    for name in set(sys.modules) - before:
        if name.startswith("regfam"):
            del sys.modules[name]


def family(folder: Path, name: str, entrypoint: str | None = None, code: str | None = GOOD, extra: str = "") -> Path:
    """``folder/name.yaml`` naming ``regfam_<name>:train`` and, unless ``code`` is None, that module."""
    folder.mkdir(parents=True, exist_ok=True)
    head = "" if entrypoint == "" else f"entrypoint: {entrypoint or f'regfam_{name}:train'}\n"
    (folder / f"{name}.yaml").write_text(head + textwrap.dedent(f"""
        family: {name}
        objective: {{metric: val/x/acc, mode: max}}
        defaults: {{lr: 0.1}}
        studies: {{s: {{}}}}
        """) + extra)
    if code is not None:
        (folder / f"regfam_{name}.py").write_text(code)
    return folder


def test_shipped_families_are_the_yaml_files_and_name_their_modules():
    found = families()
    assert sorted(found) == SHIPPED
    for name, file in found.items():
        assert file.shipped and file.import_paths == ()
        code = family_code(name)
        assert code.entrypoint == f"trainables.{name}:train"
        assert code.train is sys.modules[f"trainables.{name}"].train


def test_earlier_sources_win_and_say_where_they_come_from(tmp_path, monkeypatch):
    cli, env1, env2 = tmp_path / "cli", tmp_path / "env1", tmp_path / "env2"
    family(cli, "busy_loop", code=None, entrypoint="regfam_shadow:train")  # hides the shipped busy_loop
    family(env1, "busy_loop", code=None)
    family(env1, "mine")
    family(env2, "mine", code=None)
    family(env2, "other")
    monkeypatch.setenv(registry.SPACES_ENV, f"{env1}:{env2}")
    set_spaces_dirs([cli])
    found = families()
    assert found["busy_loop"].path == cli.resolve() / "busy_loop.yaml" and found["busy_loop"].origin == "--spaces"
    assert found["mine"].path == env1.resolve() / "mine.yaml" and found["mine"].origin == "$ORCHESTRATE_SPACES_DIR"
    assert found["other"].path.parent == env2.resolve()
    assert found["attn_knn"].shipped
    assert set(SHIPPED) < set(found)
    assert found["mine"].import_paths[0] == str(env1.resolve())


def test_a_package_adds_families_through_the_entry_point_group(tmp_path, monkeypatch):
    """A real installed distribution (a dist-info on sys.path) declaring a folder of YAMLs."""
    site = tmp_path / "site"
    family(site / "regfam_pkg" / "spaces", "pkgfam", entrypoint="regfam_pkg.model:train", code=None)
    (site / "regfam_pkg" / "__init__.py").write_text("")
    (site / "regfam_pkg" / "model.py").write_text(GOOD)
    info = site / "regfam_pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: regfam-pkg\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[orchestrate.families]\nmine = regfam_pkg:spaces\n")
    monkeypatch.syspath_prepend(str(site))
    file = find_family("pkgfam")
    assert file.path == site / "regfam_pkg" / "spaces" / "pkgfam.yaml"
    assert file.origin == "package regfam-pkg (entry point mine = regfam_pkg:spaces)"
    assert file.import_paths == ()  # installed: importable as it is
    assert family_code("pkgfam").train({"lr": 0.5}, lambda m, c=None: m) is None


def test_the_module_beside_the_yaml_imports_in_a_fresh_process_with_another_cwd(tmp_path):
    """What a Ray worker does: only the entry point string and the folders travel."""
    folder = family(tmp_path / "mine", "worker")
    set_spaces_dirs([folder])
    file = find_family("worker")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = ("import sys; from orchestrator.registry import resolve_entrypoint; out = [];"
              f"resolve_entrypoint('regfam_worker:train', {file.import_paths!r})({{'lr': 0.25}}, lambda m, c=None: out.append(m));"
              "print(out)")
    done = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[{'epoch': 1, 'val/x/acc': 0.25}]"


def test_check_is_the_modules_own_or_the_one_the_yaml_names(tmp_path):
    folder = family(tmp_path, "own")
    family(tmp_path, "named", extra="check: regfam_rules:strict\n")
    (tmp_path / "regfam_rules.py").write_text("def strict(config):\n    raise ValueError('no')\n")
    family(tmp_path, "none", code="def train(config, report, restore=None):\n    pass\n")
    set_spaces_dirs([folder])
    assert family_code("own").check is sys.modules["regfam_own"].check
    assert family_code("named").check is sys.modules["regfam_rules"].strict
    assert family_code("none").check is None


@pytest.mark.parametrize("entrypoint, code, extra, message", [
    ("", GOOD, "", "no 'entrypoint'"),
    ("regfam_x", GOOD, "", "is not of the form module.path:function"),
    ("regfam_x:train:more", GOOD, "", "is not of the form"),
    ("regfam_missing:train", None, "", "entrypoint regfam_missing:train: no module 'regfam_missing' (looked in"),
    (None, "import regfam_nonexistent_dependency\n", "", "importing regfam_bad failed: No module named"),
    (None, "raise RuntimeError('broken at import')\n", "", "importing regfam_bad failed: RuntimeError: broken at import"),
    (None, "def other():\n    pass\n", "", "has no 'train'"),
    (None, "train = 3\n", "", "train is a int, not a function"),
    (None, "def train(config):\n    pass\n", "", "cannot be called as (config, report, restore=None)"),
    (None, "def train(config, report, resume=None):\n    pass\n", "", "cannot be called as"),
    (None, GOOD.replace("def check(config)", "def check()"), "", "check regfam_bad:check: check() cannot be called as (config)"),
    (None, GOOD.replace("def check(config):\n    pass", "check = 'strict'"), "", "not callable"),
    (None, GOOD, "check: regfam_bad:nothing\n", "check regfam_bad:nothing: module regfam_bad"),
])
def test_broken_family_code_is_one_clear_error(tmp_path, entrypoint, code, extra, message):
    folder = family(tmp_path, "bad", entrypoint=entrypoint, code=code, extra=extra)
    set_spaces_dirs([folder])
    with pytest.raises(UsageError) as error:
        family_code("bad")
    assert message in error.value.message and str(folder.resolve() / "bad.yaml") in error.value.message
    assert "\n" not in error.value.message


def test_malformed_yaml_and_missing_folders(tmp_path, monkeypatch):
    (tmp_path / "broken.yaml").write_text("entrypoint: x:train\nstudies: {s: [\n")
    set_spaces_dirs([tmp_path])
    with pytest.raises(UsageError, match=r"malformed YAML in .*broken.yaml \(line 3\)"):
        family_code("broken")
    set_spaces_dirs([tmp_path / "nope"])
    with pytest.raises(UsageError, match="--spaces .*nope: not a folder"):
        families()
    set_spaces_dirs([])
    monkeypatch.setenv(registry.SPACES_ENV, str(tmp_path / "gone"))
    with pytest.raises(UsageError, match=r"\$ORCHESTRATE_SPACES_DIR .*gone: not a folder"):
        families()


def test_unknown_family_names_the_known_ones():
    with pytest.raises(UsageError, match="unknown family 'nope': choose one of attn_knn, busy_loop"):
        find_family("nope")


def test_resolve_entrypoint_without_a_family_file():
    assert resolve_entrypoint("trainables.busy_loop:train", ()) is sys.modules["trainables.busy_loop"].train


def test_the_readme_table_lists_exactly_the_shipped_families():
    """The README's table is prose about the registry; this keeps the two from drifting apart."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert sorted(re.findall(r"^\| `(\w+)` \|", readme, re.M)) == SHIPPED


def test_two_folders_cannot_share_a_module_name(tmp_path):
    """The second folder's regfam_same.py would silently be the first one's (one sys.modules)."""
    for name in ("one", "two"):
        family(tmp_path / name, name, entrypoint="regfam_same:train", code=None)
        (tmp_path / name / "regfam_same.py").write_text(GOOD)
    set_spaces_dirs([tmp_path / "one", tmp_path / "two"])
    assert family_code("one").train.__module__ == "regfam_same"
    with pytest.raises(UsageError, match=r"two.yaml: entrypoint regfam_same:train: module regfam_same is already "
                                         r".*one/regfam_same.py, not .*two/regfam_same.py; rename yours"):
        family_code("two")
