"""Live events turned into row changes, and the inbox that carries them across threads."""

from __future__ import annotations

import threading

import pytest
from console_support import NOW

from console.live import EventInbox, fold_events
from console.rows import DeviceRow

ROW = DeviceRow(id="th-1", kind="device", state="active", connected=False)


def lookup(rows: dict[str, DeviceRow]):
    return rows.get


def event(event_kind: str, subject: str | None = "th-1", **data: str) -> dict:
    return {"v": 1, "kind": event_kind, "subject": subject, "at": NOW.isoformat(), "data": data}


def test_connected_and_disconnected_flip_the_row_and_stamp_last_seen() -> None:
    batch = fold_events([event("connected", kind="device")], lookup({"th-1": ROW}))
    assert batch.rows["th-1"].connected is True
    assert batch.rows["th-1"].last_seen_at == NOW
    batch = fold_events(
        [event("connected"), event("disconnected")], lookup({"th-1": ROW})
    )
    assert batch.rows["th-1"].connected is False
    assert not batch.reload_fleet


def test_a_state_change_updates_the_state_and_the_attention_list() -> None:
    batch = fold_events([event("state_changed", state="quarantined")], lookup({"th-1": ROW}))
    assert batch.rows["th-1"].state == "quarantined"
    assert batch.reload_attention and batch.touched == {"th-1"}


def test_revocation_shows_the_device_offline() -> None:
    online = ROW.with_changes(connected=True)
    batch = fold_events([event("state_changed", state="revoked")], lookup({"th-1": online}))
    assert batch.rows["th-1"].connected is False


def test_an_unknown_identity_or_a_new_certificate_asks_for_a_reload() -> None:
    assert fold_events([event("connected", subject="new-one")], lookup({})).reload_fleet
    batch = fold_events([event("certificate_issued")], lookup({"th-1": ROW}))
    assert batch.reload_fleet and batch.reload_attention and not batch.rows


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
        [{"kind": "disconnected", "subject": "th-1", "at": "soon", "data": {}}],
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
