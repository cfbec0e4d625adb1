"""Transactions on the engine's pooled driver connections, for the registry's per-request calls.

``Driver.reading()`` and ``Driver.writing()`` borrow one connection from the engine's pool (so
the pool's pre-ping, the SQLite settings of ``engine.py`` and the pool size all still apply)
and hand out a ``Transaction`` that runs ``Prepared`` statements on it:

- writing: SQLite starts with ``BEGIN IMMEDIATE`` (see ``engine.py`` for why), PostgreSQL with
  the driver's implicit transaction; the block's end commits, and the commit has returned (with
  ``synchronous=FULL``: is on disk) before the caller gets control back. Any exception rolls
  back. ``durable=False`` skips the sync of this one commit on SQLite; ``each_statement_alone``
  runs a block that needs no transaction in PostgreSQL's autocommit mode;
- reading: one statement in autocommit mode, no transaction around it. SQLite's connections
  are in that mode already (``engine.py``); a PostgreSQL connection is switched to it for the
  read (a client-side flag), else the driver would wrap the one SELECT in a BEGIN and the
  pool's ROLLBACK: three round trips to the server instead of one.

Driver errors come out as SQLAlchemy's ``DBAPIError`` subclasses (``IntegrityError``,
``OperationalError``...), the same ones a ``Connection`` raises, so ``errors.translated`` turns
them into the store's errors. A connection that failed for good (server gone, database file
read-only or failing) is invalidated instead of going back to the pool, as ``engine.py``'s
``handle_error`` hook does on the ``Connection`` path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from gateway.registry.engine import is_broken
from gateway.registry.prepared import Prepared

__all__ = ["Driver", "Transaction"]

# engine.py sets FULL on every new SQLite connection.
_RELAXED = "PRAGMA synchronous=NORMAL"
_DURABLE = "PRAGMA synchronous=FULL"


class Transaction:
    """Statements inside one ``Driver`` block."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.statement: str | None = None  # the one running, for error reports

    def first(self, prepared: Prepared, **values: Any) -> dict[str, Any] | None:
        """The first row (as ``{column: value}``) or None."""
        self.statement = prepared.sql
        cursor = self._cursor
        cursor.execute(prepared.sql, prepared.arguments(values))
        raw = cursor.fetchone()
        return None if raw is None else prepared.row(raw)

    def execute(self, prepared: Prepared, **values: Any) -> int:
        """Run a statement; the number of rows it changed."""
        self.statement = prepared.sql
        cursor = self._cursor
        cursor.execute(prepared.sql, prepared.arguments(values))
        return int(cursor.rowcount)

    def execute_many(self, prepared: Prepared, rows: Sequence[dict[str, Any]]) -> None:
        self.statement = prepared.sql
        self._cursor.executemany(prepared.sql, [prepared.arguments(row) for row in rows])


class Driver:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        dialect = engine.dialect
        self._dialect = dialect
        self._dbapi_error: type[Exception] = dialect.loaded_dbapi.Error
        self._begin = "BEGIN IMMEDIATE" if dialect.name == "sqlite" else None
        # psycopg opens a transaction before the first statement unless in autocommit mode,
        # a flag it sets without a round trip: reads and single-statement writes switch it on
        self._can_autocommit = dialect.name == "postgresql"

    @contextmanager
    def reading(self) -> Iterator[Transaction]:
        with self._connection(write=False, autocommit=self._can_autocommit) as transaction:
            yield transaction

    @contextmanager
    def writing(
        self, *, durable: bool = True, each_statement_alone: bool = False
    ) -> Iterator[Transaction]:
        """A write transaction. ``durable=False`` (SQLite): the commit is not synced to disk on
        its own, only by the next durable commit or checkpoint (``synchronous=NORMAL`` for this
        one transaction); a power cut can undo it, never corrupt the database. Only for writes
        whose loss the protocol already recovers from (see ``SqlStore``).

        ``each_statement_alone``: the block's statements need no transaction around them (a
        single conditional UPDATE, and a read that follows it). PostgreSQL then runs them in
        autocommit mode, each its own transaction: one round trip instead of BEGIN, the
        statement and COMMIT."""
        relax = not durable and self._begin is not None
        with self._connection(
            write=True, relax=relax, autocommit=each_statement_alone and self._can_autocommit
        ) as transaction:
            yield transaction

    @contextmanager
    def _connection(
        self, *, write: bool, relax: bool = False, autocommit: bool = False
    ) -> Iterator[Transaction]:
        try:
            # Unlike Connection, the pool hands connect failures over unwrapped.
            pooled = self._engine.raw_connection()
        except self._dbapi_error as error:
            raise self._wrapped(error, None, broken=False) from error
        transaction: Transaction | None = None
        try:
            cursor = pooled.cursor()
            transaction = Transaction(cursor)
            try:
                if autocommit:
                    pooled.dbapi_connection.autocommit = True  # type: ignore[union-attr]
                if relax:
                    transaction.statement = _RELAXED
                    cursor.execute(_RELAXED)
                if write and self._begin is not None:
                    transaction.statement = self._begin
                    cursor.execute(self._begin)
                yield transaction
                if write and not autocommit:
                    transaction.statement = "COMMIT"
                    pooled.commit()
            finally:
                if relax:
                    transaction.statement = _DURABLE
                    self._restore_durability(pooled, cursor)
                if autocommit:
                    self._end_autocommit(pooled)
                cursor.close()
        except self._dbapi_error as error:
            broken = not pooled.is_valid or (
                is_broken(error)
                or self._dialect.is_disconnect(cast(Any, error), pooled.dbapi_connection, None)
            )
            if broken and pooled.is_valid:
                pooled.invalidate(error)
            statement = None if transaction is None else transaction.statement
            raise self._wrapped(error, statement, broken=broken) from error
        finally:
            # Back to the pool, which rolls back whatever is still open (an exception inside
            # the block, a read's implicit PostgreSQL transaction), or closes it if invalidated.
            pooled.close()

    def _end_autocommit(self, pooled: Any) -> None:
        """The pool's other users expect transactions (SQLAlchemy's ``Connection``): a
        connection that cannot be switched back (it broke during the read) is dropped, and the
        read's own error, if any, is the one reported."""
        try:
            pooled.dbapi_connection.autocommit = False
        except self._dbapi_error as error:
            pooled.invalidate(error)

    def _restore_durability(self, pooled: Any, cursor: Any) -> None:
        """Every pooled connection is back at FULL before anyone else uses it; one that cannot
        be put back is dropped rather than left to serve a durable write unsynced."""
        try:
            pooled.rollback()  # nothing is left after a commit; the failed rest otherwise
            cursor.execute(_DURABLE)
        except self._dbapi_error as error:
            pooled.invalidate(error)
            raise

    def _wrapped(self, error: Exception, statement: str | None, *, broken: bool) -> BaseException:
        """The SQLAlchemy exception a ``Connection`` would have raised for ``error``."""
        return DBAPIError.instance(
            statement,
            None,
            error,
            self._dbapi_error,
            connection_invalidated=broken,
            dialect=self._dialect,
        )
