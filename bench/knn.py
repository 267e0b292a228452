"""Exact kNN classification three ways on the same random unit vectors: the project's path
(``trainables.common.knn``: ``KnnIndex`` build + search + ``uniform_vote``, on torch tensors as
the families call it), raw FAISS (``IndexFlatIP`` add + search, the same vote in numpy), and
scikit-learn (``KNeighborsClassifier(algorithm="brute")`` fit + predict_proba).

Prints ms per query and GFLOP/s of each (2 * N * Q * D flops: the exact search's inner
products) against a matrix-multiply roofline measured in the same rounds (the faster of torch
and numpy float32 GEMM, a query block by the whole bank in tiles), then the project / FAISS
time ratio.
Runs are interleaved in a rotating order after a warm-up round, with a pause before each: idle
OpenMP/BLAS worker threads spin for a while and would slow whatever runs next. The paths must
agree: the same neighbours for the project and FAISS, the same class probabilities for all three.

    python bench/knn.py --quick      # 10,000 x 256 bank, 2,000 queries
    python bench/knn.py              # 50,000 x 256 bank, 10,000 queries, k = 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits  # imported after FAISS and scikit-learn, so it sees their OpenMP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_line, min_median, table, verdict  # noqa: E402
from trainables.common.knn import KnnIndex, uniform_vote  # noqa: E402

TARGET = 1.2
CLASSES = 10
GEMM_BLOCK = 2048  # queries per roofline GEMM (a 2048 x N float32 product fits in memory)
GEMM_TILE = 4096  # bank rows per roofline GEMM tile
SETTLE_S = 0.5  # pause before each timed job


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn) -> tuple[float, object]:
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def project_path(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> tuple[dict, tuple]:
    """The families' path: tensors in, ``KnnIndex`` (backend auto) + ``uniform_vote``."""
    bank_t, labels_t, queries_t = torch.from_numpy(bank), torch.from_numpy(labels), torch.from_numpy(queries)

    def build():
        index = KnnIndex(bank.shape[1])
        index.add(bank_t)
        return index

    t_build, index = timed(build)
    t_search, (sims, idx) = timed(lambda: index.search(queries_t, k))
    t_vote, probs = timed(lambda: uniform_vote(sims, labels_t[idx], CLASSES))
    return {"build": t_build, "search": t_search, "vote": t_vote}, (idx.numpy(), probs.numpy(), index.backend)


def faiss_path(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> tuple[dict, tuple]:
    def build():
        index = faiss.IndexFlatIP(bank.shape[1])
        index.add(bank)
        return index

    def vote(idx):
        rows = np.repeat(np.arange(len(idx)), idx.shape[1])
        counts = np.bincount(rows * CLASSES + labels[idx].ravel(), minlength=len(idx) * CLASSES)
        return counts.reshape(len(idx), CLASSES).astype(np.float32) / idx.shape[1]

    t_build, index = timed(build)
    t_search, (_, idx) = timed(lambda: index.search(queries, k))
    t_vote, probs = timed(lambda: vote(idx))
    return {"build": t_build, "search": t_search, "vote": t_vote}, (idx, probs)


def sklearn_path(bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> tuple[dict, tuple]:
    """scikit-learn has no separate search-then-vote step: ``predict_proba`` does both."""
    t_build, clf = timed(lambda: KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(bank, labels))
    t_search, probs = timed(lambda: clf.predict_proba(queries))
    return {"build": t_build, "search": t_search, "vote": 0.0}, (None, probs)


def gemm_seconds(bank: np.ndarray, queries: np.ndarray) -> dict[str, float]:
    """The roofline's runs: float32 GEMM of a query block against the whole bank, tile by tile
    into preallocated outputs (as FAISS tiles the bank), once in torch and once in numpy."""
    block, tiles = queries[:GEMM_BLOCK], [bank[i : i + GEMM_TILE] for i in range(0, len(bank), GEMM_TILE)]
    outs = {len(t): np.empty((len(block), len(t)), np.float32) for t in tiles}
    block_t, tiles_t, outs_t = torch.from_numpy(block), [torch.from_numpy(t) for t in tiles], {n: torch.from_numpy(o) for n, o in outs.items()}

    def with_numpy():
        for t in tiles:
            np.matmul(block, t.T, out=outs[len(t)])

    def with_torch():
        for t in tiles_t:
            torch.matmul(block_t, t.T, out=outs_t[len(t)])

    return {"torch": timed(with_torch)[0], "numpy": timed(with_numpy)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 x 256 bank, 2,000 queries")
    parser.add_argument("--n", type=int, help="bank vectors (default 50,000; quick 10,000)")
    parser.add_argument("--queries", type=int, help="queries (default 10,000; quick 2,000)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each path, after one warm-up (min / median shown)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads of every library (torch, FAISS's OpenMP, BLAS); 1 is steadiest on a loaded machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with threadpool_limits(limits=args.threads):  # OpenMP (FAISS, scikit-learn) and BLAS (numpy) alike
        run(args)


def run(args) -> None:
    n, q, dim, k = args.n or (10_000 if args.quick else 50_000), args.queries or (2_000 if args.quick else 10_000), args.dim, args.k

    rng = np.random.default_rng(0)
    bank, queries = unit_vectors(rng, n, dim), unit_vectors(rng, q, dim)
    labels = rng.integers(0, CLASSES, n)
    flops = 2.0 * n * q * dim
    print(f"exact kNN: bank {n} x {dim}, {q} queries, k = {k}, {CLASSES} classes; {args.threads} thread(s)")
    print(machine_line())

    paths = {"project (KnnIndex + uniform_vote)": project_path, "raw FAISS (IndexFlatIP + numpy vote)": faiss_path,
             "scikit-learn (brute KNeighborsClassifier)": sklearn_path}
    times, outputs, gemms = {name: [] for name in paths}, {}, []
    jobs = [*paths, "gemm"]
    for rep in range(args.repeats + 1):  # round 0 warms up
        # rotate the order, so each job follows each other one equally often, after a pause
        for name in jobs[rep % len(jobs):] + jobs[:rep % len(jobs)]:
            time.sleep(SETTLE_S)
            if name == "gemm":
                gemms += [gemm_seconds(bank, queries)] if rep else []
                continue
            parts, outputs[name] = paths[name](bank, labels, queries, k)
            if rep:
                times[name].append(parts)
    gemm_flops = 2.0 * min(GEMM_BLOCK, q) * n * dim
    roof = {name: gemm_flops / min(g[name] for g in gemms) / 1e9 for name in gemms[0]}
    best_roof = max(roof.values())
    (p_idx, p_probs, backend), (f_idx, f_probs), (_, s_probs) = outputs.values()
    same_neighbours = np.array_equal(p_idx, f_idx)
    same_probs = np.isclose(p_probs, f_probs).all(1).mean(), np.isclose(s_probs, f_probs).all(1).mean()

    rows = []
    for name, runs in times.items():
        totals = [sum(r.values()) for r in runs]
        best = min(range(len(runs)), key=lambda i: totals[i])
        rows.append([name, *(f"{1000 * runs[best][part]:.1f}" for part in ("build", "search", "vote")),
                     min_median([1000 * t for t in totals]), f"{1000 * min(totals) / q:.4f}",
                     f"{flops / min(totals) / 1e9:.1f}", f"{100 * flops / min(totals) / 1e9 / best_roof:.0f}%"])
    print()
    print(f"roofline: float32 GEMM {min(GEMM_BLOCK, q)} x {dim} @ {dim} x {n} in {GEMM_TILE}-column tiles: "
          + ", ".join(f"{name} {rate:.1f} GFLOP/s" for name, rate in roof.items()))
    print(f"project backend: {backend}; same neighbours as FAISS: {same_neighbours}; queries with FAISS's class "
          f"probabilities: project {same_probs[0]:.2%}, scikit-learn {same_probs[1]:.2%}")
    if same_probs[1] < 1:
        print("  (scikit-learn ranks by float32 Euclidean distance: near-equal k-th neighbours can round the other way)")
    print(table(["path", "build ms", "search ms", "vote ms", "total ms (min / median)", "ms / query", "GFLOP/s",
                 "of roofline"], rows))
    print("  build / search / vote: the fastest run; GFLOP/s and ms / query from the fastest total")
    project, raw = ([sum(r.values()) for r in times[name]] for name in list(paths)[:2])
    ratio = min(project) / min(raw)  # the min: load on a shared machine only ever adds time
    print(f"ratio project / raw FAISS total time: {ratio:.2f}x fastest runs, {statistics.median(project) / statistics.median(raw):.2f}x "
          f"medians (target <= {TARGET}x: {verdict(ratio <= TARGET)})")


if __name__ == "__main__":
    main()
