"""The sweep's start-up work beside ray.init: a new SQLite store seeded from a template is the
store MLflow would have made itself, and a refused sweep leaves no store behind."""

from __future__ import annotations

import sqlite3

from mlflow.tracking import MlflowClient

from orchestrator.warmup import Warmup, seed_sqlite_store


def schema(path) -> tuple[list, list]:
    """Every table and index with its definition's clauses as a set (MLflow's own migrations list
    a table's CHECK constraints in an order that changes between runs), and the schema version."""
    with sqlite3.connect(path) as db:
        rows = db.execute("select type, name, sql from sqlite_master where name not like 'sqlite_%'").fetchall()
        version = db.execute("select version_num from alembic_version").fetchall()
    clauses = [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())) for kind, name, sql in rows]
    return sorted(clauses), version


def test_a_seeded_store_is_the_store_mlflow_migrates_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "cache"))
    own, seeded = tmp_path / "own" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    own.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()  # MLflow creates and migrates the file
    seed_sqlite_store(seeded)
    assert (tmp_path / "cache" / "mlflow-store").is_dir() and seeded.is_file()
    assert schema(seeded) == schema(own)
    # the Default experiment is made by MLflow on opening either file: the same, at the same root
    defaults = [MlflowClient(f"sqlite:///{p}").get_experiment("0") for p in (own, seeded)]
    assert [(e.name, e.artifact_location) for e in defaults] == [("Default", defaults[0].artifact_location)] * 2
    client = MlflowClient(f"sqlite:///{seeded}")  # and it takes runs
    run = client.create_run(client.create_experiment("x"))
    client.log_metric(run.info.run_id, "m", 1.0)
    assert client.get_run(run.info.run_id).data.metrics == {"m": 1.0}


def test_seeding_never_replaces_a_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "cache"))
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"someone's store")
    seed_sqlite_store(store)
    assert store.read_bytes() == b"someone's store" and sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_refused_sweep_removes_the_store_its_warmup_created(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATE_CACHE_DIR", str(tmp_path / "cache"))
    new, kept = tmp_path / "new" / "mlflow.db", tmp_path / "kept" / "mlflow.db"
    kept.parent.mkdir()
    MlflowClient(f"sqlite:///{kept}").search_experiments()
    before = kept.read_bytes()
    for path in (new, kept):
        Warmup(f"sqlite:///{path}", ("json",)).discard()
    assert not new.exists() and kept.read_bytes() == before
    warm = Warmup(f"sqlite:///{tmp_path / 'used.db'}", ("orchestrator.sweep_summary",))
    warm.wait()
    assert (tmp_path / "used.db").is_file()
