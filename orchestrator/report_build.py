"""Assembling a report: per family, the study sections (headline first), claims, the best
configuration, plots; across families, a summary.

Per study the report uses the latest sweep that has finished trials (``--sweep`` picks one);
only trials with status ``finished`` enter the statistics, the others are counted and named.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.claims import ALPHA, check_claims, parse_claims
from orchestrator.report_data import ReportConfig, StudyRuns, StudyStats, load_runs, select_studies
from orchestrator.report_render import Report, Section, Table, now_text
from orchestrator.report_tables import (ab_table, baseline_table, best_configuration, drop_table, eval_tables,
                                        grid_tables, headline_table, perf_table, ranking_table)

NO_RELIABILITY = ("Reliability diagrams: skipped. The runs log ECE (15 equal-width bins) but not the per-bin "
                  "accuracy and confidence a reliability diagram needs, and MLflow holds no such data.")


def claims_section(claims: list, studies: list[StudyRuns]) -> Section:
    results = check_claims(claims, {s.name: (s.frame, s.cell_params) for s in studies})
    table = pd.DataFrame([{"Claim": r.claim.text, "Study": r.claim.study, "Status": r.status, "Evidence": r.evidence}
                          for r in results])
    note = (f"Status from a paired t-test over seeds, Holm-adjusted across the claims of this report ({len(claims)}) "
            f"(alpha {ALPHA}); VALIDATED: significant in the claimed direction; INVALIDATED: significant against it, "
            "or the 95% CI of the difference inside the claim's margin; INCONCLUSIVE: otherwise (or n < 2).")
    return Section("Claims", 2, tables=[Table("", table, [note], [r.record() for r in results])])


def fill_study_section(sec: Section, family: str, study: StudyRuns, stats: StudyStats, cfg: ReportConfig,
                       is_headline: bool, plots_dir: Path | None) -> None:
    """A study's tables (the headline study's own table is already in ``sec``) and plots."""
    if study.changed:
        sec.text.append("Every trial differs from the YAML defaults in: "
                        + ", ".join(f"{k}={v}" for k, v in study.changed.items()))
    if study.failed:
        sec.text.append("Not counted: " + "; ".join(study.failed))
    if study.is_search:
        sec.tables += [t for t in [ranking_table(study, cfg)] if t]
    else:
        if not is_headline:
            sec.tables += grid_tables(study, stats, cfg) if study.cell_params else [headline_table(study, stats, cfg)]
        sec.tables += eval_tables(study, stats, cfg)
        extra = (drop_table(study, cfg), ab_table(study, stats, cfg), baseline_table(study, cfg), perf_table(study, stats))
        sec.tables += [t for t in extra if t]
    if plots_dir is not None:
        from orchestrator.plots import study_plots  # matplotlib only when plots are asked for

        sec.plots += study_plots(family, study, stats, cfg, Path(plots_dir))


def family_sections(tracking_uri: str, family: str, doc: dict, study: str | None = None, sweep_id: str | None = None,
                    plots_dir: Path | None = None) -> tuple[list[Section], list[dict], dict | None]:
    """The markdown sections of one family, its per-cell statistics, and its best configuration."""
    cfg = ReportConfig.from_doc(doc, family)
    claims = parse_claims(doc, family)
    frame = load_runs(tracking_uri, family, study, sweep_id)
    scope = ", ".join(x for x in (study and f"study {study}", sweep_id and f"sweep {sweep_id}") if x)
    head = Section(f"{family}{f' ({scope})' if scope else ''}", 1, [doc.get("description", "")])
    if frame.empty:
        head.text += [f"No trial runs of {family}{f' ({scope})' if scope else ''} in {tracking_uri}."]
        return [head], [], None
    studies = select_studies(frame, doc, sweep_id)
    stats = [StudyStats(s) for s in studies]
    head.text += [f"Source: MLflow `{tracking_uri}`, experiment `{family}`; generated {now_text()}.",
                  f"Statistics: mean ± 95% Student-t interval over seeds with n; n = 1 is shown as such (no interval). "
                  f"Only trials with status `finished` count."]
    for s in studies:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
        ignored = f"; older sweeps left out: {', '.join(s.ignored)} (use --sweep)" if s.ignored else ""
        head.text.append(f"- study `{s.name}`: sweep {', '.join(s.sweeps)}: {counts}{ignored}")
    sections = [head]

    chosen = [s for s in studies if s.name == cfg.headline_study] or studies[:1]
    headline, headline_stats = chosen[0], stats[studies.index(chosen[0])]
    title = "Headline: study" if headline.name == cfg.headline_study else "Study"
    top = Section(f"{title} `{headline.name}`", 2, [headline.spec.get("description", "")])
    top.tables.append(headline_table(headline, headline_stats, cfg))
    sections.append(top)

    in_scope = claims if not (study or sweep_id) else [c for c in claims if c.study in {s.name for s in studies}]
    if in_scope:
        sections.append(claims_section(in_scope, studies))

    best = best_configuration(stats, cfg)
    if best:
        sections.append(Section("Best configuration", 2, [f"By the objective {cfg.objective.get('metric')} "
                                                          f"({cfg.objective.get('mode')}), mean over seeds, across the "
                                                          "studies above."], [Table("", pd.DataFrame([best]))]))

    for s, st in zip(studies, stats):
        sec = top if s is headline else Section(f"Study `{s.name}`", 2, [s.spec.get("description", "")])
        fill_study_section(sec, family, s, st, cfg, s is headline, plots_dir)
        if s is not headline:
            sections.append(sec)
    records = [r for st in stats for r in st.records(family)]
    return sections, records, ({"Family": family, **best} if best else None)


def build_report(tracking_uri: str, families, study: str | None = None, sweep_id: str | None = None,
                 plots_dir: Path | None = None, link_base: Path | None = None, docs: dict | None = None,
                 summary: bool | None = None) -> Report:
    """A report over one family (a name) or several (a list). ``docs`` maps a family to its YAML
    document (default: ``search_spaces/<family>.yaml``); ``summary`` (default: several families)
    puts the cross-family summary first."""
    from orchestrator.spaces import load_family_file

    families = [families] if isinstance(families, str) else list(families)
    sections, records, best = [], [], []
    for family in families:
        doc = (docs or {}).get(family) or load_family_file(family)
        s, r, b = family_sections(tracking_uri, family, doc, study, sweep_id, plots_dir)
        sections += s
        records += r
        best += [b] if b else []
    if summary or (summary is None and len(families) > 1):
        summary = Section("Cross-family summary", 1, ["Best configuration of each family by its YAML objective "
                                                      "(mean ± 95% t-interval over seeds, n shown) and its key test metrics."])
        summary.tables.append(Table("", pd.DataFrame(best).fillna("—") if best else
                                    pd.DataFrame([{"Family": ", ".join(families), "Result": "no finished trials"}])))
        sections = [summary] + sections
    sections.append(Section("Notes", 2, [NO_RELIABILITY] + ([] if plots_dir is not None else
                                                           ["Plots: none requested (--plots DIR, or --out FILE.md)."])))
    return Report(tracking_uri, sections, pd.DataFrame(records), link_base)
