"""Where the behaviour watch gets an identity's registry context: the identity-state table for
identities the registry does not hold (no read per enrolling device's message), the registry
row for the others."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from gateway.anomaly import AnomalySettings
from gateway.observe import Published
from gateway.service import IdentityStates
from gateway.store import IdentityRecord, IdentityState
from gateway.store_memory import MemoryStore
from gateway.watch import BehaviourWatch
from pki.clock import FakeClock
from pki.profile import IdentityKind

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        self.reads[identity_id] += 1
        return super().get_identity(identity_id)


def watch_over(store: CountingStore) -> tuple[BehaviourWatch, IdentityStates]:
    states = IdentityStates(store, monotonic=lambda: 0.0)  # misses stay remembered
    gateway: Any = SimpleNamespace(clock=FakeClock(T0), listeners=[], store=store, states=states)
    return BehaviourWatch(gateway, AnomalySettings()), states


def test_an_enrollee_costs_one_registry_read_shared_with_the_broker() -> None:
    store = CountingStore()
    watch, states = watch_over(store)
    assert states("th-new") is None  # the broker's ACL asked about its first message
    for _ in range(3):  # hello, retries: each a request the watch sees
        watch.observe(Published("th-new", "fg/v1/enroll/th-new/req", 900))
    assert store.reads["th-new"] == 1
    assert watch.engine.counters["ignored.unknown"] == 3


def test_a_registered_device_is_read_from_the_registry() -> None:
    store = CountingStore()
    store.put_identity(
        IdentityRecord(
            id="th-1",
            kind=IdentityKind.DEVICE,
            state=IdentityState.ACTIVE,
            created_at=T0,
            updated_at=T0,
            model="th-sensor",
        )
    )
    watch, _ = watch_over(store)
    watch.observe(Published("th-1", "fg/v1/dev/th-1/telemetry", 40))
    assert store.reads["th-1"] == 2  # the state table's load, then the row for its context
    snapshot = watch.engine.snapshot("th-1")
    assert snapshot is not None and snapshot.reference != "unregistered"
