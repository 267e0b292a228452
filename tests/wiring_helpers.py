"""Small pieces the wiring tests of several families share."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from trainables.common.data import Dataset, Split


def pick(metrics: dict, prefix: str) -> dict:
    """The entries of ``metrics`` whose name starts with ``prefix``."""
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


def with_mirrored_val(ds: Dataset) -> Dataset:
    """``ds`` with its val images mirrored left-right: another val split, same labels, same train and test."""
    return replace(ds, val=Split(np.ascontiguousarray(ds.val.images[:, :, ::-1]), ds.val.labels))


def assert_same_outside_test(a: list[tuple[dict, dict]], b: list[tuple[dict, dict]]) -> None:
    """Two runs that differ only in their test split: the same epochs, every non-test figure
    (train, val, info) of every report equal, and the test figures not all equal."""
    assert [m["epoch"] for m, _ in a] == [m["epoch"] for m, _ in b]
    for (ma, _), (mb, _) in zip(a, b):
        keep = [k for k in ma if not k.startswith(("test/", "perf/"))]
        assert {k: ma[k] for k in keep} == {k: mb[k] for k in keep}
    assert pick(a[-1][0], "test/") != pick(b[-1][0], "test/")
