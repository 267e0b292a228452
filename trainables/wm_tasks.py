"""Stimuli and N-back task sequences for the ``wm_attention`` family.

A stimulus is one of ``n_identities`` fixed images of one of ``n_categories`` classes, shown in
one of ``N_VIEWS`` views (a nuisance variation: identity, horizontal flip, vertical flip, both)
and pasted into one of four quadrants of a blank canvas twice the image's size.

A task is N-back (N in 1..3) on one feature: ``location`` (the quadrant), ``identity`` (same class
AND same image; the view does not count) or ``category`` (the class). In a sequence the steps
before N expect ``no_action``; from step N on, ``match`` when the stimulus equals the one N steps
back on the task feature, else ``non_match``. Matches are drawn with probability ``match_prob``;
a non-match is made to differ on the task feature, the other features are drawn at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("location", "identity", "category")
RESPONSES = ("no_action", "match", "non_match")
NO_ACTION, MATCH, NON_MATCH = 0, 1, 2
N_LOCATIONS = 4
N_VIEWS = 4
SCENARIOS = ("stsf", "stmf", "mtmf")
SPLITS = ("random", "novel_view", "novel_identity")


@dataclass(frozen=True)
class Task:
    n: int
    feature: str

    @property
    def name(self) -> str:
        return f"{self.n}back_{self.feature}"


def scenario_tasks(scenario: str, n_back: int, feature: str) -> list[Task]:
    """STSF: one task; STMF: one N, all three features; MTMF: all nine tasks. The task vector of
    a sequence is the one-hot of its task's position in this list."""
    if scenario == "stsf":
        return [Task(n_back, feature)]
    if scenario == "stmf":
        return [Task(n_back, f) for f in FEATURES]
    if scenario == "mtmf":
        return [Task(n, f) for n in (1, 2, 3) for f in FEATURES]
    raise ValueError(f"unknown scenario {scenario!r}: use one of {', '.join(SCENARIOS)}")


@dataclass(frozen=True)
class Pool:
    """The identities and views a set of sequences may draw from (all locations, all classes)."""

    identities: tuple[int, ...]
    views: tuple[int, ...]


def split_pools(split: str, n_identities: int, heldout_identities: int) -> tuple[Pool, Pool | None]:
    """(pool for train/val/in-distribution test, pool for the generalisation test or None).

    ``novel_view`` trains on views 0-2 and tests on view 3; ``novel_identity`` holds out the last
    ``heldout_identities`` identities of every class."""
    all_ids, all_views = tuple(range(n_identities)), tuple(range(N_VIEWS))
    if split == "random":
        return Pool(all_ids, all_views), None
    if split == "novel_view":
        return Pool(all_ids, all_views[:-1]), Pool(all_ids, all_views[-1:])
    if split == "novel_identity":
        if not 1 <= heldout_identities < n_identities:
            raise ValueError(f"heldout_identities must be in [1, n_identities), got {heldout_identities}")
        cut = n_identities - heldout_identities
        return Pool(all_ids[:cut], all_views), Pool(all_ids[cut:], all_views)
    raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


@dataclass
class Sequences:
    """A batch of sequences: per-step stimulus features (B, T), task index (B,), targets (B, T)."""

    category: np.ndarray
    identity: np.ndarray
    location: np.ndarray
    view: np.ndarray
    task: np.ndarray
    target: np.ndarray

    def __len__(self) -> int:
        return len(self.task)

    def feature(self, name: str, n_identities: int) -> np.ndarray:
        """Values of one feature; identity is the global object id ``category * n_identities + identity``."""
        if name == "identity":
            return self.category * n_identities + self.identity
        return getattr(self, name)

    def stimulus_index(self, n_identities: int) -> np.ndarray:
        """Index into :func:`render_stimuli`'s flat array."""
        obj = self.category * n_identities + self.identity
        return (obj * N_VIEWS + self.view) * N_LOCATIONS + self.location

    def subset(self, idx: np.ndarray) -> "Sequences":
        return Sequences(*(getattr(self, f)[idx] for f in ("category", "identity", "location", "view", "task", "target")))


def nback_targets(values: np.ndarray, n: int) -> np.ndarray:
    """Targets of N-back on one feature: ``values`` (B, T) -> (B, T) in RESPONSES."""
    values = np.asarray(values)
    out = np.full(values.shape, NO_ACTION, dtype=np.int64)
    out[:, n:] = np.where(values[:, n:] == values[:, :-n], MATCH, NON_MATCH)
    return out


def task_targets(seqs: Sequences, tasks: list[Task], n_identities: int) -> np.ndarray:
    """Targets recomputed from the stimuli of each sequence under its own task."""
    out = np.empty_like(seqs.target)
    for k, task in enumerate(tasks):
        rows = seqs.task == k
        out[rows] = nback_targets(seqs.feature(task.feature, n_identities)[rows], task.n)
    return out


def generate(
    rng: np.random.Generator,
    n_sequences: int,
    tasks: list[Task],
    pool: Pool,
    *,
    n_categories: int,
    seq_len: int = 6,
    match_prob: float = 0.5,
) -> Sequences:
    """Draw ``n_sequences`` sequences, each with a task drawn uniformly from ``tasks``.

    Every feature starts random; then, step by step, each decision step (t >= N) either copies
    the task feature from step t - N (a match) or shifts it by a random non-zero offset (a
    non-match). The targets are the drawn match/non-match decisions."""
    b, t_len = n_sequences, seq_len
    task = rng.integers(len(tasks), size=b)
    cat = rng.integers(n_categories, size=(b, t_len))
    slot = rng.integers(len(pool.identities), size=(b, t_len))  # position in pool.identities
    loc = rng.integers(N_LOCATIONS, size=(b, t_len))
    view = np.asarray(pool.views)[rng.integers(len(pool.views), size=(b, t_len))]
    match = rng.random((b, t_len)) < match_prob
    ns = np.array([tk.n for tk in tasks])[task]
    feats = np.array([FEATURES.index(tk.feature) for tk in tasks])[task]
    n_slots = len(pool.identities)
    n_objects = n_categories * n_slots
    target = np.full((b, t_len), NO_ACTION, dtype=np.int64)
    for t in range(t_len):
        active = ns <= t
        target[active, t] = np.where(match[active, t], MATCH, NON_MATCH)
        for f, name in enumerate(FEATURES):
            rows = np.flatnonzero(active & (feats == f))
            ref = t - ns[rows]
            same = match[rows, t]
            if name == "location":
                shift = np.where(same, 0, rng.integers(1, N_LOCATIONS, size=len(rows)))
                loc[rows, t] = (loc[rows, ref] + shift) % N_LOCATIONS
            elif name == "category":
                shift = np.where(same, 0, rng.integers(1, n_categories, size=len(rows)))
                cat[rows, t] = (cat[rows, ref] + shift) % n_categories
            else:
                shift = np.where(same, 0, rng.integers(1, n_objects, size=len(rows)))
                obj = (cat[rows, ref] * n_slots + slot[rows, ref] + shift) % n_objects
                cat[rows, t], slot[rows, t] = obj // n_slots, obj % n_slots
    identity = np.asarray(pool.identities)[slot]
    return Sequences(cat, identity, loc, view, task, target)


def pick_identities(images: np.ndarray, labels: np.ndarray, n_categories: int, n_identities: int, seed: int = 0) -> np.ndarray:
    """``n_identities`` fixed images of each of the first ``n_categories`` classes:
    uint8 (n_categories, n_identities, H, W, C). Fixed by ``seed``, not by the trial's seed."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(n_categories):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_identities:
            raise ValueError(f"class {c} has {len(idx)} training images, fewer than n_identities={n_identities}")
        picked.append(images[rng.choice(idx, size=n_identities, replace=False)])
    return np.stack(picked)


def view_of(image: np.ndarray, view: int) -> np.ndarray:
    """View 0: as is; 1: flipped left-right; 2: flipped up-down; 3: both (a 180-degree turn)."""
    if view & 1:
        image = image[:, ::-1]
    if view & 2:
        image = image[::-1]
    return image


def render_stimuli(objects: np.ndarray) -> np.ndarray:
    """Every (category, identity, view, location) stimulus as a uint8 canvas (2H, 2W, C), in the
    flat order of :meth:`Sequences.stimulus_index`. Quadrants: 0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right."""
    n_cat, n_id, h, w, ch = objects.shape
    out = np.zeros((n_cat, n_id, N_VIEWS, N_LOCATIONS, 2 * h, 2 * w, ch), dtype=np.uint8)
    for c in range(n_cat):
        for i in range(n_id):
            for v in range(N_VIEWS):
                img = view_of(objects[c, i], v)
                for q in range(N_LOCATIONS):
                    r0, c0 = (q // 2) * h, (q % 2) * w
                    out[c, i, v, q, r0 : r0 + h, c0 : c0 + w] = img
    return out.reshape(-1, 2 * h, 2 * w, ch)
