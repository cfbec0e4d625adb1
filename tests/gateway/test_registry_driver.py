"""The registry's per-request way to the database: Core statements compiled once
(``statements``, ``prepared``) run on the pooled driver connection (``driver``)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.types import NullType
from test_store_contract import (
    certificate,
    entry,
    fresh_postgres_database,
    identity,
    issue,
    nonce,
    response,
)

from gateway.registry import SqlStore
from gateway.registry import engine as engine_module
from gateway.registry.prepared import prepare
from gateway.registry.statements import IDENTITY, Statements
from gateway.store import DuplicateError, NonceCheck, StoreError

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


# PostgreSQL: what crosses the wire, read from libpq's protocol trace of the pooled connection


@pytest.fixture
def wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[SqlStore, Callable[[], list[str]]]]:
    """A store on a fresh PostgreSQL database and ``sent()``: the queries its (one) pooled
    connection sent since the last call, each a round trip to the server. A connection idle
    for an hour is pinged (not a second): a slow machine must not add pings to the counts."""
    monkeypatch.setattr(engine_module, "PING_IDLE_SECONDS", 3600.0)
    with fresh_postgres_database() as url, SqlStore(url) as store:
        log = (tmp_path / "libpq.trace").open("w+")
        pooled = store.engine.raw_connection()
        pooled.driver_connection.pgconn.trace(log.fileno())  # type: ignore[union-attr]
        pooled.close()

        def sent() -> list[str]:
            log.flush()
            log.seek(0)
            lines = log.read().splitlines()
            log.seek(0)
            log.truncate()
            # frontend messages that end a round trip: a simple Query, or Sync after Parse/Bind
            queries = []
            for line in lines:
                fields = line.split("\t")
                if len(fields) < 4 or fields[1] != "F":
                    continue
                if fields[3] == "Query":
                    queries.append(fields[4].strip().strip('"').split()[0])
                elif fields[3] == "Parse":
                    queries.append(fields[4].split('"')[3].split()[0])
            return queries

        try:
            yield store, sent
        finally:
            log.close()


def test_a_postgresql_lookup_is_one_round_trip(
    wire: tuple[SqlStore, Callable[[], list[str]]],
) -> None:
    store, sent = wire
    issue(store, 0x10, "req-1")
    sent()
    assert store.get_identity("dev-1") == identity()
    assert store.key_fingerprint_used(certificate(0x10).public_key_fingerprint)
    assert store.get_identity("nobody") is None
    # no ping before, no BEGIN around, no ROLLBACK after
    assert sent() == ["SELECT", "SELECT", "SELECT"]


def test_a_postgresql_write_is_one_transaction_without_a_ping(
    wire: tuple[SqlStore, Callable[[], list[str]]],
) -> None:
    store, sent = wire
    store.put_identity(identity())
    sent()
    store.put_nonce(nonce())
    assert sent() == ["BEGIN", "INSERT", "COMMIT"]
    # a single conditional update is atomic without a transaction around it
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK
    assert sent() == ["UPDATE"]
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.REUSED
    assert sent() == ["UPDATE", "SELECT"]  # and the read that says why it was refused
    # a failed write rolls back, and the lookup after it runs outside any transaction
    with pytest.raises(DuplicateError):
        store.put_nonce(nonce())
    assert store.get_identity("dev-1") is not None
    assert sent()[-2:] == ["ROLLBACK", "SELECT"]


def test_a_connection_idle_for_a_while_is_pinged_first(
    wire: tuple[SqlStore, Callable[[], list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, sent = wire
    store.put_identity(identity())
    sent()
    monkeypatch.setattr(engine_module, "PING_IDLE_SECONDS", 0.0)
    assert store.get_identity("dev-1") is not None
    queries = sent()
    assert len(queries) == 2 and queries[1] == "SELECT"  # the ping, then the lookup


def _end_sessions(store: SqlStore) -> None:
    """What a server restart does to the store's pooled connections."""
    url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


def test_a_connection_the_server_ended_while_idle_is_replaced_unseen(
    wire: tuple[SqlStore, Callable[[], list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = wire
    store.put_identity(identity())
    _end_sessions(store)
    monkeypatch.setattr(engine_module, "PING_IDLE_SECONDS", 0.0)  # as if a second went by
    assert store.get_identity("dev-1") == identity()


def test_a_connection_ended_between_two_calls_fails_one_call_with_a_typed_error(
    wire: tuple[SqlStore, Callable[[], list[str]]],
) -> None:
    store, _ = wire
    store.put_identity(identity())
    with ThreadPoolExecutor(4) as pool:  # several pooled connections
        list(pool.map(lambda _: store.get_identity("dev-1"), range(40)))
    _end_sessions(store)
    # the first call meets the dead connection: the registry's error, not a driver's
    with pytest.raises(StoreError, match="failed"):
        store.get_identity("dev-1")
    # that told the pool: every connection from before is checked before it is lent again
    for _ in range(10):
        assert store.get_identity("dev-1") == identity()
    store.put_nonce(nonce())
