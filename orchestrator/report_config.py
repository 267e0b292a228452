"""The ``report:`` key of a family YAML, checked, and the check of ``report:`` and ``claims:``
that runs when a study loads (before any sweep starts, so a typo is exit 2, not a broken report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.claims import same_value, validate_claims
from orchestrator.errors import UsageError
from trainables.common.metrics import METRICS, parse_metric_key

DEFAULT_HEADLINE = ["acc", "ece", "nll"]
REPORT_KEYS = {"baseline", "headline_study", "headline_metrics", "methods", "labels", "focus", "reference", "drops", "split"}
SPLITS = ("train", "val", "test")


def metric_label(metric: str) -> str:
    """A metric's name for readers (``ece`` -> ``ECE``), from the metric table; unknown names as they are."""
    info = METRICS.get(metric)
    return info.label if info else metric


@dataclass
class ReportConfig:
    """The ``report:`` key of a family YAML (every field optional)."""

    objective: dict
    baseline: str | None = None
    headline_study: str | None = None
    headline_metrics: list[str] = field(default_factory=lambda: list(DEFAULT_HEADLINE))
    methods: list[str] = field(default_factory=list)  # method specs ("attn_knn", "attn_knn:tta_views:5"), in order
    labels: dict[str, str] = field(default_factory=dict)
    focus: list[str] = field(default_factory=list)  # methods of A/B tables and 2-D grid plots
    reference: dict[str, dict] = field(default_factory=dict)  # study -> reference cell {param: value}
    drops: dict[str, str] = field(default_factory=dict)  # study -> param: metric drop from its first value
    split: str = "test"

    @classmethod
    def from_doc(cls, doc: dict, family: str, source: str | None = None) -> "ReportConfig":
        """``source`` names where ``doc`` came from in error messages (default ``<family>.yaml``)."""
        raw = doc.get("report") or {}
        where = f"{source or family + '.yaml'}: report"
        if not isinstance(raw, dict):
            raise UsageError(f"{where}: expected a mapping with keys among {sorted(REPORT_KEYS)}")
        if set(raw) - REPORT_KEYS:
            raise UsageError(f"{where}: unknown key(s) {sorted(set(raw) - REPORT_KEYS)} (known: {sorted(REPORT_KEYS)})")
        studies = doc.get("studies") or {}
        cfg = cls(objective=dict(doc.get("objective") or {}),
                  headline_study=doc.get("default_study") or next(iter(studies), None))
        for key in ("baseline", "headline_study", "split"):
            if key in raw:
                if not isinstance(raw[key], str):
                    raise UsageError(f"{where}.{key}: expected a string")
                setattr(cfg, key, raw[key])
        for key in ("headline_metrics", "methods", "focus"):
            if key in raw:
                if not isinstance(raw[key], list) or not all(isinstance(v, str) for v in raw[key]):
                    raise UsageError(f"{where}.{key}: expected a list of strings")
                setattr(cfg, key, list(raw[key]))
        for key in ("labels", "reference", "drops"):
            if key in raw:
                if not isinstance(raw[key], dict):
                    raise UsageError(f"{where}.{key}: expected a mapping")
                setattr(cfg, key, dict(raw[key]))
        if cfg.split not in SPLITS:
            raise UsageError(f"{where}.split: expected one of {SPLITS}, got {cfg.split!r}")
        for name in cfg.methods:
            if parse_metric_key(f"{cfg.split}/{name}/acc") is None:
                raise UsageError(f"{where}.methods: {name!r} is not a method spec (name[:axis:value...])")
        for study, param in cfg.drops.items():
            grid = (studies.get(study) or {}).get("grid") or {}
            if study not in studies or not isinstance(param, str) or param not in grid:
                raise UsageError(f"{where}.drops.{study}: expected a known study mapped to one of its grid params "
                                 f"(got {param!r}; grid: {sorted(grid)})")
        for study, cell in cfg.reference.items():
            if study not in studies or not isinstance(cell, dict):
                raise UsageError(f"{where}.reference.{study}: expected a known study mapped to {{param: value}}")
            grid = (studies[study] or {}).get("grid") or {}
            for param, value in cell.items():
                if not any(same_value(v, value) for v in grid.get(param, [])):
                    raise UsageError(f"{where}.reference.{study}.{param}: {value!r} is not a value of the study's grid "
                                     f"({param}: {grid.get(param, 'not swept')})")
        if cfg.headline_study not in studies:
            raise UsageError(f"{where}.headline_study: unknown study {cfg.headline_study!r}")
        return cfg

    def label(self, spec: str) -> str:
        return self.labels.get(spec, spec)

    @property
    def objective_method(self) -> str | None:
        parsed = parse_metric_key(self.objective.get("metric", ""))
        return parsed["method"] if parsed else None

    @property
    def focus_methods(self) -> list[str]:
        return self.focus or ([self.objective_method] if self.objective_method else [])


def check_settings(doc: dict, family: str, source: str) -> None:
    """The ``report:`` and ``claims:`` keys of a family YAML, checked when it loads; each
    problem is one :class:`UsageError` naming ``source`` (the YAML's path)."""
    ReportConfig.from_doc(doc, family, source)
    validate_claims(doc, family, source)
