"""A fixture for tests of tiny models: one torch thread and one BLAS/OpenMP thread.

On the shared 2-core machine, threads fight other processes: scikit-learn's L-BFGS (the
wm_attention decoders) runs about 5x slower with BLAS threads than with one, and a Ray trial
runs with OMP_NUM_THREADS=1 anyway. Use it with ``from one_thread import one_thread  # noqa: F401``
(pytest finds an imported fixture by its name)."""

import pytest
import torch
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)
