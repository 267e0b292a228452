"""Search-space YAML -> a validated study -> a Ray Tune param space.

The grammar is in ``search_spaces/README.md``. Everything is checked here, before Ray starts:
unknown keys, wrong types, out-of-range values, non-finite numbers, malformed distributions,
the dataset spec, the family's code (``orchestrator.registry``) and the family's own
cross-field ``check`` on every trial config the study launches. Nothing is evaluated as code
(``yaml.safe_load``; values are coerced to the type of the family default).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from orchestrator.errors import UsageError
from orchestrator.registry import families, family_code, read_family

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SEARCHES = ("random", "optuna")
SCHEDULERS = ("fifo", "asha")
LR_RULES = ("linear", "sqrt", "none")
STUDY_KEYS = {"description", "set", "grid", "eval", "space", "search", "samples", "scheduler", "seeds", "derive"}
FILE_KEYS = {"family", "description", "entrypoint", "check", "objective", "default_study", "defaults", "eval", "params",
             "claims", "report", "studies"}
RESERVED = {"seed", "eval", "artifact_dir"}


def available_families() -> list[str]:
    return list(families())


@dataclass
class Study:
    """One study of one family, fully resolved and validated."""

    family: str
    name: str
    description: str
    base: dict[str, Any]  # defaults + study set + CLI overrides
    grid: dict[str, list]
    eval_axes: dict[str, list]
    space: dict[str, dict]
    search: str
    samples: int
    scheduler: str
    seeds: list[int]
    derive: dict[str, dict]
    objective: dict[str, str]
    claims: list = field(default_factory=list)
    entrypoint: str = ""  # module.path:function of the family's train
    import_paths: tuple[str, ...] = ()  # folders a worker puts on sys.path before importing it

    @property
    def num_trials(self) -> int:
        grid_points = math.prod(len(v) for v in self.grid.values()) if self.grid else 1
        if self.search == "optuna":
            return self.samples
        return grid_points * len(self.seeds) * (self.samples if self.space else 1)

    def trial_configs(self) -> list[dict]:
        """The trials a grid study launches (space studies: one entry per grid point x seed with
        the distributions shown unsampled). Used by ``--dry-run`` and tests."""
        names = list(self.grid)
        configs = []
        for values in itertools.product(*(self.grid[n] for n in names)) if names else [()]:
            for seed in self.seeds if self.search != "optuna" else self.seeds[:1]:
                cfg = {**self.base, **dict(zip(names, values)), "seed": seed}
                cfg.update({k: _describe_distribution(v) for k, v in self.space.items()})
                configs.append(derive_params(cfg, self.derive) if not self.space else cfg)
        return configs


def load_family_file(family: str) -> dict:
    file, doc = read_family(family)
    path = file.path
    unknown = set(doc) - FILE_KEYS
    if unknown:
        raise UsageError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    for key in ("defaults", "studies", "objective"):
        if not isinstance(doc.get(key), dict):
            raise UsageError(f"{path}: '{key}' must be a mapping")
    if doc.get("family", family) != family:
        raise UsageError(f"{path}: 'family' is {doc['family']!r}, expected {family!r}")
    _refuse_non_finite(doc, path.name)
    from orchestrator.report_config import check_settings  # claims import pandas: only once a family loads

    check_settings(doc, family, str(path))
    return doc


def load_study(family: str, study: str | None = None, overrides: dict[str, str] | None = None,
               seeds: list[int] | None = None) -> Study:
    """Resolve ``family``/``study`` with CLI ``overrides`` (raw strings from ``--set``) and
    ``seeds`` (from ``--seeds``, already checked) in place of the study's own."""
    doc = load_family_file(family)
    study = study or doc.get("default_study") or next(iter(doc["studies"]))
    if study not in doc["studies"]:
        raise UsageError(f"unknown study {study!r} for {family}: choose one of {', '.join(doc['studies'])}")
    spec = doc["studies"][study] or {}
    where = f"{family}.yaml studies.{study}"
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
    defaults = dict(doc["defaults"])
    if RESERVED & set(defaults):
        raise UsageError(f"{family}.yaml defaults: reserved key(s) {sorted(RESERVED & set(defaults))}")
    constraints = doc.get("params") or {}
    check = _Checker(family, defaults, constraints)

    base = dict(defaults)
    for key, value in (spec.get("set") or {}).items():
        base[key] = check.value(key, value, f"{where}.set")
    for key, raw in (overrides or {}).items():
        base[key] = check.value(key, check.parse_cli(key, raw), "--set")
    for key, value in base.items():
        check.value(key, value, f"{family}.yaml defaults")

    grid = {}
    for key, values in (spec.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}.grid.{key}: expected a non-empty list")
        grid[key] = [check.value(key, v, f"{where}.grid") for v in values]

    eval_axes = {k: list(v) for k, v in (doc.get("eval") or {}).items()}
    for key, values in (spec.get("eval") or {}).items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}.eval.{key}: expected a non-empty list")
        eval_axes[key] = values
    for key, values in eval_axes.items():
        check.eval_values(key, values, f"{where}.eval")

    space = {key: check.distribution(key, dist, f"{where}.space") for key, dist in (spec.get("space") or {}).items()}
    search = spec.get("search", "random")
    if search not in SEARCHES:
        raise UsageError(f"{where}.search: {search!r} is not one of {SEARCHES}")
    scheduler = spec.get("scheduler", "fifo")
    if scheduler not in SCHEDULERS:
        raise UsageError(f"{where}.scheduler: {scheduler!r} is not one of {SCHEDULERS}")
    samples = spec.get("samples", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UsageError(f"{where}.samples: expected an integer >= 1, got {samples!r}")
    if search == "optuna" and (grid or not space):
        raise UsageError(f"{where}: search optuna needs a 'space' and no 'grid'")
    seeds = list(seeds) if seeds is not None else _seeds(spec.get("seeds", 1), where)
    derive = {key: check.derive(key, rule, grid, base, f"{where}.derive") for key, rule in (spec.get("derive") or {}).items()}
    objective = doc["objective"]
    if objective.get("mode") not in ("min", "max") or not isinstance(objective.get("metric"), str):
        raise UsageError(f"{family}.yaml objective: needs 'metric' and 'mode' (min|max)")
    code = family_code(family)
    compiled = Study(
        family=family, name=study, description=str(spec.get("description", "")), base=base, grid=grid,
        eval_axes=eval_axes, space=space, search=search, samples=samples, scheduler=scheduler,
        seeds=seeds, derive=derive, objective=dict(objective), claims=list(doc.get("claims") or []),
        entrypoint=code.entrypoint, import_paths=code.file.import_paths,
    )
    _check_datasets(compiled)
    if code.check is not None:
        _check_trials(compiled, code.check, overrides or {}, where)
    return compiled


def derive_params(config: dict, derive: dict[str, dict]) -> dict:
    """Apply learning-rate scaling rules: linear (x batch/ref), sqrt (x sqrt(batch/ref)), none."""
    out = dict(config)
    for key, rule in derive.items():
        name = config[rule["rule_from"]] if "rule_from" in rule else rule["rule"]
        ratio = config[rule.get("batch_key", "batch_size")] / rule["reference_batch"]
        factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[name]
        out[key] = rule["reference_value"] * factor
    return out


def checked_configs(study: Study) -> list[tuple[str, dict]]:
    """Every config a study can launch, as its trainable receives it (before ``artifact_dir``),
    labelled by what varies: each grid point x seed, and for ``space`` studies every combination
    of the distributions' bounds (each value of a ``choice``)."""
    names = list(study.grid)
    bounds = {key: _bounds(dist) for key, dist in study.space.items()}
    seeds = study.seeds if study.search != "optuna" else study.seeds[:1]
    out = []
    for values in itertools.product(*(study.grid[n] for n in names)):
        for drawn in itertools.product(*bounds.values()):
            for seed in seeds:
                point = {**dict(zip(names, values)), **dict(zip(bounds, drawn)), "seed": seed}
                config = {**study.base, **point, "eval": dict(study.eval_axes), "device": study.base.get("device", "auto")}
                out.append((" ".join(f"{k}={v}" for k, v in point.items()), derive_params(config, study.derive)))
    return out


def describe_study(study: Study) -> str:
    """What a study varies, in one line (for ``orchestrate list``)."""
    parts = [f"{k}={_short(v)}" for k, v in study.grid.items()]
    parts += [f"{k}~{next(iter(d))}{list(d.values())[0]}" for k, d in study.space.items()]
    parts += [f"eval {k}={_short(v)}" for k, v in study.eval_axes.items() if len(v) > 1]
    if study.derive:
        parts.append("derive " + ",".join(study.derive))
    parts.append(f"seeds={len(study.seeds)}")
    if study.search != "random" or study.scheduler != "fifo":
        parts.append(f"{study.search}+{study.scheduler} x{study.samples}")
    return "; ".join(parts)


def _short(values: list) -> str:
    return str(values) if len(values) <= 6 else f"[{values[0]}..{values[-1]}] ({len(values)} values)"


# ---------------------------------------------------------------- validation helpers


def _seeds(value, where: str) -> list[int]:
    if isinstance(value, bool):
        raise UsageError(f"{where}.seeds: expected an int or a list of ints")
    if isinstance(value, int):
        if value < 1:
            raise UsageError(f"{where}.seeds: expected at least 1 seed, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        return list(value)
    raise UsageError(f"{where}.seeds: expected an int or a list of ints, got {value!r}")


def _bounds(dist: dict) -> list:
    """The values of a distribution the compiler checks: a choice's values, a range's ends."""
    (kind, args), = dist.items()
    if kind == "choice":
        return list(args)
    return [args[0], args[1] - 1] if kind == "randint" else list(args)


def _is_number(value) -> bool:
    """An int or a float, not a bool (Python counts True and False as ints; YAML writes them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_non_finite(value, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{where}: {value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _refuse_non_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_non_finite(item, f"{where}[{i}]")


def _check_datasets(study: Study) -> None:
    """Every dataset spec the study can use names data that is there (no image is decoded)."""
    from trainables.common.data import DataError, validate_spec

    specs = [study.base.get("dataset"), *study.grid.get("dataset", []), *study.space.get("dataset", {}).get("choice", [])]
    for spec in dict.fromkeys(s for s in specs if s is not None):
        try:
            validate_spec(spec)
        except DataError as exc:
            raise UsageError(str(exc)) from None


def _check_trials(study: Study, check, overrides: dict, where: str) -> None:
    """Run the family's ``check`` on every config the study launches; the first refusal is one
    line naming the study, the trial (as ``--dry-run`` numbers them) and the ``--set`` keys."""
    cli = "".join(f"; --set {key}={study.base[key]}" for key in overrides)
    for i, (label, config) in enumerate(checked_configs(study)):
        try:
            check(config)
        except ValueError as exc:  # ConfigError, and the DataError / ValueError a check may raise
            raise UsageError(f"{where} trial {i} ({label}{cli}): {exc}") from None


def _describe_distribution(dist: dict) -> str:
    (kind, args), = dist.items()
    return f"{kind}({', '.join(map(str, args))})"


class _Checker:
    """Type and range checks against the family defaults and ``params`` constraints."""

    def __init__(self, family: str, defaults: dict, constraints: dict):
        self.family, self.defaults, self.constraints = family, defaults, constraints

    def known(self, key: str, where: str) -> None:
        if key not in self.defaults:
            raise UsageError(f"{where}: unknown key {key!r} for {self.family} (known: {', '.join(sorted(self.defaults))})")

    def parse_cli(self, key: str, raw: str):
        self.known(key, "--set")
        default = self.defaults[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return raw.lower() in ("true", "1", "yes")
            if isinstance(default, int):
                return int(raw)
            if isinstance(default, float):
                value = float(raw)
                if not math.isfinite(value):
                    raise UsageError(f"--set {key}={raw}: not a finite number")
                return value
            if isinstance(default, (list, dict)) or default is None:
                value = yaml.safe_load(raw)
                _refuse_non_finite(value, f"--set {key}")
                return value
            return raw
        except (ValueError, yaml.YAMLError):
            raise UsageError(f"--set {key}={raw}: expected {type(default).__name__}") from None

    def value(self, key: str, value, where: str):
        self.known(key, where)
        default = self.defaults[key]
        value = self._typed(key, value, default, where)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            self._in_range(key if i is None else f"{key}[{i}]", item, self.constraints.get(key, {}), where)
        return value

    def eval_values(self, key: str, values: list, where: str) -> None:
        if key in self.defaults:
            raise UsageError(f"{where}.{key}: {key!r} is a training parameter; eval axes must only change evaluation")
        for v in values:
            if not isinstance(v, (int, float, str)) or isinstance(v, bool):
                raise UsageError(f"{where}.{key}: values must be numbers or strings, got {v!r}")
            self._in_range(key, v, self.constraints.get(key, {}), where)

    def distribution(self, key: str, dist, where: str) -> dict:
        self.known(key, where)
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise UsageError(f"{where}.{key}: expected one of {DISTRIBUTIONS} with its arguments, got {dist!r}")
        (kind, args), = dist.items()
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise UsageError(f"{where}.{key}: choice needs a non-empty list")
            return {kind: [self.value(key, a, where) for a in args]}
        if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
            raise UsageError(f"{where}.{key}: {kind} needs [low, high]")
        low, high = args
        if not low < high:
            raise UsageError(f"{where}.{key}: {kind} needs low < high, got {args}")
        if kind == "loguniform" and low <= 0:
            raise UsageError(f"{where}.{key}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise UsageError(f"{where}.{key}: randint needs integer bounds")
        self.value(key, low, where)
        self.value(key, high - 1 if kind == "randint" else high, where)
        return {kind: [low, high]}

    def derive(self, key: str, rule, grid: dict, base: dict, where: str) -> dict:
        self.known(key, where)
        if not isinstance(rule, dict):
            raise UsageError(f"{where}.{key}: expected a mapping")
        missing = {"reference_batch", "reference_value"} - set(rule)
        if missing or ("rule" in rule) == ("rule_from" in rule):
            raise UsageError(f"{where}.{key}: needs reference_batch, reference_value and one of rule/rule_from")
        if "rule" in rule and rule["rule"] not in LR_RULES:
            raise UsageError(f"{where}.{key}.rule: {rule['rule']!r} is not one of {LR_RULES}")
        if "rule_from" in rule:
            source = rule["rule_from"]
            values = grid.get(source, [base.get(source)])
            bad = [v for v in values if v not in LR_RULES]
            if bad:
                raise UsageError(f"{where}.{key}.rule_from: {source} takes {bad}, not one of {LR_RULES}")
        batch_key = rule.get("batch_key", "batch_size")
        self.known(batch_key, f"{where}.{key}.batch_key")
        if not isinstance(rule["reference_batch"], int) or rule["reference_batch"] < 1:
            raise UsageError(f"{where}.{key}.reference_batch: expected a positive integer")
        self.value(key, float(rule["reference_value"]), where)
        return dict(rule)

    def _typed(self, key, value, default, where):
        if default is None or isinstance(default, dict):
            return value
        if isinstance(default, list):
            return self._typed_list(key, value, default, where)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = _is_number(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise UsageError(f"{where}: {key}={value!r} has the wrong type (expected {type(default).__name__})")
        return value

    def _typed_list(self, key, value, default: list, where):
        """A list knob takes a list, each element of the type its default's elements share (a
        number where they are numbers: YAML's true/false are not cut points). A default of mixed
        or nested elements, or an empty one, types the list only."""
        if not isinstance(value, list):
            raise UsageError(f"{where}: {key}={value!r} has the wrong type (expected list)")
        numbers = [d for d in default if _is_number(d)]
        if default and len(numbers) == len(default):
            element = next((d for d in numbers if isinstance(d, float)), numbers[0])
        elif default and all(type(d) in (bool, str) and type(d) is type(default[0]) for d in default):
            element = default[0]
        else:
            return value
        return [self._typed(f"{key}[{i}]", v, element, where) for i, v in enumerate(value)]

    @staticmethod
    def _in_range(key, value, rule: dict, where: str) -> None:
        if "choices" in rule and value not in rule["choices"]:
            raise UsageError(f"{where}: {key}={value!r} is not one of {rule['choices']}")
        if not _is_number(value):
            return
        if "min" in rule and (value < rule["min"] or (rule.get("exclusive_min") and value == rule["min"])):
            op = ">" if rule.get("exclusive_min") else ">="
            raise UsageError(f"{where}: {key}={value} is out of range (must be {op} {rule['min']})")
        if "max" in rule and (value > rule["max"] or (rule.get("exclusive_max") and value == rule["max"])):
            op = "<" if rule.get("exclusive_max") else "<="
            raise UsageError(f"{where}: {key}={value} is out of range (must be {op} {rule['max']})")
