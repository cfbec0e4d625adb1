"""Time as a dependency: everything in ``pki`` that cares about "now" takes a ``Clock``.

Certificates, nonces, renew-after times and CRLs are all judged against the clock, so tests and
simulators swap in ``FakeClock`` and move time by hand instead of sleeping.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = ["DEFAULT_FAKE_START", "Clock", "FakeClock", "SystemClock", "require_aware"]

DEFAULT_FAKE_START = datetime(2026, 1, 1, tzinfo=UTC)


@runtime_checkable
class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in UTC."""
        ...


def require_aware(when: datetime, what: str = "time") -> datetime:
    """Return ``when`` converted to UTC; naive datetimes are refused because their zone is a
    guess, and a wrong guess shifts every validity window by hours."""
    if not isinstance(when, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(when).__name__}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware")
    return when.astimezone(UTC)


class SystemClock:
    """The real wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to. Safe to share between threads (simulators do)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = require_aware(start if start is not None else DEFAULT_FAKE_START, "start")
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta | float) -> None:
        """Move forward by ``delta`` (a timedelta, or seconds). Going back is ``set()``'s job, so
        that a sign error in a test shows up as an error instead of time running backwards."""
        if isinstance(delta, bool) or not isinstance(delta, timedelta | int | float):
            raise TypeError(f"delta must be a timedelta or seconds, not {type(delta).__name__}")
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ValueError("FakeClock.advance() cannot go backwards; use set()")
        with self._lock:
            self._now = self._now + step

    def set(self, when: datetime) -> None:
        aware = require_aware(when, "when")
        with self._lock:
            self._now = aware

    def __repr__(self) -> str:
        return f"FakeClock({self.now().isoformat()})"
