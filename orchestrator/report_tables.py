"""The tables of a study: methods x metrics, grids, eval axes, timings, paired comparisons
(baseline, A/B reference cell, drops), search rankings and the best configuration.

Every function takes a study's data (:mod:`orchestrator.report_data`) and returns a
:class:`~orchestrator.report_render.Table` (or None when the study has nothing for it).
Comparisons are paired by seed (paired t-test, Wilcoxon signed-rank), Holm-corrected within each
table. A Wilcoxon column appears only where some comparison has enough seeds for it to reach
p < alpha at all (:func:`wilcoxon_can_decide`): below that it is a column of p >= 0.0625 that
says nothing, and the report says so once instead.
"""

from __future__ import annotations

import pandas as pd

from orchestrator.claims import ALPHA, Side, cell_sides, lower_is_better, paired_values, rows_of, same_value
from orchestrator.report_config import ReportConfig, metric_label
from orchestrator.report_data import StudyRuns, StudyStats, axis_items, number_or_none, order_key
from orchestrator.report_render import Table
from orchestrator.power import for_test
from orchestrator.stats import (fmt, format_interval, format_p, holm, holm_levels, p_is, paired_test, t_interval,
                               wilcoxon_can_decide)
from trainables.common.metrics import metric_key

RANKED_TRIALS = 10


def _with_wilcoxon(tests: list) -> bool:
    return any(t is not None and wilcoxon_can_decide(t.n) for t in tests)


def methods_of(study: StudyRuns, cfg: ReportConfig, split: str) -> list[str]:
    """Method specs with plain metrics in this study: the YAML's ``methods`` (in order) when
    given, else every method that reports plain ``<split>/<method>/<metric>`` names."""
    keys = set(study.frame["key"])
    if cfg.methods:
        return [m for m in cfg.methods if any(k.startswith(f"{split}/{m}/") for k in keys)]
    rows = study.frame[(study.frame["split"] == split) & (study.frame["axes"] == "")]
    present = sorted(set(rows["method"]))
    return ([cfg.baseline] if cfg.baseline in present else []) + [m for m in present if m != cfg.baseline]


def metrics_of(study: StudyRuns, cfg: ReportConfig, split: str) -> list[str]:
    present = set(study.frame.loc[study.frame["split"] == split, "metric"])
    return [m for m in cfg.headline_metrics if m in present]


def column(cfg: ReportConfig, method: str, taken: list[str]) -> str:
    """A method's column name, kept apart from param columns of the same name (wm_attention's
    ``attention`` is both a swept param and a method)."""
    label = cfg.label(method)
    return f"{label} (method)" if label in taken else label


def headline_table(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> Table:
    """Method x metric (each cell mean ± 95% t-interval over seeds, n shown), per swept cell."""
    split, metrics = cfg.split, metrics_of(study, cfg, cfg.split)
    rows = []
    for cell in study.cells():
        for spec in methods_of(study, cfg, split):
            values = [stats.text(cell, f"{split}/{spec}/{m}") for m in metrics]
            if any(v != "—" for v in values):
                rows.append({**study.cell_dict(cell), "Method": cfg.label(spec),
                             **{metric_label(m): v for m, v in zip(metrics, values)}})
    return Table(f"{split} metrics, mean ± 95% t-interval over seeds (n)", pd.DataFrame(rows))


def grid_tables(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> list[Table]:
    """One table per headline metric: rows = swept cells, columns = methods."""
    split, tables = cfg.split, []
    methods = methods_of(study, cfg, split)
    for metric in metrics_of(study, cfg, split):
        rows = [{**study.cell_dict(cell),
                 **{column(cfg, m, study.cell_params): stats.text(cell, f"{split}/{m}/{metric}") for m in methods}}
                for cell in study.cells()]
        tables.append(Table(f"{split} {metric_label(metric)} vs {', '.join(study.axes)}", pd.DataFrame(rows)))
    return tables


def eval_signatures(study: StudyRuns, cfg: ReportConfig) -> dict[tuple, list[str]]:
    """Eval-axis signatures worth a table -> the methods reporting them. A study without swept
    params gets every axis that takes more than one value; a study with swept params only the
    axes its YAML entry declares (the family defaults would repeat the same table everywhere)."""
    rows = study.frame[(study.frame["split"] == cfg.split) & (study.frame["axes"] != "")]
    allowed = {m.split(":")[0] for m in cfg.methods} if cfg.methods else None
    values: dict[str, set] = {}
    for axes in set(rows["axes"]):
        for name, value in axis_items(axes):
            values.setdefault(name, set()).add(value)
    varying = {a for a, v in values.items() if len(v) > 1}
    interest = varying if not study.cell_params else varying & set(study.spec.get("eval") or {})
    order = [m.split(":")[0] for m in cfg.methods] + sorted(set(rows["method"]))
    out: dict[tuple, set[str]] = {}
    for (method, axes), _ in rows.groupby(["method", "axes"]):
        signature = tuple(name for name, _ in axis_items(axes))
        if set(signature) & interest and (allowed is None or method in allowed):
            out.setdefault(signature, set()).add(method)
    return {sig: sorted(methods, key=order.index) for sig, methods in out.items()}


def axis_combos(study: StudyRuns, signature: tuple, methods: list[str], split: str) -> list[str]:
    rows = study.frame[(study.frame["split"] == split) & study.frame["method"].isin(methods)]
    combos = {a for a in set(rows["axes"]) if tuple(n for n, _ in axis_items(a)) == signature}
    return sorted(combos, key=lambda a: tuple(order_key(v) for _, v in axis_items(a)))


def eval_tables(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> list[Table]:
    """Metric vs eval-axis value (rows), per method (columns), per swept cell."""
    split, tables = cfg.split, []
    for signature, methods in eval_signatures(study, cfg).items():
        combos = axis_combos(study, signature, methods, split)
        for metric in metrics_of(study, cfg, split):
            rows = []
            for cell in study.cells():
                for axes in combos:
                    items = axis_items(axes)
                    taken = [*study.cell_params, *signature]
                    values = {column(cfg, m, taken): stats.text(cell, metric_key(split, m, metric, **dict(items)))
                              for m in methods}
                    if any(v != "—" for v in values.values()):
                        rows.append({**study.cell_dict(cell), **dict(items), **values})
            if rows:
                tables.append(Table(f"{split} {metric_label(metric)} vs {', '.join(signature)}", pd.DataFrame(rows)))
    return tables


def perf_table(study: StudyRuns, stats: StudyStats) -> Table | None:
    keys = sorted(k for k in set(study.frame["key"]) if k.startswith("perf/"))
    if not keys:
        return None
    rows = [{**study.cell_dict(cell), **{k: stats.text(cell, k) for k in keys}} for cell in study.cells()]
    return Table("timings (perf/, ms), mean ± 95% t-interval over seeds (n)", pd.DataFrame(rows))


def _pvals(tests: list, attr: str) -> list[float | None]:
    return holm([getattr(t, attr) if t is not None else None for t in tests])


def baseline_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """Every method against the family's baseline, per cell and headline metric, paired by seed."""
    split, baseline = cfg.split, cfg.baseline
    if not baseline:
        return None
    frame = study.frame
    entries = []
    for cell in study.cells():
        for spec in methods_of(study, cfg, split):
            if spec == baseline:
                continue
            for metric in metrics_of(study, cfg, split):
                key_a, key_b = f"{split}/{spec}/{metric}", f"{split}/{baseline}/{metric}"
                a, b = cell_sides(frame, study.cell_dict(cell), key_a, key_b)
                if rows_of(frame, a).empty or rows_of(frame, b).empty:
                    continue
                pairs = paired_values(frame, study.cell_params, a, b)
                entries.append((cell, spec, metric, paired_test(pairs["a"], pairs["b"]) if not pairs.empty else None))
    if not entries:
        return None
    tests = [e[3] for e in entries]
    p_t, p_w = _pvals(tests, "p_t"), _pvals(tests, "p_wilcoxon")
    wilcoxon = _with_wilcoxon(tests)
    rows, records = [], []
    for (cell, spec, metric, t), pt, pw in zip(entries, p_t, p_w):
        row = {**study.cell_dict(cell), "Method": cfg.label(spec), "Metric": metric_label(metric),
               "A − B [95% CI]": _diff_text(t), "t-test p (Holm)": _p_pair(t, "p_t", pt)}
        if wilcoxon:
            row["Wilcoxon p (Holm)"] = (_p_pair(t, "p_wilcoxon", pw) if t is not None and wilcoxon_can_decide(t.n)
                                        else "— (too few seeds)")
        rows.append({**row, "d_z": _dz(t), "P(A>B)": "n/a" if t is None or t.p_a_gt_b is None else f"{t.p_a_gt_b:.2f}",
                     "n": t.n if t else 0})
        records.append({"cell": study.label(cell), "method": spec, "baseline": baseline, "metric": metric,
                        **_test_record(t), "p_t_holm": pt, "p_wilcoxon_holm": pw})
    notes = [f"A = the method, B = {cfg.label(baseline)} in the same cell, paired by seed; p-values two-sided, "
             f"Holm-adjusted over the {len(entries)} comparisons of this table (raw p first, adjusted in parentheses); "
             "d_z = mean/sd of the paired differences; P(A>B) = share of seeds with A > B (ties count 1/2)."]
    title = f"paired comparisons against the baseline {cfg.label(baseline)} ({split})"
    return Table(title, pd.DataFrame(rows), notes, records)


def _test_record(t) -> dict:
    if t is None:
        return {"n": 0}
    return {"n": t.n, "mean_a": number_or_none(t.mean_a), "mean_b": number_or_none(t.mean_b),
            "diff": number_or_none(t.diff),
            "diff_ci": list(t.diff_ci) if t.diff_ci else None, "p_t": t.p_t, "p_wilcoxon": t.p_wilcoxon,
            "d_z": t.d_z, "p_a_gt_b": t.p_a_gt_b, "note": t.note}


def _diff_text(t) -> str:
    if t is None or t.n == 0:
        return "n/a (no paired seeds)"
    ci = t.diff_ci
    if ci is None:
        return f"{fmt(t.diff, signed=True)} (n={t.n}, no interval)"
    return f"{fmt(t.diff, signed=True)} [{fmt(ci[0], signed=True)}, {fmt(ci[1], signed=True)}]"


def _p_pair(t, attr: str, adjusted) -> str:
    if t is None:
        return "n/a"
    raw = getattr(t, attr)
    if raw is None:
        return f"n/a ({t.note or 'no non-zero difference'})"
    return f"{format_p(raw)} ({format_p(adjusted)})"


def _dz(t) -> str:
    if t is None or t.d_z is None:
        return "n/a" + (f" ({t.note})" if t is not None and t.note else "")
    return f"{t.d_z:.2f}"


def find_reference(study: StudyRuns, wanted: dict) -> tuple | None:
    for cell in study.cells():
        values = study.cell_dict(cell)
        if all(p in values and same_value(values[p], v) for p, v in wanted.items()):
            return cell
    return None


def _against_reference(study: StudyRuns, key: str, ref: tuple, cells: list[tuple]) -> list[tuple]:
    """(test, Holm p t-test, Holm p Wilcoxon) of ``key`` in each cell vs the reference cell."""
    tests = []
    for cell in cells:
        pairs = paired_values(study.frame, study.cell_params, Side.of(key, study.cell_dict(cell)),
                              Side.of(key, study.cell_dict(ref)))
        tests.append(paired_test(pairs["a"], pairs["b"]) if not pairs.empty else None)
    return list(zip(tests, _pvals(tests, "p_t"), _pvals(tests, "p_wilcoxon")))


def ab_table(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> Table | None:
    """Each cell of an A/B study against its reference cell (same seeds): mean ± CI per metric,
    the paired difference and its Holm-adjusted p-values (over the cells, per method and metric),
    and one verdict line per cell."""
    wanted = cfg.reference.get(study.name)
    if not wanted:
        return None
    ref = find_reference(study, wanted)
    if ref is None:
        return Table("A/B against the reference cell", pd.DataFrame([{"reference": str(wanted), "cells": "not in the data"}]),
                     [f"the reference cell {wanted} has no finished trials in this sweep"])
    split, metrics = cfg.split, metrics_of(study, cfg, cfg.split)
    others = [c for c in study.cells() if c != ref]
    keys = set(study.frame["key"])
    rows, notes, records = [], [], []
    methods = [m for m in cfg.focus_methods if any(k.startswith(f"{split}/{m}/") for k in keys)]
    results = {(method, m): _against_reference(study, f"{split}/{method}/{m}", ref, others)
               for method in methods for m in metrics}
    levels = {key: holm_levels([t.p_t if t else None for t, _, _ in tests], ALPHA) for key, tests in results.items()}
    wilcoxon = _with_wilcoxon([t for tests in results.values() for t, _, _ in tests])
    p_name = "t/W" if wilcoxon else "t"
    for method in methods:
        row = {"Cell": study.label(ref) + " (reference)", "Method": cfg.label(method)}
        for m in metrics:
            row.update({metric_label(m): stats.text(ref, f"{split}/{method}/{m}"), f"Δ {metric_label(m)}": "—",
                        f"p {metric_label(m)} {p_name} (Holm)": "—"})
        rows.append(row)
        for i, cell in enumerate(others):
            row, verdict = {"Cell": study.label(cell), "Method": cfg.label(method)}, []
            for m in metrics:
                t, p_t, p_w = results[method, m][i]
                p_text = format_p(p_t) + (f" / {format_p(p_w)}" if wilcoxon else "")
                row.update({metric_label(m): stats.text(cell, f"{split}/{method}/{m}"), f"Δ {metric_label(m)}": _diff_text(t),
                            f"p {metric_label(m)} {p_name} (Holm)": p_text})
                verdict.append(_verdict(m, t, p_t, levels[method, m][i] or ALPHA / max(len(others), 1)))
                records.append({"cell": study.label(cell), "reference": study.label(ref), "method": method, "metric": m,
                                **_test_record(t), "p_t_holm": p_t, "p_wilcoxon_holm": p_w})
            rows.append(row)
            notes.append(f"**{study.label(cell)}** vs reference ({cfg.label(method)}): " + "; ".join(verdict))
    if not rows:
        return None
    notes.append(f"Δ = cell − reference over the same seeds; t = paired t-test{', W = Wilcoxon signed-rank' if wilcoxon else ''}; p-values "
                 f"Holm-adjusted over the {len(others)} cells for each method and metric; significant at p < {ALPHA}.")
    return Table(f"A/B: every cell against the reference {study.label(ref)} ({split})", pd.DataFrame(rows), notes, records)


def drop_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """The seed's robustness shape: per method, how much the first headline metric falls from
    the param's first value to each other value, paired by seed (drop = value(first) - value(v))."""
    param, split = cfg.drops.get(study.name), cfg.split
    metrics = metrics_of(study, cfg, split)
    if not param or param not in study.axes or not metrics:
        return None
    metric = metrics[0]
    values = sorted({study.cell_dict(c)[param] for c in study.cells()}, key=order_key)
    rows = []
    for method in methods_of(study, cfg, split):
        side = Side.of(f"{split}/{method}/{metric}")
        row = {"Method": cfg.label(method)}
        for value in values[1:]:
            drops = paired_values(study.frame, study.cell_params, side, side, {"param": param, "from": values[0], "to": value})
            row[f"{param}={value}"] = format_interval(*t_interval(drops["a"].tolist()))
        rows.append(row)
    return Table(f"{split} {metric_label(metric)} drop from {param}={values[0]} (mean ± 95% t-interval over seeds, n)",
                 pd.DataFrame(rows), [f"drop = {metric_label(metric)} at {param}={values[0]} minus at the column's value, "
                                      "per seed (same seed in both cells); positive = the metric fell."])


def _verdict(metric: str, t, p_adj: float | None, level: float) -> str:
    """One cell's verdict; without one, the paired seeds that would give 80% power at ``level``
    (the raw-p threshold of the cell's place in Holm's order)."""
    name = metric_label(metric)
    seeds = f"; seeds for 80% power: {for_test(t, level).text()}"
    if t is None or t.n < 2:
        return f"{name}: n/a ({'no paired seeds' if t is None or t.n == 0 else t.note}){seeds}"
    if p_adj is None:
        return f"{name}: no difference ({t.note})"
    if p_adj >= ALPHA:
        return f"{name}: no significant difference (Δ = {fmt(t.diff, signed=True)}, {p_is(p_adj)} after Holm){seeds}"
    better = (t.diff < 0) == lower_is_better(metric)
    word = ("higher" if t.diff > 0 else "lower") + (" (better)" if better else " (worse)")
    return f"{name} {word}, Δ = {fmt(t.diff, signed=True)}, {p_is(p_adj)} after Holm"


def ranking_table(study: StudyRuns, cfg: ReportConfig) -> Table | None:
    """Search studies (sampled configs, one run each): the best trials by the objective."""
    objective, mode = cfg.objective.get("metric"), cfg.objective.get("mode", "max")
    frame = study.frame
    per_run = frame[frame["key"] == objective].set_index("run_id")["value"]
    if per_run.empty:
        return None
    best = per_run.sort_values(ascending=mode == "min").head(RANKED_TRIALS)
    method, rows = cfg.objective_method, []
    for run_id, value in best.items():
        run = frame[frame["run_id"] == run_id]
        first = run.iloc[0]
        row = {"seed": first["seed"], **{p: first[f"param.{p}"] for p in study.cell_params}, objective: fmt(value)}
        for metric in metrics_of(study, cfg, cfg.split):
            hit = run.loc[run["key"] == f"{cfg.split}/{method}/{metric}", "value"]
            row[f"{cfg.split} {metric_label(metric)}"] = fmt(float(hit.iloc[0])) if len(hit) else "—"
        rows.append(row)
    return Table(f"best {len(rows)} of {per_run.size} trials by {objective} ({mode}); single runs, n = 1 each",
                 pd.DataFrame(rows))


def best_configuration(study_stats: list[StudyStats], cfg: ReportConfig) -> dict | None:
    """The cell with the best mean objective over seeds, across the studies given."""
    objective, mode = cfg.objective.get("metric"), cfg.objective.get("mode", "max")
    best = None
    for st in study_stats:
        for cell in st.study.cells():
            iv = st.get(cell, objective)
            if iv.n and (best is None or (iv.mean > best[0] if mode == "max" else iv.mean < best[0])):
                best = (iv.mean, st, cell)
    if best is None:
        return None
    _, st, cell = best
    study = st.study
    changed = ", ".join(f"{k}={v}" for k, v in study.changed.items())
    config = "; ".join(x for x in (study.label(cell) if cell else "", changed) if x) or "defaults"
    row = {"Study": study.name, "Configuration": config,
           "Dataset": ", ".join(sorted(set(study.frame["dataset"]) - {""})) or "?",
           f"{objective} ({mode})": st.text(cell, objective)}
    for metric in cfg.headline_metrics:
        key = f"{cfg.split}/{cfg.objective_method}/{metric}"
        if st.get(cell, key).n:
            row[f"{cfg.split} {metric_label(metric)}"] = st.text(cell, key)
    return row
