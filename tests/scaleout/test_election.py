"""Leader election: exactly one leader among the members; the lock passes on when the leader
stops or its database session dies; a leader whose takeover fails does not lead until it
succeeds. On the in-memory locks, then on a real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import create_engine, text

from gateway.cluster import (
    LEADER_LOCK_KEY,
    ClusterError,
    ClusterReason,
    Leadership,
    MemoryLocks,
    PostgresLeaderLock,
)


class Member:
    """A leadership with a record of what it was told."""

    def __init__(self, lock, *, fail_takeovers: int = 0) -> None:  # type: ignore[no-untyped-def]
        self.events: list[str] = []
        self._fail = fail_takeovers
        self.leadership = Leadership(
            lock, on_elected=self._elected, on_deposed=self._deposed, interval=0.05
        )

    async def _elected(self) -> None:
        if self._fail:
            self._fail -= 1
            raise RuntimeError("broker unavailable")
        self.events.append("elected")

    async def _deposed(self) -> None:
        self.events.append("deposed")


async def _settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


async def test_one_of_three_members_leads_and_the_others_wait() -> None:
    server = MemoryLocks()
    members = [Member(server.session()) for _ in range(3)]
    for member in members:
        await member.leadership.start()
    await _settle()
    assert [m.leadership.is_leader for m in members] == [True, False, False]
    assert members[0].events == ["elected"] and members[1].events == members[2].events == []
    for member in members:
        await member.leadership.stop()


async def test_a_stopping_leader_hands_over_at_once() -> None:
    server = MemoryLocks()
    first, second = Member(server.session()), Member(server.session())
    await first.leadership.start()
    await second.leadership.start()
    await first.leadership.stop()
    assert server.holder is None  # released, not left to time out
    await _settle()
    assert second.leadership.is_leader and second.events == ["elected"]
    await second.leadership.stop()


async def test_a_leader_that_lost_its_session_steps_down_and_another_leads() -> None:
    server = MemoryLocks()
    first_lock = server.session()
    first, second = Member(first_lock), Member(server.session())
    await first.leadership.start()
    await second.leadership.start()
    first_lock.sever()  # the database closed the leader's connection
    await _settle()
    assert not first.leadership.is_leader and first.events == ["elected", "deposed"]
    assert second.leadership.is_leader and second.events == ["elected"]
    for member in (first, second):
        await member.leadership.stop()


async def test_a_failed_takeover_is_retried_and_leads_only_once_it_succeeds() -> None:
    member = Member(MemoryLocks().session(), fail_takeovers=2)
    await member.leadership.start()
    assert not member.leadership.is_leader  # holds the lock, but the broker is not in line
    await _settle()
    assert member.leadership.is_leader and member.events == ["elected"]
    assert member.leadership.elections == 1
    await member.leadership.stop()


async def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval"):
        Leadership(MemoryLocks().session(), on_elected=_settle, on_deposed=_settle, interval=0)


# -- PostgreSQL --------------------------------------------------------------------------------


def test_a_registry_that_is_not_postgresql_cannot_elect_a_leader(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ClusterError) as caught:
        PostgresLeaderLock(f"sqlite:///{tmp_path / 'registry.db'}")
    assert caught.value.reason is ClusterReason.NEEDS_POSTGRESQL
    with pytest.raises(ClusterError) as caught:
        PostgresLeaderLock("not a url")
    assert caught.value.reason is ClusterReason.NEEDS_POSTGRESQL


@pytest.mark.parametrize("key", [2**63, True, "fg"])
def test_a_lock_key_outside_bigint_is_refused(key: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        PostgresLeaderLock("postgresql://u@127.0.0.1/db", key=key)  # type: ignore[arg-type]


def test_postgresql_gives_the_lock_to_one_session_and_frees_it_when_that_session_dies(
    database_url: str,
) -> None:
    first, second = PostgresLeaderLock(database_url), PostgresLeaderLock(database_url)
    try:
        assert first.try_acquire() is True
        assert first.try_acquire() is True  # held already: no second, stacked lock
        assert second.try_acquire() is False
        assert first.still_held()
        # An administrator (or a dead TCP peer) ends the leader's session.
        engine = create_engine(database_url)
        with engine.connect() as admin:
            ended = admin.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted "
                    "AND ((classid::bigint << 32) | objid::bigint) = :key"
                ),
                {"key": LEADER_LOCK_KEY},
            ).scalars().all()
        engine.dispose()
        assert ended == [True]
        assert first.still_held() is False
        assert second.try_acquire() is True
        assert first.try_acquire() is False  # a fresh session, but the lock is taken
        second.release()
        assert first.try_acquire() is True
    finally:
        first.close()
        second.close()


def test_the_database_being_unreachable_means_not_leading() -> None:
    lock = PostgresLeaderLock("postgresql://fleetgate@127.0.0.1:1/none", connect_timeout=2)
    assert lock.try_acquire() is False
    assert lock.still_held() is False
    lock.close()


async def test_two_gateways_race_for_the_lock_and_one_wins(database_url: str) -> None:
    members = [Member(PostgresLeaderLock(database_url)) for _ in range(2)]
    # both ask at once: the database decides
    await asyncio.gather(*(m.leadership.start() for m in members))
    assert sorted(m.leadership.is_leader for m in members) == [False, True]
    leader = next(m for m in members if m.leadership.is_leader)
    other = next(m for m in members if m is not leader)
    await leader.leadership.stop()
    await asyncio.sleep(0.3)
    assert other.leadership.is_leader
    await other.leadership.stop()
