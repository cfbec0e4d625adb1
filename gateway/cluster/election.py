"""One leader among the gateways that share a PostgreSQL registry.

The leader is the gateway holding a PostgreSQL session-level advisory lock, on a connection
opened for that alone. No lease to renew and no clock to trust: the lock lives exactly as long
as the session. A gateway that dies (even by SIGKILL) closes its socket, PostgreSQL ends the
session and the lock is free at once; the next gateway to ask, within ``interval`` seconds,
leads. A gateway cut off from the database notices at its next check (``still_held`` fails on
the dead connection) and stops leading.

Two gateways may both believe they lead for a moment: the old one until its next check fails,
while PostgreSQL already gave the lock to another (a network partition; the server notices the
dead session through TCP keepalives). Everything a leader does is therefore idempotent and
derived from the registry (dynsec state, CRL, kicks of revoked identities), so doing it twice
costs a little work and never a wrong state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from gateway.cluster.errors import ClusterError, ClusterReason

__all__ = [
    "LEADER_LOCK_KEY",
    "LeaderLock",
    "Leadership",
    "MemoryLeaderLock",
    "MemoryLocks",
    "PostgresLeaderLock",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

LEADER_LOCK_KEY = int.from_bytes(b"fg-leadr")
"""Advisory lock key of the leadership (the audit chain's appenders use ``b"fg-audit"``)."""

# libpq's TCP keepalives: a connection whose peer vanished without closing it (a pulled cable,
# a partition) is declared dead after about idle + interval * count seconds, not hours.
_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
               "keepalives_count": 3}


class LeaderLock(Protocol):
    """The lock that makes one gateway the leader. Blocking calls: run them off the loop."""

    def try_acquire(self) -> bool:
        """True if this gateway holds the lock now; never waits for another holder."""
        ...

    def still_held(self) -> bool:
        """False once the lock may have gone to someone else (the connection is gone)."""
        ...

    def release(self) -> None: ...


class PostgresLeaderLock:
    """``pg_try_advisory_lock`` on a dedicated connection (not from the registry's pool)."""

    def __init__(
        self, url: str, *, key: int = LEADER_LOCK_KEY, connect_timeout: int = 5
    ) -> None:
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ClusterError(
                ClusterReason.NEEDS_POSTGRESQL, f"not a database URL: {exc}"
            ) from None
        if parsed.get_backend_name() != "postgresql":
            raise ClusterError(
                ClusterReason.NEEDS_POSTGRESQL,
                f"several gateways need a PostgreSQL registry, not {parsed.get_backend_name()}",
            )
        if isinstance(key, bool) or not isinstance(key, int) or not -(2**63) <= key < 2**63:
            raise ValueError("key must be a signed 64-bit int")
        connect_args: dict[str, Any] = {}
        if parsed.get_driver_name() == "psycopg":
            connect_args = {"connect_timeout": connect_timeout, **_KEEPALIVES}
        self._engine = create_engine(
            parsed, poolclass=NullPool, isolation_level="AUTOCOMMIT", connect_args=connect_args
        )
        self._key = key
        self._connection: Connection | None = None
        self._held = False

    def try_acquire(self) -> bool:
        if self._held:
            # pg_try_advisory_lock stacks for its holder: asking again would need two unlocks.
            return self.still_held()
        try:
            if self._connection is None:
                self._connection = self._engine.connect()
            got = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}
            ).scalar()
        except SQLAlchemyError as exc:
            log.debug("leader lock: %s", exc)
            self._drop()
            return False
        self._held = bool(got)
        return self._held

    def still_held(self) -> bool:
        if not self._held or self._connection is None:
            return False
        try:
            # A session lock is released only with its session: the session answering is proof.
            self._connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.warning("leader lock connection lost: %s", exc)
            self._drop()
            return False
        return True

    def release(self) -> None:
        if self._connection is not None and self._held:
            with contextlib.suppress(SQLAlchemyError):
                self._connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": self._key}
                )
        self._drop()

    def close(self) -> None:
        self.release()
        self._engine.dispose()

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self._held = False
        if connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                connection.close()


class MemoryLocks:
    """The advisory locks of one imaginary database server, for tests and simulations:
    ``session()`` is one gateway's connection, ``MemoryLeaderLock.sever()`` plays its loss."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._holder: MemoryLeaderLock | None = None

    def session(self) -> MemoryLeaderLock:
        return MemoryLeaderLock(self)

    @property
    def holder(self) -> MemoryLeaderLock | None:
        return self._holder


class MemoryLeaderLock:
    def __init__(self, server: MemoryLocks) -> None:
        self._server = server
        self.connected = True

    def try_acquire(self) -> bool:
        with self._server._mutex:
            self.connected = True  # a fresh connection after a lost one
            if self._server._holder is None:
                self._server._holder = self
            return self._server._holder is self

    def still_held(self) -> bool:
        with self._server._mutex:
            return self.connected and self._server._holder is self

    def release(self) -> None:
        with self._server._mutex:
            if self._server._holder is self:
                self._server._holder = None

    def sever(self) -> None:
        """The server closed this session: its lock is free for others at once."""
        with self._server._mutex:
            self.connected = False
            if self._server._holder is self:
                self._server._holder = None


Callback = Callable[[], Awaitable[None]]


class Leadership:
    """Keep asking for the lock; lead while holding it.

    ``on_elected`` runs when this gateway starts leading (take over: reconcile the broker with
    the registry). If it fails, it runs again at the next check and ``is_leader`` stays False
    meanwhile, so the leader's duties start only on a reconciled broker. ``on_deposed`` runs
    when the lock is lost. Both run on the event loop, one at a time.
    """

    def __init__(
        self,
        lock: LeaderLock,
        *,
        on_elected: Callback,
        on_deposed: Callback,
        interval: float = 1.0,
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be positive")
        self._lock = lock
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._interval = interval
        self._holding = False
        self._ready = False
        self._task: asyncio.Task[None] | None = None
        # One thread for every lock call: the dedicated connection is used by one thread only.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leader-lock")
        self.elections = 0

    @property
    def is_leader(self) -> bool:
        """Holds the lock and has taken over."""
        return self._holding and self._ready

    async def start(self) -> None:
        """Ask once now (a lone gateway leads from its first second), then every interval."""
        if self._task is not None:
            raise RuntimeError("already started")
        await self.check()
        self._task = asyncio.create_task(self._run(), name="leadership")

    async def stop(self) -> None:
        """Stop asking and hand the lock back, so another gateway leads without waiting."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._holding:
            self._holding = self._ready = False
            with contextlib.suppress(Exception):
                await self._call(self._lock.release)
        close = getattr(self._lock, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                await self._call(close)
        self._thread.shutdown(wait=False)

    async def check(self) -> None:
        """One round: confirm the lock (or ask for it) and act on any change."""
        if self._holding:
            if await self._call(self._lock.still_held):
                if not self._ready:
                    await self._take_over()
                return
            self._holding = self._ready = False
            log.warning("no longer the leader")
            try:
                await self._on_deposed()
            except Exception:
                log.exception("stepping down failed")
        elif await self._call(self._lock.try_acquire):
            self._holding = True
            self.elections += 1
            log.info("elected leader")
            await self._take_over()

    async def _take_over(self) -> None:
        try:
            await self._on_elected()
        except Exception:
            log.exception("taking over as leader failed; trying again in %.1f s", self._interval)
            return
        self._ready = True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check()
            except Exception:  # never let the election die with the gateway still running
                log.exception("leader election round failed")

    async def _call(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function)
