"""Live events from the gateway, turned into row changes.

Events arrive on the admin client's network thread at whatever rate the fleet produces them;
``EventInbox`` only queues them (a deque append is thread-safe), and the window drains the inbox
every 250 ms in the UI thread, so a storm of connects costs one table update, not thousands.
``fold_events`` is pure: which rows change, and what has to be fetched again.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from console.errors import ConsoleError
from console.rows import DeviceRow, parse_time

# Beyond this many undrained events (a UI thread that stalled) the oldest are dropped and the
# next drain asks for a full reload instead: the reload is the truth anyway.
MAX_QUEUED_EVENTS = 50_000
# Kinds that change what the attention panel lists.
ATTENTION_KINDS = frozenset(
    {"state_changed", "certificate_issued", "refused", "clone", "anomaly"}
)
# The listener whose sessions make a row "online". A device still enrolling is connected too,
# as an enrollee on the enrollment listener; its connects and disconnects say nothing about
# the certified device (the two sessions even overlap while it switches over).
OPERATIONAL_LISTENER = "operational"


class EventInbox:
    """Thread-safe queue of raw event objects (decoded JSON), drained by the UI thread."""

    def __init__(self, capacity: int = MAX_QUEUED_EVENTS) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._events: deque[object] = deque()
        self._capacity = capacity
        self._lock = threading.Lock()
        self._overflowed = False

    def push(self, event: object) -> None:
        with self._lock:
            if len(self._events) >= self._capacity:
                self._events.popleft()
                self._overflowed = True
            self._events.append(event)

    def drain(self) -> tuple[list[object], bool]:
        """Everything queued, oldest first, and whether some events were dropped."""
        with self._lock:
            events, self._events = list(self._events), deque()
            overflowed, self._overflowed = self._overflowed, False
        return events, overflowed


@dataclass
class LiveBatch:
    """What a batch of events means for the console."""

    rows: dict[str, DeviceRow] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)  # identities any event was about
    reload_fleet: bool = False  # an identity the table does not know yet
    reload_attention: bool = False
    ignored: int = 0  # events that were not well-formed


def _event_time(event: Mapping[str, object]) -> datetime | None:
    try:
        return parse_time(event.get("at"), "at")
    except ConsoleError:
        return None


def fold_events(
    events: Iterable[object], lookup: Callable[[str], DeviceRow | None]
) -> LiveBatch:
    """Apply events in order to the rows ``lookup`` finds; returns the rows that changed."""
    batch = LiveBatch()
    for event in events:
        if not isinstance(event, Mapping):
            batch.ignored += 1
            continue
        kind = event.get("kind")
        subject = event.get("subject")
        data = event.get("data")
        if not isinstance(kind, str) or not isinstance(data, Mapping | None):
            batch.ignored += 1
            continue
        data = data or {}
        if kind in ("connected", "disconnected") and (
            data.get("listener") != OPERATIONAL_LISTENER
        ):
            continue
        if kind in ATTENTION_KINDS:
            batch.reload_attention = True
        if not isinstance(subject, str) or not subject:
            continue  # refusals of unknown identities have no subject: attention only
        batch.touched.add(subject)
        row = batch.rows.get(subject) or lookup(subject)
        if row is None:
            # A device seen for the first time: its model, firmware and state come with a
            # reload.
            if kind in ("connected", "state_changed", "certificate_issued"):
                batch.reload_fleet = True
            continue
        at = _event_time(event)
        if kind == "certificate_issued":
            # A renewal: the new expiry comes with the event. Without a readable one, the
            # registry is asked (the reload is the truth).
            try:
                not_after = parse_time(data.get("not_after"), "not_after")
            except ConsoleError:
                batch.ignored += 1
                not_after = None
            if not_after is None:
                batch.reload_fleet = True
                continue
            row = row.with_changes(cert_not_after=not_after)
        elif kind == "connected":
            row = row.with_changes(connected=True, last_seen_at=at or row.last_seen_at)
        elif kind == "disconnected":
            row = row.with_changes(connected=False, last_seen_at=at or row.last_seen_at)
        elif kind == "state_changed":
            state = data.get("state")
            if not isinstance(state, str) or not state:
                batch.ignored += 1
                continue
            row = row.with_changes(state=state, connected=row.connected and state != "revoked")
        else:
            continue
        batch.rows[subject] = row
    return batch
