"""GPU paths of the project, checked on a GPU machine that has only torch, torchvision, numpy,
scikit-learn, scipy and pandas (no Ray, MLflow, FAISS or PyYAML needed):

1. imports: ``trainables.attn_knn`` and ``trainables.common.knn`` load without FAISS, Ray or MLflow;
2. kNN: the ``torch_cuda`` backend (and ``faiss_gpu`` when a CUDA FAISS is installed) finds the
   same neighbours as the CPU backend (up to float rounding of near-equal similarities), also
   inside bf16 autocast; ms per query of each;
3. training: the attn_knn family's ``train()`` driven directly (a list collects its reports) with
   ``device=cuda`` and ``device=cpu`` on digits, same config and seed: wall time, epoch time,
   test accuracy of every method, and whether the CUDA run went through bf16 autocast and
   pinned-memory transfers;
4. packing: N trials at once in N processes on the one GPU (what ``--gpus-per-trial 1/N``
   does under Ray) against one such process: trials per minute each way.

    python bench/gpu_check.py                      # on the GPU machine
    python bench/gpu_check.py --set backbone=resnet18 --epochs 2
    python bench/gpu_check.py --cpu-dry-run --quick   # no GPU: every step with CPU in CUDA's place
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import table  # noqa: E402
from trainables import attn_knn  # noqa: E402
from trainables.common import knn  # noqa: E402

NOT_NEEDED = ("faiss", "ray", "mlflow")


def load_defaults() -> dict:
    """attn_knn.yaml's ``defaults``: through PyYAML when installed, else read line by line (the
    block holds only ``key: scalar  # comment`` lines)."""
    text = (ROOT / "search_spaces" / "attn_knn.yaml").read_text()
    try:
        import yaml
    except ImportError:
        return parse_defaults(text)
    return yaml.safe_load(text)["defaults"]


def parse_defaults(text: str) -> dict:
    out, inside = {}, False
    for line in text.splitlines():
        if line.startswith("defaults:"):
            inside = True
        elif inside and line.startswith("  ") and ":" in line:
            key, value = (part.strip() for part in line.split("#")[0].split(":", 1))
            out[key] = _scalar(value)
        elif inside and line.strip():
            break
    return out


def _scalar(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def synced(device: torch.device, fn):
    """(seconds, result) of ``fn`` with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began, out


# ---------------------------------------------------------------- 2. kNN backends


def knn_check(gpu_backends: list[str], n: int, q: int, dim: int, k: int) -> list[list]:
    """Each GPU backend against the CPU one on random unit vectors: neighbours equal up to
    rounding (the float64 similarities of the two neighbour lists agree to 1e-5 position by
    position), the fraction of queries with identical lists, and ms per query."""
    rng = np.random.default_rng(0)
    bank, queries = (x / np.linalg.norm(x, axis=1, keepdims=True)
                     for x in (rng.standard_normal((n, dim), dtype=np.float32), rng.standard_normal((q, dim), dtype=np.float32)))
    cpu_backend = knn.available_backends(use_gpu=False)[0]
    rows = []
    for backend in [cpu_backend, *gpu_backends]:
        index = knn.KnnIndex(dim, backend=backend)
        device = torch.device("cuda" if backend in ("torch_cuda", "faiss_gpu") else "cpu")
        qt = torch.from_numpy(queries).to(device)
        index.add(torch.from_numpy(bank).to(device))
        index.search(qt[:100], k)  # warm-up (CUDA context, kernels)
        seconds, (_, idx) = synced(device, lambda: index.search(qt, k))
        with attn_knn.autocast(device):
            _, idx_amp = index.search(qt, k)
        idx, idx_amp = idx.cpu().numpy(), idx_amp.cpu().numpy()
        if backend == cpu_backend:
            ref = idx
        exact = np.einsum("qkd,qd->qk", bank[idx].astype(np.float64), queries.astype(np.float64))
        ref_sims = np.einsum("qkd,qd->qk", bank[ref].astype(np.float64), queries.astype(np.float64))
        rows.append([backend, f"{1000 * seconds / q:.4f}", f"{np.mean((idx == ref).all(1)):.2%}",
                     str(bool(np.abs(exact - ref_sims).max() < 1e-5)), str(bool(np.array_equal(idx_amp, idx)))])
    return rows


# ---------------------------------------------------------------- 3. training


class Calls:
    """Counts the devices ``attn_knn`` hands to ``autocast`` and ``to_device`` during a run."""

    def __init__(self):
        self.counts = Counter()
        self._originals = (attn_knn.autocast, attn_knn.to_device)

    def __enter__(self):
        autocast, to_device = self._originals
        attn_knn.autocast = lambda device: (self.counts.update([f"autocast:{device.type}"]), autocast(device))[1]
        attn_knn.to_device = lambda x, device: (self.counts.update([f"to_device:{device.type}"]), to_device(x, device))[1]
        return self.counts

    def __exit__(self, *exc):
        attn_knn.autocast, attn_knn.to_device = self._originals


def train_once(config: dict) -> tuple[float, dict]:
    """(wall seconds, last report) of one direct ``train()`` call."""
    reports = []
    device = torch.device(config["device"])
    seconds, _ = synced(device, lambda: attn_knn.train(config, lambda metrics, checkpoint=None: reports.append(metrics)))
    return seconds, reports[-1]


def train_in_process(config: dict) -> float:
    """Worker of the packing check: one trial in its own process, as Ray would start it."""
    return train_once(config)[0]


def packed_minutes(config: dict, trials: int) -> float:
    """Wall minutes for ``trials`` processes (seeds 0..N-1) training at once on one device."""
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    began = time.perf_counter()
    with ctx.Pool(trials) as pool:
        pool.map(train_in_process, [{**config, "seed": seed} for seed in range(trials)])
    return (time.perf_counter() - began) / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 300 images, small kNN check, pack 2")
    parser.add_argument("--epochs", type=int, help="training epochs (default 5; quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="attn_knn config override")
    parser.add_argument("--pack", type=int, help="trials at once on the GPU for the packing check (default 4; quick 2; 0 skips)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="no GPU here: run every step with the CPU in CUDA's place")
    args = parser.parse_args()

    have_cuda = torch.cuda.is_available()
    if not have_cuda and not args.cpu_dry_run:
        raise SystemExit("CUDA is not available on this machine (use --cpu-dry-run to exercise the script without a GPU)")
    gpu = "cuda" if have_cuda else "cpu"
    loaded = [name for name in NOT_NEEDED if name in sys.modules]
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: "
          f"{torch.cuda.get_device_name(0) if have_cuda else 'none (CPU dry run)'}")
    print(f"1. imports: trainables.attn_knn and trainables.common.knn loaded; of {', '.join(NOT_NEEDED)}: "
          f"{', '.join(loaded) or 'none'} imported; usable kNN backends: {', '.join(knn.available_backends())}")

    n, q = (10_000, 2_000) if args.quick else (50_000, 10_000)
    gpu_backends = [b for b in ("faiss_gpu", "torch_cuda") if b in knn.available_backends()] or (["torch_cpu"] if not have_cuda else [])
    print(f"\n2. kNN: bank {n} x 256, {q} queries, k = 16; reference: the first row (CPU backend)")
    print(table(["backend", "ms / query", "identical lists", "same neighbours up to rounding", "same under bf16 autocast"],
                 knn_check(gpu_backends, n, q, 256, 16)))

    config = {**load_defaults(), "seed": 0, "eval": {"k": [1, 5, 16], "tta_views": [1, 5]},
              "epochs": args.epochs or (1 if args.quick else 5)}
    if args.quick:
        config.update(max_train=300, max_test=200)
    config.update({key: _scalar(value) for key, value in (item.split("=", 1) for item in args.set)})
    print(f"\n3. attn_knn train() on {config['dataset']}: backbone {config['backbone']}, {config['epochs']} epochs, "
          f"max_train {config['max_train'] or 'all'}, batch {config['batch_size']}")
    rows, finals = [], {}
    for device in dict.fromkeys([gpu, "cpu"]):
        with Calls() as calls:
            seconds, final = train_once({**config, "device": device})
        finals[device] = final
        rows.append([device, f"{seconds:.1f}", f"{final['perf/epoch_ms']:.0f}", f"{final['perf/search_ms_per_query']:.4f}",
                     *(f"{final[f'test/{m}/acc']:.4f}" for m in ("uniform_knn", "distance_knn", "attn_knn", "attn_knn_tta", "cnn")),
                     f"{calls[f'autocast:{device}']}/{calls[f'to_device:{device}']}"])
    print(table(["device", "train() s", "epoch ms", "search ms/q", "uniform", "distance", "attn", "attn+TTA", "cnn",
                  "autocast/to_device calls"], rows))
    gap = max(abs(finals[gpu][f"test/{m}/acc"] - finals["cpu"][f"test/{m}/acc"]) for m in ("uniform_knn", "distance_knn", "attn_knn", "cnn"))
    print(f"  largest |test acc difference| {gpu} vs cpu: {gap:.4f} (bf16 autocast and other kernels: close, not equal)")

    pack = args.pack if args.pack is not None else (2 if args.quick else 4)
    if pack:
        print(f"\n4. packing: {pack} trials at once on one {gpu} device vs 1 (a process per trial, as under Ray)")
        single = packed_minutes({**config, "device": gpu}, 1)
        together = packed_minutes({**config, "device": gpu}, pack)
        print(table(["trials at once", "wall min", "trials / min"], [["1", f"{single:.2f}", f"{1 / single:.2f}"],
                                                                       [str(pack), f"{together:.2f}", f"{pack / together:.2f}"]]))
    speedup = float(rows[-1][1]) / float(rows[0][1])
    print(f"\nratio cpu / {gpu} train() wall time: {speedup:.1f}x"
          + (f"; packing {pack} per device: {pack * single / together:.1f}x the trials per minute" if pack else ""))


if __name__ == "__main__":
    main()
