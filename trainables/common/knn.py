"""Exact k-nearest-neighbour search on L2-normalised vectors, and neighbour votes.

On unit vectors the inner product is the cosine similarity and ``||a - b||^2 = 2 - 2 a.b``, so
an exact inner-product search returns the same neighbours, in the same order, as a Euclidean
search (scikit-learn's ``KNeighborsClassifier(algorithm="brute")``).

Backends, in the order ``backend="auto"`` tries them:

- ``faiss_gpu``: ``faiss.GpuIndexFlatIP`` (a CUDA build of FAISS with a visible GPU);
- ``torch_cuda``: exact ``matmul`` + ``topk`` on CUDA, for GPU nodes whose FAISS has no GPU
  support (``faiss-cpu``) or no FAISS at all;
- ``faiss_cpu``: ``faiss.IndexFlatIP``;
- ``torch_cpu``: the same matmul + topk on the CPU, used only when FAISS is not installed.

``KnnIndex.backend`` names the one in use. FAISS is imported lazily: a GPU node with torch but
no FAISS still runs.
"""

from __future__ import annotations

import numpy as np
import torch

BACKENDS = ("faiss_gpu", "torch_cuda", "faiss_cpu", "torch_cpu")
_TORCH_QUERY_CHUNK = 4096  # bounds the (queries x bank) similarity block of the torch backends
_TIE_MARGIN = 8  # neighbours fetched beyond k to see ties across the k-th place (widened when not enough)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def available_backends(use_gpu: bool = True) -> list[str]:
    """The usable backends on this machine, in ``auto`` order (GPU ones only if ``use_gpu``)."""
    faiss = _faiss()
    out = []
    if use_gpu and faiss is not None and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        out.append("faiss_gpu")
    if use_gpu and torch.cuda.is_available():
        out.append("torch_cuda")
    if faiss is not None:
        out.append("faiss_cpu")
    out.append("torch_cpu")
    return out


class KnnIndex:
    """An exact inner-product index over ``dim``-dimensional vectors (callers L2-normalise).

    ``add`` and ``search`` take numpy arrays or torch tensors; ``search`` answers in the kind
    (and, for tensors, on the device) of its query.
    """

    def __init__(self, dim: int, backend: str = "auto", use_gpu: bool = True):
        usable = available_backends(use_gpu)
        if backend == "auto":
            backend = usable[0]
        elif backend not in BACKENDS:
            raise ValueError(f"unknown kNN backend {backend!r}: use auto or one of {', '.join(BACKENDS)}")
        elif backend not in usable:
            why = "FAISS is not installed" if backend.startswith("faiss") and _faiss() is None else (
                "this FAISS build sees no GPU" if backend == "faiss_gpu" else "CUDA is not available")
            raise RuntimeError(f"kNN backend {backend!r} is not available here ({why}); usable: {', '.join(usable)}")
        self.dim, self.backend = dim, backend
        self._bank: torch.Tensor | None = None  # torch backends
        self._index = None  # faiss backends
        self.reset()

    def reset(self) -> None:
        """Empty the index (e.g. before refreshing a memory bank)."""
        if self.backend.startswith("torch"):
            device = "cuda" if self.backend == "torch_cuda" else "cpu"
            self._bank = torch.empty(0, self.dim, device=device)
            return
        faiss = _faiss()
        if self.backend == "faiss_gpu":
            self._resources = faiss.StandardGpuResources()
            self._index = faiss.GpuIndexFlatIP(self._resources, self.dim)
        else:
            self._index = faiss.IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return len(self._bank) if self._bank is not None else int(self._index.ntotal)

    def add(self, x: np.ndarray | torch.Tensor) -> None:
        if self._bank is not None:
            self._bank = torch.cat([self._bank, torch.as_tensor(x).detach().to(self._bank.device, torch.float32)])
        else:
            self._index.add(_as_numpy(x))

    def search(self, q: np.ndarray | torch.Tensor, k: int, exclude: np.ndarray | torch.Tensor | None = None):
        """The ``k`` most similar vectors of each query: ``(sims, idx)``, each ``(nq, k)``, in the
        canonical order: similarity descending, ties by bank index ascending, also across the
        k-th place. So a search at k returns the first k of a search at any larger k, whatever the
        backend (FAISS orders exact ties as its heap happens to).

        ``exclude`` (``(nq,)`` or ``(nq, m)`` bank indices) drops those entries from each query's
        neighbours, e.g. a training query's own index when retrieving from a memory bank of the
        training set; the search then looks ``m`` further so ``k`` neighbours remain.
        """
        extra = 0 if exclude is None else (1 if exclude.ndim == 1 else exclude.shape[1])
        if k + extra > len(self):
            raise ValueError(f"asked for {k} neighbours (+{extra} excluded) from an index of {len(self)}")
        sims, idx = self._canonical_search(q, k + extra)
        if exclude is not None:
            sims, idx = _drop_excluded(sims, idx, torch.as_tensor(exclude).to(idx.device).view(len(idx), -1), k)
        if isinstance(q, torch.Tensor):
            return sims.to(q.device), idx.to(q.device)
        return sims.cpu().numpy(), idx.cpu().numpy()

    def _canonical_search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``k`` in canonical order: search a little wider, widen while some row's tie at
        the k-th similarity may reach past what was fetched, then sort by (-similarity, index)."""
        width = min(len(self), k + _TIE_MARGIN)
        while True:
            sims, idx = self._raw_search(q, width)
            if width == len(self) or not bool((sims[:, -1] == sims[:, k - 1]).any()):
                break  # everything tied with a row's k-th similarity is within the fetched width
            width = min(len(self), 2 * width)
        by_index = torch.sort(idx, dim=1, stable=True).indices
        sims, idx = sims.gather(1, by_index), idx.gather(1, by_index)
        by_sim = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        return sims.gather(1, by_sim), idx.gather(1, by_sim)

    def _raw_search(self, q, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bank is not None:
            return self._torch_search(torch.as_tensor(q).to(self._bank.device, torch.float32), k)
        return tuple(torch.from_numpy(a) for a in self._index.search(_as_numpy(q), k))

    def _torch_search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self._bank.device.type, enabled=False):  # exact float32 even inside a caller's bf16 autocast
            parts = [torch.topk(chunk @ self._bank.T, k, dim=1) for chunk in q.split(_TORCH_QUERY_CHUNK)]
        return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()  # float32 first: numpy has no bfloat16
    return np.ascontiguousarray(x, dtype=np.float32)


def _drop_excluded(sims: torch.Tensor, idx: torch.Tensor, exclude: torch.Tensor, k: int):
    """Keep, per row, the first ``k`` neighbours whose index is not in that row of ``exclude``."""
    hit = (idx.unsqueeze(2) == exclude.unsqueeze(1)).any(2)
    order = torch.sort(hit.to(torch.uint8), dim=1, stable=True).indices[:, :k]  # kept ones first, in rank order
    return sims.gather(1, order), idx.gather(1, order)


# ---------------------------------------------------------------- votes: neighbours -> class probabilities


def _weighted_vote(weights: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class sum of neighbour weights, normalised to probabilities. ``weights``, ``labels``: (n, k)."""
    votes = torch.zeros(len(labels), num_classes, dtype=weights.dtype, device=weights.device)
    votes.scatter_add_(1, labels, weights)
    return votes / votes.sum(1, keepdim=True)


def uniform_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Majority vote: the fraction of the k neighbours in each class."""
    return _weighted_vote(torch.ones_like(sims), labels, num_classes)


def softmax_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Neighbour weights ``softmax(sim / T)`` summed per class (DINO's weighted kNN). Differentiable
    in ``sims``, so it also serves as a training loss through retrieval."""
    return _weighted_vote(torch.softmax(sims / temperature, dim=1), labels, num_classes)


def inverse_distance_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """scikit-learn's ``weights="distance"``: weight ``1 / d`` with ``d = sqrt(2 - 2 sim)``; a row with
    a neighbour at distance 0 gives weight 1 to its zero-distance neighbours and 0 to the rest."""
    dist = torch.sqrt(torch.clamp(2.0 - 2.0 * sims.double(), min=0.0))
    zero = dist == 0
    weights = torch.where(zero.any(1, keepdim=True), zero.double(), 1.0 / dist)
    return _weighted_vote(weights, labels, num_classes)
