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


@pytest.fixture(autouse=True)
def explicit_collections_only() -> Iterator[None]:
    """Only the collections a test runs itself: an automatic one while it allocates would
    shift the sequence it checks."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()
    gc.unfreeze()


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


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


async def test_a_frozen_heap_that_doubled_is_rescanned_before_the_interval(
    clock: list[float],
) -> None:
    """Devices coming and going leave cycles among frozen objects: however fast that goes,
    the frozen part is scanned again once it has doubled."""
    policy = CollectorPolicy(rescan_seconds=600, growth=2, monotonic=lambda: clock[0])
    policy.install(asyncio.get_running_loop())
    try:
        start = gc.get_freeze_count()
        kept = [Node() for _ in range(start + 1000)]  # the heap more than doubles
        gc.collect()
        await _settle()
        assert policy.metrics["frozen"] == 1 and policy.metrics["rescans"] == 0
        assert policy.frozen_objects >= 2 * start
        gc.collect()
        await _settle()
        assert policy.metrics["rescans.growth"] == 1  # ten minutes had not passed
        assert gc.get_freeze_count() == 0  # the next full collection scans everything
        assert len(kept) > start
    finally:
        policy.uninstall()


async def test_a_freeze_queued_before_uninstall_does_not_run_after_it() -> None:
    policy = CollectorPolicy()
    policy.install(asyncio.get_running_loop())
    gc.collect()  # queues a freeze on the loop
    policy.uninstall()
    await _settle()
    assert gc.get_freeze_count() == 0


def test_the_rescan_interval_and_growth_are_checked() -> None:
    with pytest.raises(ValueError):
        CollectorPolicy(rescan_seconds=0)
    with pytest.raises(TypeError):
        CollectorPolicy(rescan_seconds="600")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CollectorPolicy(growth=1)


async def test_it_is_installed_once() -> None:
    policy = CollectorPolicy()
    policy.install(asyncio.get_running_loop())
    try:
        with pytest.raises(RuntimeError):
            policy.install(asyncio.get_running_loop())
    finally:
        policy.uninstall()
