"""The gateway's garbage-collector policy: survivors of a full collection are frozen, so the
next one scans only what is new; everything is rescanned (and cycles among old objects
reclaimed) once per interval."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway.collector import CollectorPolicy


class Node:
    """A container that ends up in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def clock() -> Iterator[list[float]]:
    now = [0.0]
    yield now
    gc.unfreeze()


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_survivors_of_a_full_collection_are_frozen(clock: list[float]) -> None:
    policy = CollectorPolicy(rescan_seconds=600, monotonic=lambda: clock[0])
    policy.install(asyncio.get_running_loop())
    try:
        assert gc.get_freeze_count() > 0  # the start-up objects
        kept = Node()
        assert any(o is kept for o in gc.get_objects())  # the collector would scan it
        gc.collect()
        await _settle()
        assert policy.metrics["full"] >= 1 and policy.metrics["frozen"] >= 1
        assert not any(o is kept for o in gc.get_objects())  # frozen: never scanned again
        assert policy.longest_pause_ms > 0
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0
    assert policy._on_collection not in gc.callbacks


async def test_a_cycle_frozen_with_the_survivors_is_reclaimed_at_the_next_rescan(
    clock: list[float],
) -> None:
    policy = CollectorPolicy(rescan_seconds=600, monotonic=lambda: clock[0])
    policy.install(asyncio.get_running_loop())
    try:
        garbage = cycle()  # unreachable, but only a collection can tell
        gc.freeze()  # as if frozen right after a full collection
        gc.collect()
        await _settle()
        assert garbage() is not None  # frozen: the full collection did not look at it
        clock[0] += 600  # the rescan interval has passed
        gc.collect()
        await _settle()
        assert policy.metrics["rescans"] == 1
        gc.collect()  # the first full collection after the rescan scans everything
        assert garbage() is None
    finally:
        policy.uninstall()


def test_the_rescan_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        CollectorPolicy(rescan_seconds=0)
    with pytest.raises(TypeError):
        CollectorPolicy(rescan_seconds="600")  # type: ignore[arg-type]


async def test_it_is_installed_once() -> None:
    policy = CollectorPolicy()
    policy.install(asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError):
            policy.install(asyncio.get_running_loop())
    finally:
        policy.uninstall()
