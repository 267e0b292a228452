"""The shared kNN index against numpy brute force and scikit-learn's KNeighborsClassifier."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from trainables.common.knn import (
    KnnIndex,
    available_backends,
    inverse_distance_vote,
    softmax_vote,
    uniform_vote,
)

CPU_BACKENDS = [b for b in ("faiss_cpu", "torch_cpu") if b in available_backends(use_gpu=False)]
ALL_BACKENDS = available_backends()


def unit_vectors(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    bank, queries = unit_vectors(500, 16, 0), unit_vectors(80, 16, 1)
    labels = np.random.default_rng(2).integers(0, 5, size=len(bank))
    return bank, labels, queries


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_search_equals_numpy_brute_force(data, backend):
    bank, _, queries = data
    index = KnnIndex(16, backend=backend)
    index.add(bank[:200])
    index.add(torch.from_numpy(bank[200:]))  # adds accumulate, tensors and arrays alike
    assert len(index) == 500 and index.backend == backend
    sims, idx = index.search(queries, 7)
    full = queries.astype(np.float64) @ bank.T.astype(np.float64)
    ref_idx = np.argsort(-full, axis=1)[:, :7]
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref_idx, 1), atol=1e-5)
    t_sims, t_idx = index.search(torch.from_numpy(queries), 7)  # tensor in -> tensor out
    assert isinstance(t_idx, torch.Tensor) and t_idx.dtype == torch.int64
    np.testing.assert_array_equal(t_idx.numpy(), ref_idx)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_votes_equal_sklearn(data, backend, weights, k):
    bank, labels, queries = data
    index = KnnIndex(16, backend=backend)
    index.add(bank)
    sims, idx = (torch.from_numpy(a) for a in index.search(queries, k))
    vote = uniform_vote if weights == "uniform" else inverse_distance_vote
    probs = vote(sims, torch.from_numpy(labels)[idx], 5).numpy()
    ref = KNeighborsClassifier(n_neighbors=k, weights=weights, algorithm="brute").fit(bank, labels)
    np.testing.assert_allclose(probs, ref.predict_proba(queries), atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(1), ref.predict(queries))


def test_inverse_distance_zero_distance_rule():
    # a neighbour at distance 0 takes all the weight (split evenly among zero-distance ones)
    sims = torch.tensor([[1.0, 0.9, 0.5], [1.0, 1.0, 0.2], [0.8, 0.6, 0.4]])
    labels = torch.tensor([[2, 0, 0], [1, 0, 2], [0, 1, 1]])
    probs = inverse_distance_vote(sims, labels, 3).numpy()
    np.testing.assert_allclose(probs[0], [0, 0, 1])
    np.testing.assert_allclose(probs[1], [0.5, 0.5, 0])
    w = 1 / np.sqrt(2 - 2 * np.array([0.8, 0.6, 0.4]))
    np.testing.assert_allclose(probs[2], [w[0] / w.sum(), (w[1] + w[2]) / w.sum(), 0])


def test_softmax_vote_is_dino_weighting():
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    w = np.exp(np.array([0.9, 0.8, 0.1]) / 0.07)
    np.testing.assert_allclose(softmax_vote(sims, labels, 2, 0.07).numpy()[0], [w[1] / w.sum(), (w[0] + w[2]) / w.sum()], rtol=1e-5)
    # a high temperature approaches the uniform vote
    np.testing.assert_allclose(softmax_vote(sims, labels, 2, 1e6), uniform_vote(sims, labels, 2), atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_self_exclusion(data, backend):
    bank, _, _ = data
    index = KnnIndex(16, backend=backend)
    index.add(bank)
    own = np.arange(0, 500, 7)
    sims, idx = index.search(bank[own], 5)
    assert (idx[:, 0] == own).all()  # each vector is its own nearest neighbour ...
    sims_x, idx_x = index.search(bank[own], 5, exclude=own)
    assert not (idx_x == own[:, None]).any()  # ... and excluded, the rest move up one rank
    np.testing.assert_array_equal(idx_x[:, :4], idx[:, 1:])
    np.testing.assert_allclose(sims_x[:, :4], sims[:, 1:])
    # several exclusions per query (e.g. both sources of a mixup pair)
    two = np.stack([own, idx[:, 2]], axis=1)
    _, idx_2 = index.search(bank[own], 5, exclude=two)
    ref = np.argsort(-(bank[own] @ bank.T), axis=1)
    expected = [[j for j in row if j not in pair][:5] for row, pair in zip(ref, two)]
    np.testing.assert_array_equal(idx_2, expected)


def test_reset_and_errors():
    index = KnnIndex(4, backend="torch_cpu")
    index.add(unit_vectors(3, 4, 0))
    with pytest.raises(ValueError, match="neighbours"):
        index.search(unit_vectors(1, 4, 1), 3, exclude=np.array([0]))
    index.reset()
    assert len(index) == 0
    with pytest.raises(ValueError, match="unknown kNN backend"):
        KnnIndex(4, backend="annoy")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch_cuda.*not available"):
            KnnIndex(4, backend="torch_cuda")


def test_auto_prefers_faiss_on_cpu():
    expected = "faiss_cpu" if "faiss_cpu" in CPU_BACKENDS else "torch_cpu"
    assert KnnIndex(4, use_gpu=False).backend == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_under_bf16_autocast(data, backend):
    """Families run forward passes under bf16 autocast on CUDA (``training.autocast``), searching
    inside it: the search must stay exact float32 and take bf16 queries (CPU autocast stands in)."""
    bank, _, queries = data
    index = KnnIndex(16, backend=backend)
    index.add(bank)
    ref_sims, ref_idx = index.search(torch.from_numpy(queries), 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims, idx = index.search(torch.from_numpy(queries), 7)
    assert torch.equal(idx, ref_idx) and torch.equal(sims, ref_sims)
    q16 = torch.from_numpy(queries).bfloat16()
    assert torch.equal(index.search(q16, 7)[1], index.search(q16.float(), 7)[1])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ties_come_in_index_order_and_a_smaller_k_is_a_prefix(backend):
    """Exact ties (duplicate bank vectors) in (similarity desc, index asc) order, also across
    the k-th place: a search at k is the first k of a search at any larger k."""
    rng = np.random.default_rng(5)
    base = unit_vectors(6, 16, 3)
    bank = base[rng.integers(0, 6, size=300)]  # 300 entries, 6 distinct vectors: ties everywhere
    queries = unit_vectors(40, 16, 4)
    index = KnnIndex(16, backend=backend)
    index.add(bank)
    wide_sims, wide_idx = index.search(queries, 120)
    copies = {}
    for j, v in enumerate(map(tuple, bank)):
        copies.setdefault(v, []).append(j)
    for q in range(len(queries)):
        returned = {}
        for j in wide_idx[q]:
            returned.setdefault(tuple(bank[j]), []).append(int(j))
        for v, members in returned.items():  # each vector's copies: the lowest indices, in order
            assert members == copies[v][: len(members)]
    for k in (1, 7, 50, 119):
        sims, idx = index.search(queries, k)
        np.testing.assert_array_equal(idx, wide_idx[:, :k])
        np.testing.assert_array_equal(sims, wide_sims[:, :k])
    # with exclusion too
    own = np.arange(len(queries))
    np.testing.assert_array_equal(index.search(queries, 5, exclude=own)[1], index.search(queries, 60, exclude=own)[1][:, :5])


# What `python bench/mutation.py --module trainables/common/knn.py` found unpinned (issue 16): the
# edges of the size check, float64 input, a bank that ties everywhere, the no-FAISS path and the
# messages that say which backend is missing and why.

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_size_edges_float64_input_and_a_bank_that_ties_everywhere(backend):
    index = KnnIndex(4, backend=backend)
    vectors = np.eye(4)[[0, 0, 1, 2, 3]]  # float64, as numpy makes it
    index.add(vectors)
    sims, idx = index.search(vectors[:2], 5)  # k = the whole index
    np.testing.assert_array_equal(idx, [[0, 1, 2, 3, 4]] * 2)
    np.testing.assert_array_equal(sims, [[1, 1, 0, 0, 0]] * 2)
    _, idx_x = index.search(vectors[:2], 4, exclude=np.array([0, 1]))  # k + 1 excluded = the whole index
    np.testing.assert_array_equal(idx_x, [[1, 2, 3, 4], [0, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"asked for 5 neighbours \(\+1 excluded\) from an index of 5"):
        index.search(vectors[:2], 5, exclude=np.array([0, 1]))
    same = KnnIndex(4, backend=backend)
    same.add(np.tile(vectors[:1], (30, 1)))  # every similarity ties, up to the bank's last entry
    np.testing.assert_array_equal(same.search(vectors[:1], 3)[1], [[0, 1, 2]])


def test_every_listed_backend_works_and_unavailable_ones_say_why():
    for backend in available_backends():
        index = KnnIndex(4, backend=backend)
        index.add(unit_vectors(6, 4, 0))
        assert index.backend == backend and index.search(unit_vectors(2, 4, 1), 3)[1].shape == (2, 3)
    with pytest.raises(ValueError, match="use auto or one of faiss_gpu, torch_cuda, faiss_cpu, torch_cpu$"):
        KnnIndex(4, backend="annoy")
    usable = ", ".join(available_backends())
    if "faiss_cpu" in usable and "faiss_gpu" not in usable:
        with pytest.raises(RuntimeError, match=rf"'faiss_gpu' is not available here \(this FAISS build sees no GPU\); usable: {usable}$"):
            KnnIndex(4, backend="faiss_gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"'torch_cuda' is not available here \(CUDA is not available\)"):
            KnnIndex(4, backend="torch_cuda")


def test_without_faiss_the_torch_backend_answers_alone(monkeypatch, data):
    """A GPU node with torch but no FAISS (the import fails): auto is torch, FAISS backends say so."""
    from trainables.common import knn

    bank, _, queries = data
    with_faiss = KnnIndex(16, backend="torch_cpu")
    with_faiss.add(bank)
    monkeypatch.setattr(knn, "_faiss", lambda: None)  # what `import faiss` failing gives
    assert "faiss_cpu" not in available_backends() and "faiss_gpu" not in available_backends()
    index = KnnIndex(16, use_gpu=False)
    assert index.backend == "torch_cpu"
    index.add(bank)
    np.testing.assert_array_equal(index.search(queries, 7)[1], with_faiss.search(queries, 7)[1])
    index.reset()
    assert len(index) == 0
    for backend in ("faiss_cpu", "faiss_gpu"):
        with pytest.raises(RuntimeError, match=rf"'{backend}' is not available here \(FAISS is not installed\)"):
            KnnIndex(16, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_tie_starting_at_the_kth_place_is_widened_over(backend):
    """One distinct nearest vector, then 300 exact copies tied for 2nd: k = 2 must return copy 0,
    which neither FAISS's heap nor torch.topk puts among the first few it fetches."""
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    bank = np.tile(b, (301, 1))
    bank[250] = a
    index = KnnIndex(4, backend=backend)
    index.add(bank)
    query = (0.9 * a + 0.1 * b)[None, :] / np.linalg.norm(0.9 * a + 0.1 * b)
    np.testing.assert_array_equal(index.search(query, 2)[1], [[250, 0]])
    np.testing.assert_array_equal(index.search(query, 3)[1], [[250, 0, 1]])
