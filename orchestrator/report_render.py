"""A report's structure (sections of text, tables and plots) and its rendering: markdown, JSON, CSV."""

from __future__ import annotations

import datetime
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class Table:
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    records: list[dict] | None = None  # numbers for JSON (default: the formatted cells)


@dataclass
class Section:
    title: str
    level: int = 2
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, Path]] = field(default_factory=list)
    lead: bool = False  # part of what a report opens with (the headline table and its summary)


@dataclass
class Report:
    tracking_uri: str
    sections: list[Section]
    stats: pd.DataFrame
    link_base: Path | None = None

    def markdown(self, lead_only: bool = False) -> str:
        """The report in GitHub markdown; ``lead_only``: just what it opens with."""
        out = []
        for section in (s for s in self.sections if s.lead or not lead_only):
            out += ["#" * section.level + " " + section.title, ""]
            for i, line in enumerate(section.text):
                tight = i and line.startswith("- ") and section.text[i - 1].startswith("- ")
                out += [line] if tight or not out[-1] else ["", line] if i else [line]
            out += [""] if section.text else []
            for table in section.tables:
                if table.title:
                    out += [f"**{table.title}**", ""]
                out += [to_markdown(table.frame) if not table.frame.empty else "_no finished trials with these metrics_", ""]
                out += [f"- {note}" for note in table.notes] + ([""] if table.notes else [])
            for title, path in section.plots:
                out += [f"![{title}]({self._link(path)})", ""]
        return "\n".join(out).rstrip() + "\n"

    def _link(self, path: Path) -> str:
        base = self.link_base or Path.cwd()
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()

    def json(self) -> str:
        sections = [{"title": s.title, "level": s.level, "text": s.text,
                     "tables": [{"title": t.title, "columns": [str(c) for c in t.frame.columns],
                                 "rows": t.frame.astype(str).values.tolist(), "records": t.records} for t in s.tables],
                     "plots": [{"title": title, "path": self._link(p)} for title, p in s.plots]} for s in self.sections]
        doc = {"tracking_uri": self.tracking_uri, "generated": now_text(), "sections": sections,
               "stats": self.stats.astype(object).where(self.stats.notna(), None).to_dict("records")}
        return json.dumps(_finite(doc), indent=1, allow_nan=False)

    def csv(self) -> str:
        return self.stats.to_csv(index=False)

    def render(self, fmt_name: str) -> str:
        return {"markdown": self.markdown, "json": self.json, "csv": self.csv}[fmt_name]()


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
    return obj


def now_text() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table: header, separator, one line per row; '|' inside a cell is escaped."""
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in table.columns) + " |"
    sep = "| " + " | ".join("---" for _ in table.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, sep, *rows])
