"""Where cached artefacts live and how they are written: atomically, so a reader never sees a
half-written file and a crash mid-write leaves nothing behind."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout


def default_cache_dir() -> Path:
    """``$ORCHESTRATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/orchestrate``, else ``~/.cache/orchestrate``."""
    env = os.environ.get("ORCHESTRATE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "orchestrate"


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same directory, so the
    rename is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> Path:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


@contextmanager
def build_lock(path: str | os.PathLike, what: str = ""):
    """Hold a cross-process lock for building ``path`` (a ``.lock`` file beside it). Usage: check
    whether ``path`` is valid; if not, take the lock, check again, build it. The OS frees the lock
    if its holder dies, so a crashed builder never blocks the others."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process building {what or path.name}", file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
