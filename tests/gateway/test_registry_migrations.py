"""The registry's schema comes from its Alembic migrations, and they match the models."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.registry import METADATA, SqlStore, current_revision, head_revision, upgrade
from gateway.registry.engine import create_registry_engine
from gateway.registry.migrate import MIGRATIONS_DIR
from gateway.store import StoreError

TABLES = {
    "identity",
    "certificate",
    "stored_response",
    "nonce",
    "bootstrap_token",
    "audit_event",
    "audit_checkpoint",
}


def tables_in(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


def test_opening_an_empty_file_creates_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        assert current_revision(store.engine) == head_revision()
    assert tables_in(path) == TABLES | {"alembic_version"}


def test_opening_twice_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        schema = connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        version = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    with SqlStore(f"sqlite:///{path}") as store:
        assert current_revision(store.engine) == head_revision()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == (
            schema
        )
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == version


def test_upgrade_is_idempotent_on_an_engine(tmp_path: Path) -> None:
    engine = create_registry_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def diffs_against(path: Path, metadata: sa.MetaData) -> list[object]:
    engine = create_registry_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    assert diffs_against(path, METADATA) == []


def test_the_comparison_does_notice_a_drift(tmp_path: Path) -> None:
    # Guards the test above: a model the migrations do not know about must show up.
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    drifted = sa.MetaData()
    for table in METADATA.tables.values():
        table.to_metadata(drifted)
    drifted.tables["nonce"].append_column(sa.Column("origin", sa.String(32), nullable=True))
    diffs = diffs_against(path, drifted)
    assert [diff[0] for diff in diffs if isinstance(diff, tuple)] == ["add_column"]


def test_migrations_ship_as_packages() -> None:
    # setuptools' find_packages only ships folders with __init__.py; the revision files and
    # env.py must be inside the wheel for an installed gateway to upgrade its database.
    assert (MIGRATIONS_DIR / "__init__.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()


def test_serial_numbers_are_stored_as_fixed_width_hex() -> None:
    assert METADATA.tables["certificate"].c.serial.type.length == 40  # type: ignore[attr-defined]


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="not a registry database"):
        SqlStore(f"sqlite:///{path}")


def test_a_database_from_a_newer_gateway_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(StoreError, match="schema"):
        SqlStore(f"sqlite:///{path}")


def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot be opened"):
        SqlStore(f"sqlite:///{tmp_path / 'nowhere' / 'registry.db'}")


def test_in_memory_registry_works_across_threads() -> None:
    import threading
    from datetime import UTC, datetime

    from gateway.store import AuditEntry

    with SqlStore("sqlite://") as store:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        worker = threading.Thread(
            target=store.append_audit, args=([AuditEntry("a", "b", "c", "ok", at)],)
        )
        worker.start()
        worker.join()
        assert [r.seq for r in store.audit_records()] == [1]
