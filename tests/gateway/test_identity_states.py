"""The state table the embedded broker's ACL reads on every message: no registry read per
message of an enrollee, and a change seen at once however it arrives."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.service import IdentityStates
from gateway.store import IdentityRecord, IdentityState
from gateway.store_memory import MemoryStore
from pki.profile import IdentityKind

NOW = datetime(2026, 5, 1, tzinfo=UTC)


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        self.reads += 1
        return super().get_identity(identity_id)


def device(name: str, state: IdentityState = IdentityState.ACTIVE) -> IdentityRecord:
    return IdentityRecord(
        id=name, kind=IdentityKind.DEVICE, state=state, created_at=NOW, updated_at=NOW
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_an_enrollee_costs_one_registry_read_per_miss_window(clock: Clock) -> None:
    store = CountingStore()
    states = IdentityStates(store, monotonic=clock)
    for _ in range(8):  # the ACL asks on every message of an enrollment
        assert states("th-new") is None
    assert store.reads == 1
    clock.now += IdentityStates.MISS_SECONDS + 0.1
    assert states("th-new") is None
    assert store.reads == 2


def test_a_device_certified_meanwhile_is_known_at_once(clock: Clock) -> None:
    store = CountingStore()
    states = IdentityStates(store, monotonic=clock)
    assert states("th-1") is None
    states.set("th-1", IdentityState.ACTIVE)  # what admitting a certified device does
    assert states("th-1") is IdentityState.ACTIVE


def test_a_change_made_elsewhere_overrides_a_remembered_miss(clock: Clock) -> None:
    store = CountingStore()
    states = IdentityStates(store, monotonic=clock)
    assert states("th-2") is None
    store.put_identity(device("th-2", IdentityState.REVOKED))  # `fleetgate device ...`
    changed = states.reload(["th-2"])
    assert changed == {"th-2": (IdentityKind.DEVICE, IdentityState.REVOKED)}
    assert states("th-2") is IdentityState.REVOKED


def test_reload_reports_only_what_changed(clock: Clock) -> None:
    store = CountingStore()
    store.put_identity(device("a"))
    store.put_identity(device("b"))
    states = IdentityStates(store, monotonic=clock)
    states.refresh()
    store.change_state("b", IdentityState.QUARANTINED, NOW)
    assert states.reload(["a", "b"]) == {"b": (IdentityKind.DEVICE, IdentityState.QUARANTINED)}
    assert states("a") is IdentityState.ACTIVE


def test_a_scan_of_random_ids_stays_bounded(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(IdentityStates, "MAX_MISSES", 10)
    states = IdentityStates(CountingStore(), monotonic=clock)
    for n in range(25):
        states(f"scan-{n}")
    assert len(states._missing) <= 10
