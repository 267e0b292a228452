"""Assembling a report: per family, the headline study's table and the sentences that read it
first, then claims, where the numbers come from, every study's details (tables, plots,
reliability diagrams) and the best configuration; across families, a summary.

Per study the report uses the latest sweep that has finished trials (``--sweep`` picks one);
only trials with status ``finished`` enter the statistics, the others are counted and named.
A study's settings (its YAML entry, ``report:`` and ``claims:``) come from the compiled study
its sweep saved (:mod:`orchestrator.study_record`), so editing the YAML later changes nothing
in the report of a sweep already run; sweeps that saved none use the YAML as it is now.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from orchestrator.claims import ALPHA, Claim, ClaimResult, check_claims, parse_claims
from orchestrator.report_config import ReportConfig
from orchestrator.report_data import (CLIPPED_NOTE, CLIPPED_TEXT, StudyRuns, StudyStats, chosen_sweeps, load_runs,
                                      select_studies)
from orchestrator.report_render import Report, Section, Table, now_text
from orchestrator.report_summary import best_cell, summary_lines
from orchestrator.report_tables import (ab_table, baseline_table, best_configuration, drop_table, eval_tables,
                                        grid_tables, headline_table, perf_table, ranking_table)
from orchestrator.stats import wilcoxon_can_decide
from orchestrator.study_record import load_records

STATISTICS = ("Statistics: mean ± 95% Student-t interval over seeds with n; n = 1 is shown as such (no interval). "
              "Only trials with status `finished` count. Comparisons are paired by seed; p-values are two-sided and "
              f"Holm-adjusted within each table (claims: across the report), significant at p < {ALPHA}.")


def claims_section(claims: list[Claim], studies: list[StudyRuns]) -> tuple[Section, list[ClaimResult]]:
    results = check_claims(claims, {s.name: (s.frame, s.cell_params) for s in studies})
    table = pd.DataFrame([{"Claim": r.claim.text, "Study": r.claim.study, "Status": r.status, "Evidence": r.evidence,
                           "Seeds needed": r.seeds.text() if r.seeds else "—"} for r in results])
    note = (f"Status from a paired t-test over seeds, Holm-adjusted across the claims of this report ({len(claims)}) "
            f"(alpha {ALPHA}); VALIDATED: significant in the claimed direction; INVALIDATED: significant against it, "
            "or the 95% CI of the difference inside the claim's margin; INCONCLUSIVE: otherwise (or n < 2).")
    seeds = ("Seeds needed (INCONCLUSIVE claims): paired seeds for 80% power to detect the claim's margin, or "
             "without one the difference seen, at the level Holm requires in the claim's place (alpha / (m − rank)), "
             "from the sd of the paired differences so far (noncentral t; docs/statistics.md). A planning figure: "
             "adding seeds and re-testing at the fixed level raises the false-positive rate; `orchestrate sweep --until-decided` keeps it at alpha.")
    return Section("Claims", 2, tables=[Table("", table, [note, seeds], [r.record() for r in results])]), results


def fill_study_section(sec: Section, family: str, study: StudyRuns, stats: StudyStats, cfg: ReportConfig,
                       is_headline: bool, plots_dir: Path | None, tracking_uri: str) -> None:
    """A study's tables (the headline study's own table is already shown above it) and plots."""
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
        if is_headline:
            reliability_section(sec, family, study, stats, cfg, Path(plots_dir), tracking_uri)


def reliability_section(sec: Section, family: str, study: StudyRuns, stats: StudyStats, cfg: ReportConfig,
                        plots_dir: Path, tracking_uri: str) -> None:
    """Reliability diagrams of the headline study (its best cell), from the trials' per-bin artifacts."""
    from orchestrator.plots import reliability_plots
    from orchestrator.reliability import diagrams, pairs, read_artifacts

    cell = best_cell(study, stats, cfg)
    runs = study.frame.drop_duplicates("run_id")
    for param, value in study.cell_dict(cell).items():
        runs = runs[runs[f"param.{param}"] == value]
    artifacts = read_artifacts(tracking_uri, runs["run_id"].tolist())
    if not artifacts:
        sec.text.append(f"Reliability diagrams: none. No trial of study `{study.name}` logged "
                        "`artifacts/reliability.json` (the per-bin counts, confidence and accuracy a diagram needs).")
        return
    ece_rows = study.frame[study.frame["metric"] == "ece"]
    logged = {(r.run_id, r.key): r.value for r in ece_rows.itertuples()}
    found = diagrams(artifacts, logged, dict(zip(runs["run_id"], runs["seed"])), cfg.split)
    where = f" (cell {study.label(cell)}, the best by the objective)" if cell else ""
    sec.text.append(f"Reliability diagrams{where}: {len(artifacts)} of {len(runs)} trials logged per-bin data; "
                    "each diagram is the mean over seeds with a 95% band across seeds, bin counts below, ECE "
                    "(from the bins, mean ± 95% t-interval) in the legend; pairs show an eval axis's smallest "
                    "and largest value.")
    mismatched = [f"{d.method}: {m}" for d in found for m in d.mismatched]
    if mismatched:
        sec.text.append("ECE from the logged bins differs from the logged ECE: " + "; ".join(mismatched))
    sec.plots += reliability_plots(family, study.name, found, cfg, pairs(found), plots_dir)


def _study_claims(studies: list[StudyRuns], doc: dict, family: str, scoped: bool) -> list[Claim]:
    """Each study's claims as its own settings declare them; unscoped reports add the claims
    of studies with no runs (reported as having no trials)."""
    claims = [c for s in studies for c in parse_claims(s.doc, family, s.source) if c.study == s.name]
    if not scoped:
        shown = {s.name for s in studies}
        claims += [c for c in parse_claims(doc, family) if c.study not in shown]
    return claims


def _provenance(study: StudyRuns) -> str:
    if study.record:
        r = study.record
        return (f"settings from the compiled study its sweep saved (`study.json`: entry point `{r['entrypoint']}`, "
                f"package {r['package_version']}, git {r['git_commit'][:12]})")
    return "settings from the YAML as it is now (its sweep saved no compiled study)"


def family_sections(tracking_uri: str, family: str, doc: dict, study: str | None = None, sweep_id: str | None = None,
                    plots_dir: Path | None = None) -> tuple[list[Section], list[dict], dict | None]:
    """The markdown sections of one family, its per-cell statistics, and its best configuration."""
    frame = load_runs(tracking_uri, family, study, sweep_id)
    scope = ", ".join(x for x in (study and f"study {study}", sweep_id and f"sweep {sweep_id}") if x)
    head = Section(f"{family}{f' ({scope})' if scope else ''}", 1, [doc.get("description", "")], lead=True)
    if frame.empty:
        head.text += [f"No trial runs of {family}{f' ({scope})' if scope else ''} in {tracking_uri}."]
        return [head], [], None
    chosen = chosen_sweeps(frame, sweep_id)
    records = load_records(tracking_uri, family, [s for sweeps, _ in chosen.values() for s in sweeps])
    studies = select_studies(frame, doc, chosen, records)
    stats = [StudyStats(s) for s in studies]
    cfgs = [ReportConfig.from_doc(s.doc, family, s.source) for s in studies]
    # family-wide choices (headline study, objective) from the newest sweep's saved settings
    newest = max(studies, key=lambda s: frame.loc[frame["sweep_id"].isin(s.sweeps), "start_time"].min())
    family_doc = newest.doc if newest.record else doc
    cfg = ReportConfig.from_doc(family_doc, family, newest.source if newest.record else None)

    picked = [s for s in studies if s.name == cfg.headline_study] or studies[:1]
    i = studies.index(picked[0])
    headline, headline_stats, headline_cfg = studies[i], stats[i], cfgs[i]
    title = "Headline: study" if headline.name == cfg.headline_study else "Study"
    top = Section(f"{title} `{headline.name}`", 2, [headline.spec.get("description", "")], lead=True)
    top.tables.append(headline_table(headline, headline_stats, headline_cfg))
    sections = [head, top]

    claims = _study_claims(studies, family_doc, family, bool(study or sweep_id))
    claims_sec, results = claims_section(claims, studies) if claims else (None, [])
    seeds = {st.study.name: max((iv.n for iv in st.table.values()), default=0) for st in stats}
    few_seeds = {name: n for name, n in seeds.items() if n >= 2 and not wilcoxon_can_decide(n)}
    baseline = baseline_table(headline, headline_cfg) if not headline.is_search else None
    sections.append(Section("Summary", 2, summary_lines(headline, headline_stats, headline_cfg, baseline, results,
                                                        few_seeds), lead=True))
    sections += [claims_sec] if claims_sec else []
    from orchestrator.until_decided import until_decided_sections

    sections += until_decided_sections(tracking_uri, family, studies)

    where = Section("Sweeps and settings", 2, [f"Source: MLflow `{tracking_uri}`, experiment `{family}`; "
                                               f"generated {now_text()}.", STATISTICS])
    for s in studies:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(s.counts.items()))
        ignored = f"; older sweeps left out: {', '.join(s.ignored)} (use --sweep)" if s.ignored else ""
        where.text.append(f"- study `{s.name}`: sweep {', '.join(s.sweeps)}: {counts}{ignored}; {_provenance(s)}")
    sections.append(where)

    details = Section(f"Study `{headline.name}`: details", 2)
    best = best_configuration(stats, cfg)
    for s, st, c in zip(studies, stats, cfgs):
        sec = details if s is headline else Section(f"Study `{s.name}`", 2, [s.spec.get("description", "")])
        fill_study_section(sec, family, s, st, c, s is headline, plots_dir, tracking_uri)
        if s is headline:
            sections.append(sec)
            if best:
                sections.append(Section("Best configuration", 2, [
                    f"By the objective {cfg.objective.get('metric')} ({cfg.objective.get('mode')}), mean over seeds, "
                    "across the studies of this report."], [Table("", pd.DataFrame([best]))]))
        else:
            sections.append(sec)
    records_out = [r for st in stats for r in st.records(family)]
    return sections, records_out, ({"Family": family, **best} if best else None)


def note_clipped(sections: list[Section]) -> None:
    """Footnote every table that shows an interval clipped to its metric's bounds."""
    for section in sections:
        for table in section.tables:
            if any(CLIPPED_TEXT.match(str(v)) for v in table.frame.to_numpy().ravel()):
                table.notes.append(CLIPPED_NOTE)


def build_report(tracking_uri: str, families, study: str | None = None, sweep_id: str | None = None,
                 plots_dir: Path | None = None, link_base: Path | None = None, docs: dict | None = None,
                 summary: bool | None = None) -> Report:
    """A report over one family (a name) or several (a list). ``docs`` maps a family to its YAML
    document (default: the registry's file of that family); ``summary`` (default: several
    families) puts the cross-family summary first."""
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
                                                      "(mean ± 95% t-interval over seeds, n shown) and its key test metrics."],
                          lead=True)
        summary.tables.append(Table("", pd.DataFrame(best).fillna("—") if best else
                                    pd.DataFrame([{"Family": ", ".join(families), "Result": "no finished trials"}])))
        sections = [summary] + sections
    if plots_dir is None:
        sections.append(Section("Notes", 2, ["Plots: none requested (--plots DIR, or --out FILE.md)."]))
    note_clipped(sections)
    return Report(tracking_uri, sections, pd.DataFrame(records), link_base)
