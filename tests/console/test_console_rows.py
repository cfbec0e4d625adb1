"""Rows parsed from the admin API's list_identities: good ones read, bad ones refused with a
reason and skipped without losing the fleet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from console.errors import ConsoleError, ConsoleReason
from console.rows import DeviceRow, expiry_text, row_from_wire, rows_from_wire, seen_text

GOOD = {
    "id": "th-200-abc-00001",
    "kind": "device",
    "state": "active",
    "model": "TH-200",
    "manufacturer": "Acme Sensors",
    "firmware_version": "1.4.2",
    "connected": True,
    "last_seen_at": "2026-03-01T11:59:00+00:00",
    "cert_not_after": "2026-03-01T13:00:00+00:00",
    "role": None,
}


def test_a_well_formed_identity_becomes_a_row() -> None:
    row = row_from_wire(GOOD)
    assert row.id == "th-200-abc-00001" and row.connected is True
    assert row.cert_not_after == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    assert row.role == ""
    assert "acme sensors" in row.search_text


def test_missing_optional_fields_read_as_empty() -> None:
    row = row_from_wire({"id": "op-alice", "kind": "operator", "state": "active"})
    assert row.model == "" and row.cert_not_after is None and row.connected is False


@pytest.mark.parametrize(
    "bad",
    [
        "th-1",
        ["th-1"],
        {**GOOD, "id": ""},
        {**GOOD, "id": 7},
        {k: v for k, v in GOOD.items() if k != "state"},
        {**GOOD, "connected": "yes"},
        {**GOOD, "model": 3},
        {**GOOD, "cert_not_after": "tomorrow"},
        {**GOOD, "last_seen_at": 1700000000},
    ],
)
def test_a_malformed_identity_is_refused_with_invalid_row(bad: object) -> None:
    with pytest.raises(ConsoleError) as caught:
        row_from_wire(bad)
    assert caught.value.reason is ConsoleReason.INVALID_ROW


def test_one_bad_identity_is_skipped_and_counted_not_the_fleet() -> None:
    rows, skipped = rows_from_wire([GOOD, {"id": 1}, {**GOOD, "id": "th-2"}])
    assert [r.id for r in rows] == ["th-200-abc-00001", "th-2"]
    assert skipped == 1


def test_a_list_that_is_not_a_list_is_refused() -> None:
    with pytest.raises(ConsoleError) as caught:
        rows_from_wire({"identities": []})
    assert caught.value.reason is ConsoleReason.INVALID_ROW


def test_a_naive_wire_time_is_read_as_utc() -> None:
    row = row_from_wire({**GOOD, "cert_not_after": "2026-03-01T13:00:00"})
    assert row.cert_not_after == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"id": None}, TypeError),
        ({"state": ""}, ValueError),
        ({"connected": 1}, TypeError),
        ({"cert_not_after": "2026"}, TypeError),
        ({"last_seen_at": datetime(2026, 1, 1)}, ValueError),
    ],
)
def test_a_row_built_in_code_validates_its_fields(changes: dict, error: type) -> None:
    fields = {"id": "th-1", "kind": "device", "state": "active", **changes}
    with pytest.raises(error):
        DeviceRow(**fields)


def test_times_read_as_countdowns() -> None:
    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert expiry_text(now + timedelta(days=2, hours=3), now) == "in 2d 3h"
    assert expiry_text(now + timedelta(hours=1, minutes=5), now) == "in 1h 05m"
    assert expiry_text(now + timedelta(seconds=42), now) == "in 42s"
    assert expiry_text(now - timedelta(minutes=3), now) == "expired 3m 00s ago"
    assert expiry_text(None, now) == "—"
    assert seen_text(None, now) == "never"
    assert seen_text(now, now) == "just now"
