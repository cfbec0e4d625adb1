"""Engines for the registry: SQLite tuned for durability; PostgreSQL as it comes, with a pool
that pings only the connections that may have died (``_server_engine``).

SQLite settings, applied to every new connection:

- ``journal_mode=WAL``: readers never block the writer, and a commit is one append to the log;
- ``synchronous=FULL``: the log is synced at every commit, so a certificate row is on disk
  before the certificate is published. NORMAL in WAL mode never corrupts the database but
  syncs only at checkpoints, so a power cut can undo the last commits: a device would hold a
  certificate (serial, key) the registry no longer knows, a revocation could come undone.
  Only the few writes ``sql_store`` lists, whose loss the protocol recovers from, relax it
  for their own transaction;
- ``foreign_keys=ON``: SQLite ignores foreign keys unless asked;
- ``busy_timeout``: wait for another writer instead of failing at once.

Write transactions start with ``BEGIN IMMEDIATE`` on SQLite. Python's sqlite3 module would
start a deferred transaction, which takes the write lock only at the first write; two writers
that both read first (the audit head, an identity) then deadlock-fail with "database is locked"
without waiting. Taking the lock at BEGIN makes them queue on busy_timeout instead. This follows
SQLAlchemy's documented recipe for pysqlite transactions:
https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import StaticPool

__all__ = [
    "DEFAULT_BUSY_TIMEOUT_MS",
    "PING_IDLE_SECONDS",
    "WRITE_OPTION",
    "create_registry_engine",
    "is_broken",
    "writer",
]

DEFAULT_BUSY_TIMEOUT_MS = 5000

PING_IDLE_SECONDS = 1.0
"""A server connection idle this long is pinged before it is handed out again."""

_IDLE_SINCE = "fleetgate_idle_since"

WRITE_OPTION = "fleetgate_write"
"""Execution option marking a connection that will write (SQLite: BEGIN IMMEDIATE)."""


def is_broken(error: BaseException) -> bool:
    """Whether a driver error leaves its connection unusable for good.

    A SQLite connection opened while the file was read-only (or the disk failing) stays that
    way; the pool would hand it out forever (PostgreSQL says "read-only transaction" on a
    standby, where a new connection is the cure too). Dropping it lets the registry write
    again as soon as the condition clears, without a restart.
    """
    text = str(error).lower()
    return "readonly" in text or "read-only" in text or "disk i/o error" in text


def create_registry_engine(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> Engine:
    """An engine for ``url``; SQLite connections get the settings described above."""
    if isinstance(busy_timeout_ms, bool) or not isinstance(busy_timeout_ms, int):
        raise TypeError("busy_timeout_ms must be an int")
    if busy_timeout_ms < 0:
        raise ValueError("busy_timeout_ms must be >= 0")
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return _server_engine(parsed)

    options: dict[str, Any] = {}
    if parsed.database in (None, "", ":memory:"):
        # An in-memory database lives in one connection: share it rather than get a fresh,
        # empty database per pooled connection.
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = create_engine(parsed, **options)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # The driver must not open transactions on its own; the "begin" hook below does.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        finally:
            cursor.close()

    @event.listens_for(engine, "handle_error")
    def _drop_broken(context: Any) -> None:
        if is_broken(context.original_exception):
            context.is_disconnect = True

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _server_engine(url: URL) -> Engine:
    """A PostgreSQL engine whose pool checks a connection before lending it only when that
    connection may have died unseen: idle for ``PING_IDLE_SECONDS`` or more (a server restart, an
    idle timeout, a network cut while nobody asked), or back in the pool from before a broken
    connection was last seen on this engine (the server restarted under load: its siblings are
    dead too).

    SQLAlchemy's ``pool_pre_ping`` pings at every checkout: a round trip before every registry
    call, a sixth of a clustered gateway's CPU under enrollment load, for connections used a
    millisecond earlier. A connection that dies between its last use and this check still
    fails its statement; the call gets the registry's typed error and the device retries.
    """
    # LIFO: under light load the connection lent is the one used last, not yet worth a ping
    engine = create_engine(url, pool_use_lifo=True)
    dialect = engine.dialect
    dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
    last_broken = [float("-inf")]

    @event.listens_for(engine, "invalidate")
    def _broken_seen(_dbapi_connection: Any, _record: Any, _exception: Any) -> None:
        last_broken[0] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _idle_from_now(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:
            record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_unsure(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None:  # just connected
            return
        if time.monotonic() - since < PING_IDLE_SECONDS and since > last_broken[0]:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dbapi_error as error:
            # the pool drops this connection and lends another (it retries the checkout)
            raise DisconnectionError(f"pooled connection failed its ping: {error}") from error

    return engine


def writer(engine: Engine) -> Engine:
    """The same engine (same pool) with connections marked for writing."""
    return engine.execution_options(**{WRITE_OPTION: True})
