"""Test-wide environment: caches in a per-session temp dir, headless plots, no stray cluster."""

import atexit
import os
import shutil
import tempfile
import threading

if "ORCHESTRATE_CACHE_DIR" not in os.environ:
    _cache_dir, _owner = tempfile.mkdtemp(prefix="orchestrate-test-cache-"), os.getpid()
    os.environ["ORCHESTRATE_CACHE_DIR"] = _cache_dir
    # removed when the session's own process exits (not a forked child's: mutmut forks one per
    # mutant from a warmed-up session, and they share this folder); left behind, every session
    # kept one, up to 9.5 MB each (2,740 of them in /tmp after a day of mutation runs)
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache_dir, ignore_errors=True))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.pop("RAY_ADDRESS", None)

# tqdm guards its bars with a multiprocessing lock, made by the first bar a process draws; mutmut
# forks one worker per mutant from a warmed-up session, and a worker that ends while holding it
# left every later worker's first bar waiting forever (seen: features.py's run stalled at two
# mutants, py-spy in TqdmDefaultWriteLock.acquire). Bars in tests need only a thread lock.
from tqdm import tqdm  # noqa: E402

tqdm.set_lock(threading.RLock())
