"""The registry's per-request way to the database: Core statements compiled once
(``statements``, ``prepared``) run on the pooled driver connection (``driver``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import NullType
from test_store_contract import certificate, entry, identity, issue, nonce, response

from gateway.registry import SqlStore
from gateway.registry.prepared import prepare
from gateway.registry.statements import IDENTITY, Statements
from gateway.store import DuplicateError, NonceCheck

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.psycopg.dialect()}


@pytest.mark.parametrize("dialect", DIALECTS.values(), ids=DIALECTS.keys())
def test_every_statement_compiles_with_typed_parameters(dialect: sa.Dialect) -> None:
    compiled = Statements.compile(dialect)
    for name, statement in Statements.core().items():
        assert getattr(compiled, name).sql  # each is a field, each compiles
        for bind in statement.compile(dialect=dialect).binds.values():
            # An untyped parameter would skip its column's processing (UTC datetimes, SQLite's
            # datetime text): rows would be written in another format than SQLAlchemy's.
            assert not isinstance(bind.type, NullType), (name, bind.key)


def test_a_missing_parameter_is_named() -> None:
    prepared = prepare(
        sa.select(IDENTITY).where(IDENTITY.c.id == sa.bindparam("id")), DIALECTS["sqlite"]
    )
    assert prepared.names == {"id"}
    assert prepared.arguments({"id": "dev-1"}) == ("dev-1",)
    with pytest.raises(KeyError, match="id"):
        prepared.arguments({})


def test_statements_rendered_at_execution_are_refused() -> None:
    statement = sa.select(IDENTITY).where(IDENTITY.c.id.in_(sa.bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="execution-time"):
        prepare(statement, DIALECTS["sqlite"])


# what the store sends: an in-memory SQLite database lives in one driver connection, whose trace
# callback sees every statement


@pytest.fixture
def traced() -> Iterator[tuple[SqlStore, list[str]]]:
    with SqlStore("sqlite://") as store:
        seen: list[str] = []
        pooled = store.engine.raw_connection()
        driver = pooled.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.set_trace_callback(seen.append)
        pooled.close()
        yield store, seen


def words(statements: list[str]) -> list[str]:
    return [" ".join(statement.split()[:3]) for statement in statements]


def test_a_lookup_is_one_statement_and_no_transaction(
    traced: tuple[SqlStore, list[str]],
) -> None:
    store, seen = traced
    issue(store, 0x10, "req-1")
    seen.clear()
    assert store.get_identity("dev-1") == identity()
    assert store.key_fingerprint_used(certificate(0x10).public_key_fingerprint)
    assert store.get_response("dev-1", "req-1") == response()
    assert words(seen) == [
        "SELECT identity.id, identity.kind,",
        "SELECT certificate.serial FROM",
        "SELECT stored_response.identity_id, stored_response.request_id,",
    ]


def test_an_outcome_is_one_transaction_with_its_audit_events(
    traced: tuple[SqlStore, list[str]],
) -> None:
    store, seen = traced
    issue(store, 0x10, "req-1")
    seen.clear()
    store.record_outcome(
        response=response(request_id="req-2"),
        identity=identity(),
        certificate=certificate(0x11),
        audit=[entry("renew"), entry("note")],
    )
    assert words(seen) == [
        "BEGIN IMMEDIATE",
        "SELECT stored_response.outcome FROM",
        "UPDATE identity SET",
        "UPDATE certificate SET",  # the active one superseded before the new one is added
        "INSERT INTO certificate",
        "INSERT INTO stored_response",
        "SELECT audit_event.seq, audit_event.prev_hash,",
        "INSERT INTO audit_event",
        "INSERT INTO audit_event",
        "COMMIT",
    ]


def test_a_refused_outcome_rolls_back_and_releases_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        issue(store, 0x10, "req-1")
        with pytest.raises(DuplicateError):
            store.record_outcome(
                response=response(request_id="req-1"),
                identity=identity(),
                certificate=certificate(0x11),
                audit=[entry("renew")],
            )
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" if the store still held it
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert [c.serial for c in store.certificates_for("dev-1")] == [0x10]


def test_an_outcome_is_committed_when_the_call_returns(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        issue(store, 0x10, "req-1", issued=T0 + timedelta(seconds=1))
        # Another connection, as another process would read it, before anything else happens.
        with sqlite3.connect(path) as other:
            serials = other.execute("SELECT serial, status FROM certificate").fetchall()
            answers = other.execute("SELECT request_id FROM stored_response").fetchall()
            audit = other.execute("SELECT seq, action FROM audit_event").fetchall()
        assert serials == [(f"{0x10:040x}", "active")]
        assert answers == [("req-1",)]
        assert audit == [(1, "issue")]


# durability: which commits skip their own sync (see gateway.registry.sql_store)


def test_what_the_protocol_recovers_from_is_committed_without_its_own_sync(
    traced: tuple[SqlStore, list[str]],
) -> None:
    store, seen = traced
    store.put_identity(identity())
    for write in (
        lambda: store.put_nonce(nonce()),
        lambda: store.consume_nonce(b"\x01" * 16, "dev-1", T0),
        lambda: store.record_outcome(response=response(request_id="hello-1", outcome="challenge")),
        lambda: store.touch("dev-1", T0),
    ):
        seen.clear()
        write()
        assert seen[:2] == ["PRAGMA synchronous=NORMAL", "BEGIN IMMEDIATE"]
        assert seen[-2:] == ["COMMIT", "PRAGMA synchronous=FULL"]


def test_decisions_are_synced(traced: tuple[SqlStore, list[str]]) -> None:
    store, seen = traced
    for write in (
        lambda: issue(store, 0x10, "req-1"),  # a certificate
        lambda: store.record_outcome(  # a refusal, audited
            response=response(request_id="req-2", outcome="rejected"), audit=[entry("reject")]
        ),
        lambda: store.put_identity(identity(birth="other")),
        lambda: store.append_audit([entry("note")]),
    ):
        seen.clear()
        write()
        assert seen[0] == "BEGIN IMMEDIATE"
        assert seen[-1] == "COMMIT"
        assert not any(statement.startswith("PRAGMA") for statement in seen)


def test_a_failed_relaxed_write_leaves_its_connection_synced_again(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'registry.db'}") as store:
        store.put_nonce(nonce())
        with pytest.raises(DuplicateError):
            store.put_nonce(nonce())
        with pytest.raises(KeyError):
            store.touch("nobody", T0)
        assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK
        # One thread: the pool handed the same connection to every call above.
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
