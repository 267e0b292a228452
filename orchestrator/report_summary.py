"""The few sentences a report opens with, generated from its statistics: which method is best,
what is significant after Holm, what is not decided and why.

Nothing here computes a test: the sentences read the headline study's intervals, the records
of its baseline table (:func:`orchestrator.report_tables.baseline_table`) and the claim results,
so they say exactly what the tables below them say.
"""

from __future__ import annotations

from orchestrator.claims import ALPHA, INCONCLUSIVE, ClaimResult
from orchestrator.report_config import ReportConfig, metric_label
from orchestrator.report_data import StudyRuns, StudyStats
from orchestrator.report_render import Table
from orchestrator.report_tables import methods_of, metrics_of
from orchestrator.stats import fmt, p_is
from trainables.common.metrics import metric_info

LISTED = 6  # items named per sentence; the rest are counted (the tables below hold them all)


def best_cell(study: StudyRuns, stats: StudyStats, cfg: ReportConfig) -> tuple:
    """The cell with the best mean objective (``()`` for a study without swept params)."""
    cells = study.cells()
    objective, mode = cfg.objective.get("metric", ""), cfg.objective.get("mode", "max")
    scored = [(stats.get(c, objective).mean, c) for c in cells if stats.get(c, objective).n]
    if not scored:
        return cells[0]
    return (max if mode == "max" else min)(scored, key=lambda x: x[0])[1]


def summary_lines(study: StudyRuns, stats: StudyStats, cfg: ReportConfig, baseline: Table | None,
                  claims: list[ClaimResult], few_seeds: dict[str, int]) -> list[str]:
    """The opening sentences; ``few_seeds`` maps each study whose cells all have fewer seeds
    than a Wilcoxon test needs to its largest n (their tables show no Wilcoxon column)."""
    split = cfg.split
    metrics, methods = metrics_of(study, cfg, split), methods_of(study, cfg, split)
    if not metrics or not methods:
        return [f"Study `{study.name}` has no finished trial with {split} metrics "
                f"({', '.join(cfg.headline_metrics)}), so nothing is compared yet."]
    cell = best_cell(study, stats, cfg)
    where = f"in the best cell by {cfg.objective.get('metric')} ({study.label(cell)}), " if cell else ""
    best = where + _best_sentence(cell, stats, cfg, methods, metrics[0])
    lines = [best[0].upper() + best[1:]]
    if baseline is not None and baseline.records:
        lines += _baseline_sentences([r for r in baseline.records if r["cell"] == study.label(cell)], cfg)
    if claims:
        lines.append(_claims_sentence(claims))
    if few_seeds:
        where = ", ".join(f"`{name}` (n ≤ {n})" for name, n in few_seeds.items())
        lines.append(f"No Wilcoxon signed-rank p-values in studies {where}: with n < 6 paired seeds a two-sided "
                     f"Wilcoxon test cannot reach p < {ALPHA} (its smallest possible p is 2/2^n: 0.25 at n = 3, "
                     "0.0625 at n = 5); the paired t-test decides there.")
    return lines


def _best_sentence(cell: tuple, stats: StudyStats, cfg: ReportConfig, methods: list[str], metric: str) -> str:
    key = f"{cfg.split}/{{}}/{metric}"
    info = metric_info(metric)
    lower = info is not None and info.better == "lower"
    ranked = sorted((m for m in methods if stats.get(cell, key.format(m)).n),
                    key=lambda m: stats.get(cell, key.format(m)).mean, reverse=not lower)
    if not ranked:
        return f"no method reports {cfg.split} {metric_label(metric)}."
    best, rest = ranked[0], ranked[1:]
    text = (f"on {cfg.split} {metric_label(metric)} ({'lower' if lower else 'higher'} is better) the best method is "
            f"**{cfg.label(best)}**, {stats.text(cell, key.format(best))}")
    if rest:
        text += "; then " + ", ".join(f"{cfg.label(m)} {stats.text(cell, key.format(m))}" for m in rest[:LISTED - 1])
        text += f" and {len(rest) - LISTED + 1} more" if len(rest) > LISTED - 1 else ""
    return text + "."


def _baseline_sentences(records: list[dict], cfg: ReportConfig) -> list[str]:
    significant, not_significant, untested = [], [], []
    for r in records:
        name = f"{cfg.label(r['method'])} {metric_label(r['metric'])}"
        if r.get("p_t_holm") is None:
            untested.append(f"{name} ({r.get('note') or 'no paired seeds'})")
        elif r["p_t_holm"] < ALPHA:
            info = metric_info(r["metric"])
            better = (r["diff"] < 0) == (info is not None and info.better == "lower")
            significant.append(f"{name} {'higher' if r['diff'] > 0 else 'lower'} ({'better' if better else 'worse'}, "
                               f"Δ = {fmt(r['diff'], signed=True)}, {p_is(r['p_t_holm'])})")
        else:
            not_significant.append(f"{name} (Δ = {fmt(r['diff'], signed=True)}, {p_is(r['p_t_holm'])})")
    against = f"against the baseline {cfg.label(cfg.baseline)} (paired t-test over seeds, Holm over the table's tests)"
    lines = []
    if significant:
        lines.append(f"Significant {against}: {_listed(significant)}.")
    else:
        lines.append(f"Nothing is significant {against}.")
    if not_significant:
        lines.append(f"Not decided (not significant after Holm at alpha {ALPHA}; more seeds or a larger effect "
                     f"would be needed): {_listed(not_significant)}.")
    if untested:
        lines.append(f"No test possible: {_listed(untested)}.")
    return lines


def _claims_sentence(results: list[ClaimResult]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    text = "Claims: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "."
    open_ones = [_open_claim(r) for r in results if r.status == INCONCLUSIVE]
    if open_ones:
        text += f" Not decided: {_listed(open_ones)}."
    return text


def _open_claim(r: ClaimResult) -> str:
    n = r.test.n if r.test else 0
    reason = r.reason if "n=" in r.reason else f"{r.reason}, n={n}"
    return f"\u201c{r.claim.text}\u201d ({reason})"


def _listed(items: list[str]) -> str:
    shown = "; ".join(items[:LISTED])
    return shown + (f"; and {len(items) - LISTED} more (tables below)" if len(items) > LISTED else "")
