"""Live events turned into row changes, and the inbox that carries them across threads."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from console_support import NOW

from console.live import EventInbox, fold_events
from console.rows import DeviceRow

ROW = DeviceRow(id="th-1", kind="device", state="active", connected=False)
LATER = NOW + timedelta(days=30)


def lookup(rows: dict[str, DeviceRow]):
    return rows.get


def event(event_kind: str, subject: str | None = "th-1", **data: str) -> dict:
    return {"v": 1, "kind": event_kind, "subject": subject, "at": NOW.isoformat(), "data": data}


def session(event_kind: str, subject: str = "th-1", **data: str) -> dict:
    """A connect or disconnect as the gateway sends it, on the operational listener unless
    ``data`` says otherwise."""
    fields = {"kind": "device", "listener": "operational", "remote": "127.0.0.1:40000", **data}
    return event(event_kind, subject, **fields)


def test_connected_and_disconnected_flip_the_row_and_stamp_last_seen() -> None:
    batch = fold_events([session("connected")], lookup({"th-1": ROW}))
    assert batch.rows["th-1"].connected is True
    assert batch.rows["th-1"].last_seen_at == NOW
    batch = fold_events([session("connected"), session("disconnected")], lookup({"th-1": ROW}))
    assert batch.rows["th-1"].connected is False
    assert not batch.reload_fleet


def test_a_device_still_enrolling_is_not_shown_online() -> None:
    """An enrolling device is connected as an enrollee on the enrollment listener; only its
    certified session on the operational listener makes it online."""
    enrolling = [
        session("connected", kind="enrollee", listener="enrollment"),
        session("connected", subject="new-one", kind="enrollee", listener="enrollment"),
    ]
    batch = fold_events(enrolling, lookup({"th-1": ROW}))
    assert not batch.rows and not batch.reload_fleet and not batch.touched
    # Switching over: the operational session starts before the enrollment one ends.
    online = ROW.with_changes(connected=True)
    switch = [session("connected"), session("disconnected", kind="enrollee", listener="enrollment")]
    assert fold_events(switch, lookup({"th-1": ROW})).rows["th-1"].connected is True
    assert not fold_events(switch[1:], lookup({"th-1": online})).rows
    # An event that does not say its listener is not taken for the operational one.
    assert not fold_events([event("connected", kind="device")], lookup({"th-1": ROW})).rows


def test_a_state_change_updates_the_state_and_the_attention_list() -> None:
    batch = fold_events([event("state_changed", state="quarantined")], lookup({"th-1": ROW}))
    assert batch.rows["th-1"].state == "quarantined"
    assert batch.reload_attention and batch.touched == {"th-1"}


def test_revocation_shows_the_device_offline() -> None:
    online = ROW.with_changes(connected=True)
    batch = fold_events([event("state_changed", state="revoked")], lookup({"th-1": online}))
    assert batch.rows["th-1"].connected is False


def test_an_unknown_identity_asks_for_a_reload() -> None:
    assert fold_events([session("connected", subject="new-one")], lookup({})).reload_fleet
    batch = fold_events(
        [event("certificate_issued", subject="new-one", not_after=LATER.isoformat())], lookup({})
    )
    assert batch.reload_fleet and batch.reload_attention and not batch.rows


def test_a_renewal_updates_the_expiry_in_place_without_a_reload() -> None:
    renewed = event("certificate_issued", not_after=LATER.isoformat(), serial="1f")
    expiring = ROW.with_changes(cert_not_after=NOW)
    batch = fold_events([renewed], lookup({"th-1": expiring}))
    assert batch.rows["th-1"].cert_not_after == LATER
    assert batch.rows["th-1"].state == "active"
    assert not batch.reload_fleet
    assert batch.reload_attention and batch.touched == {"th-1"}  # may leave "expiring"


@pytest.mark.parametrize(("not_after", "ignored"), [(None, 0), ("soon", 1), ("", 0)])
def test_a_renewal_without_a_readable_expiry_asks_the_registry(
    not_after: str | None, ignored: int
) -> None:
    data = {} if not_after is None else {"not_after": not_after}
    batch = fold_events([event("certificate_issued", **data)], lookup({"th-1": ROW}))
    assert batch.reload_fleet and not batch.rows
    assert batch.ignored == ignored


def test_a_refusal_without_subject_only_refreshes_attention() -> None:
    batch = fold_events([event("refused", subject=None, reason="not_enrolled")], lookup({}))
    assert batch.reload_attention and not batch.reload_fleet and not batch.touched


@pytest.mark.parametrize(
    "bad",
    [
        "connected",
        {"kind": 3, "subject": "th-1", "data": {}},
        {"kind": "connected", "subject": "th-1", "data": "x"},
        {"kind": "state_changed", "subject": "th-1", "data": {"state": ""}},
    ],
)
def test_malformed_events_are_counted_and_change_nothing(bad: object) -> None:
    batch = fold_events([bad], lookup({"th-1": ROW}))
    assert batch.ignored == 1 and not batch.rows


def test_an_unreadable_time_keeps_the_previous_last_seen() -> None:
    seen = ROW.with_changes(last_seen_at=NOW)
    batch = fold_events(
        [{"kind": "disconnected", "subject": "th-1", "at": "soon",
          "data": {"listener": "operational"}}],
        lookup({"th-1": seen}),
    )
    assert batch.rows["th-1"].last_seen_at == NOW


def test_the_inbox_takes_events_from_many_threads_and_drains_them_in_order() -> None:
    inbox = EventInbox()

    def push(n: int) -> None:
        for i in range(1000):
            inbox.push((n, i))

    threads = [threading.Thread(target=push, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    events, overflowed = inbox.drain()
    assert len(events) == 4000 and not overflowed
    for n in range(4):
        assert [i for m, i in events if m == n] == list(range(1000))
    assert inbox.drain() == ([], False)


def test_an_overflowing_inbox_drops_the_oldest_and_says_so() -> None:
    inbox = EventInbox(capacity=3)
    for n in range(5):
        inbox.push(n)
    assert inbox.drain() == ([2, 3, 4], True)
    with pytest.raises(ValueError):
        EventInbox(capacity=0)
