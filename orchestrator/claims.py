"""Claims declared in a family's YAML, checked against a sweep's runs.

A claim names two sides (a metric key, optionally restricted to trials with given config
values) or one side and a threshold; the sides are paired by seed (and by every other swept
parameter both sides share), tested with a paired t-test (Wilcoxon signed-rank alongside), and
the t-test p-values of all claims in a report are Holm-corrected together. The grammar is in
``search_spaces/README.md`` ("Claims").

Status, in this order:

1. fewer than 2 paired seeds: INCONCLUSIVE;
2. the 95% interval of the difference lies inside [-margin, +margin] (``margin`` defaults to 0,
   so this also catches "identical in every seed"): INVALIDATED, no effect worth the name;
3. Holm-adjusted p < alpha and the difference points the claimed way: VALIDATED;
4. Holm-adjusted p < alpha and it points the other way: INVALIDATED;
5. otherwise INCONCLUSIVE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from orchestrator.errors import UsageError
from orchestrator.power import SeedsNeeded, for_test
from orchestrator.stats import Paired, fmt, holm, holm_levels, one_sample_test, p_is, paired_test, wilcoxon_can_decide
from trainables.common.metrics import metric_info, parse_metric_key

ALPHA = 0.05
VALIDATED, INVALIDATED, INCONCLUSIVE = "VALIDATED", "INVALIDATED", "INCONCLUSIVE"
CLAIM_KEYS = {"claim", "study", "compare", "threshold", "drop", "margin"}
COMPARE_KEYS = {"metric", "baseline", "better", "where", "baseline_where"}


def lower_is_better(key: str) -> bool:
    """Direction of a metric key from the metric table (timings go down); metrics the table
    does not know are taken as higher-is-better, as a claim's ``better`` defaults."""
    info = metric_info(key)
    return info is not None and info.better == "lower"


# ---------------------------------------------------------------- selecting and pairing values


@dataclass(frozen=True)
class Side:
    """One metric key, restricted to trials whose config matches ``where``."""

    key: str
    where: tuple = ()  # ((param, value), ...) so a Side can be hashed

    @classmethod
    def of(cls, key: str, where: dict | None = None) -> "Side":
        return cls(key, tuple(sorted((where or {}).items())))

    @property
    def filters(self) -> dict:
        return dict(self.where)

    def describe(self) -> str:
        cond = ", ".join(f"{k}={v}" for k, v in self.where)
        return f"{self.key} [{cond}]" if cond else self.key


def same_value(logged, wanted) -> bool:
    """A logged param (MLflow keeps strings) equals a YAML value: 0.3 == "0.3", true == "True"."""
    if logged is None or (isinstance(logged, float) and math.isnan(logged)):
        return False
    if isinstance(wanted, bool):
        return str(logged).lower() == str(wanted).lower()
    if isinstance(wanted, (int, float)):
        try:
            return float(logged) == float(wanted)
        except ValueError:
            return False
    return str(logged) == str(wanted)


def rows_of(frame: pd.DataFrame, side: Side) -> pd.DataFrame:
    rows = frame[frame["key"] == side.key]
    for param, wanted in side.where:
        column = f"param.{param}"
        if column not in rows:
            return rows.iloc[0:0]
        rows = rows[rows[column].map(lambda v, w=wanted: same_value(v, w)).astype(bool)]
    return rows


def _overlap(a: pd.DataFrame, b: pd.DataFrame, param: str) -> bool:
    column = f"param.{param}"
    return bool(set(a[column].dropna()) & set(b[column].dropna()))


def paired_values(frame: pd.DataFrame, cell_params: list[str], a: Side, b: Side,
                  drop: dict | None = None) -> pd.DataFrame:
    """Columns ``a`` and ``b``, one row per pairing unit: the seed plus every swept parameter
    that neither side fixes and on which the two sides overlap (so trials of different cells
    are only paired when the sides are about different cells on purpose). With ``drop``
    ({param, from, to}) each side's value is value(param=from) - value(param=to), per unit."""
    ra, rb = rows_of(frame, a), rows_of(frame, b)
    fixed = set(a.filters) | set(b.filters) | ({drop["param"]} if drop else set())
    free = [p for p in cell_params if p not in fixed and _overlap(ra, rb, p)]
    unit = ["seed", *(f"param.{p}" for p in free)]
    va, vb = _unit_values(ra, unit, drop), _unit_values(rb, unit, drop)
    pairs = pd.concat({"a": va, "b": vb}, axis=1, join="inner")
    return pairs.dropna()


def _unit_values(rows: pd.DataFrame, unit: list[str], drop: dict | None) -> pd.Series:
    if rows.empty:
        return pd.Series(dtype=float)
    if not drop:
        return rows.groupby(unit, dropna=False)["value"].mean()
    column = rows[f"param.{drop['param']}"]
    start = rows[column.map(lambda v: same_value(v, drop["from"]))].groupby(unit, dropna=False)["value"].mean()
    end = rows[column.map(lambda v: same_value(v, drop["to"]))].groupby(unit, dropna=False)["value"].mean()
    return (start - end).dropna()


def cell_sides(frame: pd.DataFrame, cell: dict, key_a: str, key_b: str) -> tuple[Side, Side]:
    """Sides for "method A vs method B in this cell". B keeps only the cell values it shares
    with A: when the two methods come from different trials (a model with and without
    attention), the parameter that switches the method cannot be held fixed."""
    ra, rb = frame[frame["key"] == key_a], frame[frame["key"] == key_b]
    shared = {p: v for p, v in cell.items() if _overlap(ra, rb, p)}
    return Side.of(key_a, cell), Side.of(key_b, shared)


# ---------------------------------------------------------------- the grammar


@dataclass
class Claim:
    text: str
    study: str
    a: Side
    b: Side | None = None  # None: a threshold claim
    better: str = "higher"  # compare: which way A should differ from B; threshold: below -> lower
    threshold: float | None = None
    drop: dict | None = None
    margin: float = 0.0


def parse_claims(doc: dict, family: str, source: str | None = None) -> list[Claim]:
    """The ``claims`` list of a family YAML, checked: one clear error per malformed entry
    (``source`` names the YAML in the message; default ``<family>.yaml``)."""
    raw = doc.get("claims") or []
    source = source or f"{family}.yaml"
    if not isinstance(raw, list):
        raise UsageError(f"{source}: claims: expected a list")
    specs = doc.get("studies") or {}
    studies, known = set(specs), set(doc.get("defaults") or {})
    # the YAML's first study, as a sweep's default (spaces.py) and the report's headline (a set has no order)
    default_study = doc.get("default_study") or next(iter(specs), None)
    return [_parse_one(entry, f"{source}: claims[{i}]", studies, known, default_study) for i, entry in enumerate(raw)]


def validate_claims(doc: dict, family: str, source: str) -> list[Claim]:
    """:func:`parse_claims`, plus what only the study's YAML entry can tell before a sweep: a
    ``where`` or ``drop`` on a grid parameter must name values of that grid, and an eval axis
    in a metric key (``test/m:k:20/acc``) must be one the study evaluates, with that value.
    Otherwise the claim would select no trial and stay INCONCLUSIVE after the whole sweep."""
    claims = parse_claims(doc, family, source)
    for i, claim in enumerate(claims):
        where = f"{source}: claims[{i}] ({claim.text!r})"
        spec = (doc.get("studies") or {}).get(claim.study) or {}
        grid = spec.get("grid") or {}
        eval_axes = {**(doc.get("eval") or {}), **(spec.get("eval") or {})}
        for side in (claim.a, claim.b) if claim.b else (claim.a,):
            for param, value in side.where:
                if param in grid and not any(same_value(v, value) for v in grid[param]):
                    raise UsageError(f"{where}: {param}={value!r} is not in study {claim.study!r}'s grid {grid[param]}")
            parsed = parse_metric_key(side.key)
            for axis, value in (parsed["axes"] if parsed else {}).items():
                if axis not in eval_axes or not any(same_value(value, v) for v in eval_axes[axis]):
                    raise UsageError(f"{where}: {side.key} names eval axis {axis}={value}, but study {claim.study!r} "
                                     f"evaluates {axis}: {eval_axes.get(axis, 'not an eval axis')}")
        if claim.drop:
            values = grid.get(claim.drop["param"])
            if values is None or not all(any(same_value(v, claim.drop[end]) for v in values) for end in ("from", "to")):
                raise UsageError(f"{where}: drop needs {claim.drop['param']} swept in study {claim.study!r} with "
                                 f"{claim.drop['from']!r} and {claim.drop['to']!r} in its grid (grid: {values})")
    return claims


def _parse_one(entry, where: str, studies: set, known: set, default_study) -> Claim:
    if not isinstance(entry, dict) or not isinstance(entry.get("claim"), str):
        raise UsageError(f"{where}: expected a mapping with a 'claim' text")
    unknown = set(entry) - CLAIM_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {sorted(unknown)}")
    study = entry.get("study", default_study)
    if study not in studies:
        raise UsageError(f"{where}.study: unknown study {study!r}")
    if ("compare" in entry) == ("threshold" in entry):
        raise UsageError(f"{where}: needs exactly one of 'compare' or 'threshold'")
    margin = entry.get("margin", 0.0)
    if not _number(margin) or margin < 0:
        raise UsageError(f"{where}.margin: expected a number >= 0")
    claim = Claim(text=entry["claim"], study=study, a=Side.of(""), margin=float(margin))
    if "threshold" in entry:
        spec = entry["threshold"]
        bounds = set(spec) & {"below", "above"} if isinstance(spec, dict) else set()
        if len(bounds) != 1 or not isinstance(spec.get("metric"), str) or set(spec) - {"metric", "below", "above", "where"}:
            raise UsageError(f"{where}.threshold: expected {{metric: KEY, below|above: NUMBER[, where: {{...}}]}}")
        bound = spec.get("below", spec.get("above"))
        if not _number(bound):
            raise UsageError(f"{where}.threshold: the bound must be a number, got {bound!r}")
        claim.a = Side.of(_key(spec["metric"], where), _where(spec.get("where"), known, f"{where}.threshold.where"))
        claim.threshold, claim.better = float(bound), "lower" if "below" in spec else "higher"
        if "drop" in entry:
            raise UsageError(f"{where}: 'drop' goes with 'compare', not 'threshold'")
        return claim
    spec = entry["compare"]
    if not isinstance(spec, dict) or not isinstance(spec.get("metric"), str) or set(spec) - COMPARE_KEYS:
        raise UsageError(f"{where}.compare: expected {{metric, baseline, better, where, baseline_where}} with a metric key")
    better = spec.get("better", "lower" if lower_is_better(spec["metric"]) else "higher")
    if better not in ("higher", "lower"):
        raise UsageError(f"{where}.compare.better: expected higher or lower, got {better!r}")
    shared = _where(spec.get("where"), known, f"{where}.compare.where")
    claim.a = Side.of(_key(spec["metric"], where), shared)
    claim.b = Side.of(_key(spec.get("baseline", spec["metric"]), where),
                      {**shared, **_where(spec.get("baseline_where"), known, f"{where}.compare.baseline_where")})
    claim.better = better
    if "drop" in entry:
        drop = entry["drop"]
        if not isinstance(drop, dict) or set(drop) != {"param", "from", "to"}:
            raise UsageError(f"{where}.drop: expected {{param, from, to}}")
        if drop["param"] not in known:
            raise UsageError(f"{where}.drop.param: unknown config key {drop['param']!r}")
        claim.drop = dict(drop)
    if claim.a == claim.b:
        raise UsageError(f"{where}.compare: both sides are the same ({claim.a.describe()})")
    return claim


def _key(value, where: str) -> str:
    """A metric key as MLflow holds it: ``<split>/<method>[:<axis>:<value>...]/<metric>`` or ``perf/...``."""
    if not isinstance(value, str) or not (parse_metric_key(value) or value.startswith(("perf/", "info/"))):
        raise UsageError(f"{where}: {value!r} is not a metric key (<split>/<method>/<metric>, perf/<what>_ms)")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _where(value, known: set, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UsageError(f"{where}: expected a mapping of config key -> value")
    bad = sorted(set(value) - known)
    if bad:
        raise UsageError(f"{where}: unknown config key(s) {bad}")
    return dict(value)


# ---------------------------------------------------------------- checking claims


@dataclass
class ClaimResult:
    claim: Claim
    status: str
    evidence: str
    test: Paired | None = None
    p_holm: float | None = None
    reason: str = ""
    extra: dict = field(default_factory=dict)
    seeds: SeedsNeeded | None = None  # INCONCLUSIVE only: paired seeds for 80% power at its Holm level

    def record(self) -> dict:
        t = self.test
        return {
            "claim": self.claim.text, "study": self.claim.study, "status": self.status, "reason": self.reason,
            "a": self.claim.a.describe(), "b": self.claim.b.describe() if self.claim.b else None,
            "threshold": self.claim.threshold, "drop": self.claim.drop, "margin": self.claim.margin,
            "n": t.n if t else 0, "mean_a": _num(t.mean_a) if t else None, "mean_b": _num(t.mean_b) if t else None,
            "diff": _num(t.diff) if t else None, "diff_ci": list(t.diff_ci) if t and t.diff_ci else None,
            "p_t": t.p_t if t else None, "p_holm": self.p_holm, "p_wilcoxon": t.p_wilcoxon if t else None,
            "d_z": t.d_z if t else None, "p_a_gt_b": t.p_a_gt_b if t else None,
            **(self.seeds.record() if self.seeds else {"seeds_needed": None}),
        }


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def check_claims(claims: list[Claim], studies: dict, alpha: float = ALPHA) -> list[ClaimResult]:
    """``studies`` maps a study name to ``(frame, cell_params)`` of its finished trials. The
    t-test p-values of every claim tested here form one Holm family."""
    tests = [_test(c, studies.get(c.study)) for c in claims]
    raw = [t.p_t if isinstance(t, Paired) else None for t in tests]
    results = [_judge(c, t, p, alpha) for c, t, p in zip(claims, tests, holm(raw))]
    # the level each claim must reach in its place of Holm's order; untested claims plan for the strictest
    levels = [level if level is not None else alpha / max(len(claims), 1) for level in holm_levels(raw, alpha)]
    for result, level in zip(results, levels):
        if result.status == INCONCLUSIVE:
            result.seeds = for_test(result.test, level, result.claim.margin)
    return results


def _test(claim: Claim, study) -> Paired | str:
    if study is None:
        return f"no finished trials of study {claim.study!r} in this report"
    frame, cell_params = study
    if claim.b is None:
        rows = rows_of(frame, claim.a)
        if rows.empty:
            return f"no values of {claim.a.describe()}"
        return one_sample_test(rows.groupby("run_id")["value"].mean(), claim.threshold)
    pairs = paired_values(frame, cell_params, claim.a, claim.b, claim.drop)
    if pairs.empty:
        missing = [s.describe() for s in (claim.a, claim.b) if rows_of(frame, s).empty]
        return f"no values of {', '.join(missing)}" if missing else "no trials pair up (same seed) across the two sides"
    return paired_test(pairs["a"].to_numpy(), pairs["b"].to_numpy())


def _judge(claim: Claim, test: Paired | str, p_adj: float | None, alpha: float) -> ClaimResult:
    if isinstance(test, str):
        return ClaimResult(claim, INCONCLUSIVE, test, reason=test)
    sign = 1.0 if claim.better == "higher" else -1.0  # the claimed sign of A - B (value - threshold)
    ci = test.diff_ci
    if test.n < 2:
        status, reason = INCONCLUSIVE, f"n={test.n}: a test needs at least 2 seeds"
    elif ci is not None and -claim.margin <= ci[0] and ci[1] <= claim.margin:
        status = INVALIDATED
        reason = ("identical in every seed" if test.diff == 0 and ci == (0.0, 0.0)
                  else f"95% CI of the difference inside ±{fmt(claim.margin)}: no meaningful effect")
    elif p_adj is not None and p_adj < alpha:
        status = VALIDATED if np.sign(test.diff) == sign else INVALIDATED
        way = "in the claimed direction" if status == VALIDATED else "against the claim"
        reason = f"significant (Holm p < {alpha}) {way}"
    else:
        status, reason = INCONCLUSIVE, f"not significant after Holm (alpha {alpha})"
    return ClaimResult(claim, status, _evidence(claim, test, p_adj) + f" → {reason}", test, p_adj, reason)


def _evidence(claim: Claim, t: Paired, p_adj: float | None) -> str:
    if claim.b is None:
        head = (f"{claim.a.describe()} = {fmt(t.mean_a)} (mean of n={t.n}), claimed "
                f"{'below' if claim.better == 'lower' else 'above'} {fmt(claim.threshold)}")
    else:
        what = f"drop {claim.drop['from']}→{claim.drop['to']} of " if claim.drop else ""
        head = f"{what}{claim.a.describe()} = {fmt(t.mean_a)} vs {claim.b.describe()} = {fmt(t.mean_b)} (n={t.n} paired)"
    parts = [head]
    ci = t.diff_ci
    if ci is not None:
        parts.append(f"Δ = {fmt(t.diff, signed=True)} [{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]")
    else:
        parts.append(f"Δ = {fmt(t.diff, signed=True)}")
    if t.p_t is not None:
        parts.append(f"t-test {p_is(t.p_t)}, Holm {p_is(p_adj)}" + (f" ({t.note})" if t.note else ""))
    else:
        parts.append(f"t-test n/a ({t.note})")
    if wilcoxon_can_decide(t.n):  # below n = 6 its p cannot fall under 0.05: printing it says nothing
        parts.append(f"Wilcoxon {p_is(t.p_wilcoxon)}")
    if t.d_z is not None:
        parts.append(f"d_z = {t.d_z:.2f}")
    if t.p_a_gt_b is not None and claim.b is not None:
        parts.append(f"P(A>B) = {t.p_a_gt_b:.2f}")
    return "; ".join(parts)
