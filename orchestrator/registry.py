"""The family registry: a family is a YAML file that names its code.

A family file ``<name>.yaml`` holds ``entrypoint: module.path:function`` (the family's
``train(config, report, restore=None)``) and optionally ``check: module.path:function`` (its
cross-field rules; by default the function named ``check`` in the entry point's module, if any).
Family files are looked up, first found wins, in:

1. the folders given with ``--spaces DIR`` (repeatable; :func:`set_spaces_dirs`),
2. the folders in ``$ORCHESTRATE_SPACES_DIR`` (``os.pathsep``-separated),
3. installed packages' entry points in the group ``orchestrate.families``: each entry point's
   value names a folder of family files inside a package, ``mypkg`` (the package's own folder)
   or ``mypkg:spaces`` (its ``spaces/`` subfolder),
4. the shipped ``search_spaces/``.

The entry point's module is imported with the YAML's own folder and the working directory on
the import path, so a user's ``my_family.py`` beside ``my_family.yaml`` just works; Ray workers
get the same folders (:attr:`FamilyFile.import_paths`) and import it the same way
(:func:`resolve_entrypoint`). Everything that can go wrong here is a :class:`UsageError` naming
the file and the entry point, raised before Ray starts.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Callable, Sequence

import yaml

from orchestrator.errors import UsageError

SPACES_ENV = "ORCHESTRATE_SPACES_DIR"
ENTRY_POINT_GROUP = "orchestrate.families"
SHIPPED = "shipped"

_cli_folders: list[Path] = []
_parsed: dict[Path, tuple[tuple[int, int], object]] = {}  # path -> (mtime_ns, size), its YAML
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: same safe subset, ~10x faster


@dataclass(frozen=True)
class FamilyFile:
    """Where one family is declared: its YAML and the source that provided it."""

    name: str
    path: Path
    origin: str  # "shipped", "--spaces", "$ORCHESTRATE_SPACES_DIR" or "package DIST (entry point NAME)"

    @property
    def shipped(self) -> bool:
        return self.origin == SHIPPED

    @property
    def import_paths(self) -> tuple[str, ...]:
        """Folders put on ``sys.path`` before importing the family's code (driver and workers):
        a user folder's own and the working directory; none for packages, which are installed."""
        if self.origin == SHIPPED or self.origin.startswith("package "):
            return ()
        return (str(self.path.parent.resolve()), os.getcwd())


@dataclass(frozen=True)
class FamilyCode:
    """A family's code, resolved and checked: ``train`` and its optional ``check``."""

    file: FamilyFile
    entrypoint: str
    train: Callable
    check: Callable | None


def set_spaces_dirs(folders: Sequence[str | os.PathLike]) -> None:
    """The CLI's ``--spaces`` folders, searched before every other source."""
    _cli_folders[:] = [Path(f).expanduser() for f in folders]


def sources() -> list[tuple[Path, str]]:
    """Every folder family files are read from, in lookup order, with its origin."""
    found = [(folder, "--spaces") for folder in _cli_folders]
    found += [(Path(f).expanduser(), f"${SPACES_ENV}") for f in os.environ.get(SPACES_ENV, "").split(os.pathsep) if f]
    for folder, origin in found:
        if not folder.is_dir():
            raise UsageError(f"{origin} {folder}: not a folder")
    found = [(folder.resolve(), origin) for folder, origin in found]
    found += _entry_point_folders(tuple(sys.path))
    found.append((Path(str(resources.files("search_spaces"))), SHIPPED))
    return found


@functools.lru_cache(maxsize=8)
def _entry_point_folders(search_path: tuple[str, ...]) -> list[tuple[Path, str]]:
    """Installed packages' family folders (``search_path``, ``sys.path`` at the call, is the cache
    key: reading every distribution's metadata costs more than the rest of a lookup)."""
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"package {ep.dist.name if ep.dist else '?'} (entry point {ep.name} = {ep.value})"
        package, _, sub = ep.value.partition(":")
        try:
            folder = Path(str(resources.files(package.strip()))).joinpath(*sub.strip().split("/"))
        except (ImportError, TypeError) as exc:  # TypeError: a module, not a package
            raise UsageError(f"{origin}: cannot open package {package!r}: {exc}") from None
        if not folder.is_dir():
            raise UsageError(f"{origin}: {folder} is not a folder")
        out.append((folder, origin))
    return out


def families() -> dict[str, FamilyFile]:
    """Every family by name; a name found in an earlier source hides the later ones."""
    out: dict[str, FamilyFile] = {}
    for folder, origin in sources():
        for path in sorted(folder.glob("*.yaml")):
            out.setdefault(path.stem, FamilyFile(path.stem, path, origin))
    return dict(sorted(out.items()))


def find_family(name: str) -> FamilyFile:
    known = families()
    if name not in known:
        raise UsageError(f"unknown family {name!r}: choose one of {', '.join(known)}")
    return known[name]


def read_family(name: str) -> tuple[FamilyFile, dict]:
    """The family's file and its parsed YAML (a mapping with a well-formed ``entrypoint``)."""
    file = find_family(name)
    try:
        doc = copy.deepcopy(_parse(file.path))  # callers may change what they get
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UsageError(f"malformed YAML in {file.path}{where}: {getattr(exc, 'problem', exc)}") from None
    except OSError as exc:
        raise UsageError(f"{file.path}: cannot read: {exc.strerror}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{file.path}: top level must be a mapping")
    if "entrypoint" not in doc:
        raise UsageError(f"{file.path}: no 'entrypoint' (add `entrypoint: module.path:train`, the family's code)")
    for key in ("entrypoint", "check"):
        if key in doc:
            _split(doc[key], f"{file.path}: {key}")
    return file, doc


def _parse(path: Path):
    """``path``'s YAML, parsed once while the file stays the same (``orchestrate list`` and every
    study of a family read it again and again)."""
    stat = path.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    if path not in _parsed or _parsed[path][0] != key:
        _parsed[path] = (key, yaml.load(path.read_text(), Loader=_LOADER))  # noqa: S506 - a safe loader
    return _parsed[path][1]


def family_code(name: str) -> FamilyCode:
    """Import family ``name``'s code and check it can be called as the contract says."""
    file, doc = read_family(name)
    where = f"{file.path}: entrypoint {doc['entrypoint']}"
    train = resolve_entrypoint(doc["entrypoint"], file.import_paths, where)
    _require_signature(train, ({}, print, None), where, "(config, report, restore=None)", restore=None)
    if "check" in doc:
        where = f"{file.path}: check {doc['check']}"
        check = resolve_entrypoint(doc["check"], file.import_paths, where)
    else:
        module_name, _ = _split(doc["entrypoint"], where)
        check = getattr(sys.modules[module_name], "check", None)
        where = f"{file.path}: check {module_name}:check"
    if check is not None:
        if not callable(check):
            raise UsageError(f"{where}: not callable")
        _require_signature(check, ({},), where, "(config)")
    return FamilyCode(file, doc["entrypoint"], train, check)


def resolve_entrypoint(entrypoint: str, import_paths: Sequence[str], where: str | None = None) -> Callable:
    """Import ``module.path:function`` with ``import_paths`` first on ``sys.path`` and return the
    function. Used on the driver (through :func:`family_code`) and in every Ray worker."""
    where = where or f"entrypoint {entrypoint}"
    module_name, attr = _split(entrypoint, where)
    for folder in reversed(import_paths):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"{where}: no module {exc.name!r} (looked in {', '.join(import_paths)} "
                             "and the installed packages)") from None
        raise UsageError(f"{where}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any error while importing user code is that code's fault
        raise UsageError(f"{where}: importing {module_name} failed: {type(exc).__name__}: {exc}") from None
    _require_own_module(module, import_paths, where)
    if not hasattr(module, attr):
        raise UsageError(f"{where}: module {module_name} ({getattr(module, '__file__', '?')}) has no {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise UsageError(f"{where}: {attr} is a {type(fn).__name__}, not a function")
    return fn


def _require_own_module(module, import_paths: Sequence[str], where: str) -> None:
    """A module beside the family file must be the one imported: a same-named module imported
    earlier (another folder's ``model.py``, an installed package) would silently stand in for it."""
    if not import_paths:
        return
    relative = Path(*module.__name__.split("."))
    beside = [path for path in (Path(import_paths[0]) / f"{relative}.py", Path(import_paths[0]) / relative / "__init__.py")
              if path.is_file()]
    loaded = getattr(module, "__file__", None)
    if beside and (loaded is None or Path(loaded).resolve() != beside[0].resolve()):
        raise UsageError(f"{where}: module {module.__name__} is already {loaded or 'a namespace package'}, not "
                         f"{beside[0]}; rename yours (two family folders cannot share a module name)")


def _split(entrypoint, where: str) -> tuple[str, str]:
    module_name, sep, attr = entrypoint.partition(":") if isinstance(entrypoint, str) else ("", "", "")
    if not (sep and all(part.isidentifier() for part in module_name.split(".")) and attr.isidentifier()):
        raise UsageError(f"{where}: {entrypoint!r} is not of the form module.path:function")
    return module_name, attr


def _require_signature(fn: Callable, args: tuple, where: str, shape: str, **kwargs) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without introspectable signature: trust it
        return
    try:
        signature.bind(*args)
        if kwargs:
            signature.bind(*args[:-len(kwargs)], **kwargs)
    except TypeError:
        raise UsageError(f"{where}: {getattr(fn, '__name__', fn)}{signature} cannot be called as {shape}") from None
