"""Model families. Each module exposes one plain function

    train(config: dict, report: Callable[[dict, dict | None], None], restore: dict | None = None) -> None

that trains and evaluates one configuration. It calls ``report(metrics, checkpoint=None)`` once
per epoch (metrics include ``epoch``; names follow ``<split>/<method>/<metric>``, see
``trainables.common.metrics``); ``checkpoint`` is a dict of torch-saveable state, handed back as
``restore`` when a trial resumes. The last report holds the final (test) metrics. A diverged
trial reports ``diverged: 1.0`` and returns. Families know nothing of Ray, MLflow or the CLI.
"""

from __future__ import annotations

import importlib
from typing import Callable

FAMILIES: dict[str, str] = {
    "attn_knn": "trainables.attn_knn:train",
    "set_anomaly": "trainables.set_anomaly:train",
    "clip_fusion": "trainables.clip_fusion:train",
    "subtask_meta": "trainables.subtask_meta:train",
    "wm_attention": "trainables.wm_attention:train",
    "busy_loop": "trainables.busy_loop:train",
}


def get_trainable(family: str) -> Callable:
    """The family's ``train`` function (imported on first use, like timm's registry)."""
    module_name, func = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module_name), func)
