"""Work a sweep does on a thread while Ray starts.

``ray.init`` spends seconds waiting for its GCS and raylet to come up, time in which the
driver's own thread sits idle (a no-op smoke sweep on the 2-core VM: 3-4.5 s). Opening the
MLflow store (SQLAlchemy's import and, for a new SQLite file, MLflow's schema migrations:
~3.4 s there; a new file starts as a copy of an empty store at the current schema instead,
:func:`seed_sqlite_store`) and importing what the end of the sweep needs (the summary's statistics, the
report's tables and plots) are independent of Ray, so they run in that window instead of
before or after it. The main thread waits for them before it touches MLflow.

Nothing user-visible is written here except the store file itself, and a sweep refused after
this started (Ray not reachable, no node big enough for a trial) removes a store file that it
created, so bad input still leaves nothing behind.
"""

from __future__ import annotations

import importlib
import os
import shutil
import threading
from pathlib import Path

from trainables.common.cache import atomic_write, default_cache_dir

SUMMARY_MODULES = ("orchestrator.sweep_summary", "scipy.stats")
REPORT_MODULES = ("orchestrator.report_build", "orchestrator.plots")


def sqlite_file(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def seed_sqlite_store(path: Path) -> None:
    """Start a new SQLite store as a copy of an empty one already at MLflow's current schema,
    built once per MLflow version in the cache: MLflow otherwise runs its schema migrations on
    every new file (1.65 s of a 22-s smoke sweep on the VM). The copy holds tables only, no
    Default experiment: MLflow adds that when it opens the store, with this store's artifact
    root, as it does on a file it migrated itself. Nothing happens where the file exists (or
    appears meanwhile: the copy is hard-linked into place, never over a file) or where this
    MLflow has no migration entry point to build the template with (MLflow then migrates the
    new file itself)."""
    if path.exists():
        return
    template = _store_template()
    if template is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.new")
    shutil.copyfile(template, staged)
    try:
        os.link(staged, path)
    except FileExistsError:  # another sweep created the store first: theirs stands
        pass
    finally:
        staged.unlink(missing_ok=True)


def _store_template() -> Path | None:
    import mlflow

    template = default_cache_dir() / "mlflow-store" / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    try:
        from mlflow.store.db.utils import _initialize_tables  # what SqlAlchemyStore runs on an empty database
    except ImportError:
        return None
    import sqlalchemy

    def build(tmp: str) -> None:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()

    return atomic_write(template, build)


class Warmup:
    """Opens the MLflow store of ``tracking_uri`` (MLflow caches a store per URI, so every client
    made later in this process reuses it) and imports ``modules``, on a thread started here."""

    def __init__(self, tracking_uri: str, modules: tuple[str, ...] = ()):
        self.tracking_uri = tracking_uri
        self.modules = modules
        store = sqlite_file(tracking_uri)
        self._created = store if store is not None and not store.exists() else None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="orchestrate-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            if self._created is not None:
                seed_sqlite_store(self._created)
            MlflowClient(self.tracking_uri)._tracking_client.store  # noqa: B018 - builds and caches the store
            for name in self.modules:
                importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the thread is done; its exception, if any, is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def discard(self) -> None:
        """The sweep is refused: wait for the thread, then remove the store file it created."""
        self._thread.join()
        if self._created is not None:
            for path in (self._created, self._created.with_name(self._created.name + "-journal")):
                path.unlink(missing_ok=True)
