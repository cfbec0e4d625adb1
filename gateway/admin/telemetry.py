"""How often each device publishes telemetry, in one-minute buckets, for the console's chart.

Only counts are kept, never payloads, and memory is bounded: ``minutes`` counters per device and
at most ``max_devices`` devices (the one silent longest is forgotten first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.transport import Message
from pki.clock import Clock

DEFAULT_MINUTES = 30
DEFAULT_MAX_DEVICES = 100_000


@dataclass(frozen=True)
class TelemetryRate:
    per_minute: tuple[int, ...]  # oldest first; the last bucket is the current minute
    total: int  # every message counted since the gateway started (or the device was forgotten)

    def __post_init__(self) -> None:
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.per_minute):
            raise ValueError("per_minute must hold counts (ints >= 0)")
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 0:
            raise ValueError("total must be an int >= 0")


class _Series:
    __slots__ = ("counts", "minute", "total")

    def __init__(self, minute: int, minutes: int) -> None:
        self.minute = minute  # the minute the last bucket stands for
        self.counts = [0] * minutes
        self.total = 0

    def roll(self, minute: int) -> None:
        """Shift so that the last bucket is ``minute``; buckets falling off the front go."""
        gap = minute - self.minute
        if gap <= 0:
            return
        size = len(self.counts)
        self.counts = [*self.counts[gap:], *([0] * min(gap, size))][-size:]
        self.minute = minute


class TelemetryCounter:
    """Counts messages per device. ``count`` runs on the gateway's event loop for every
    telemetry message; ``rate`` is read from the admin worker thread, hence the lock."""

    def __init__(
        self,
        clock: Clock,
        *,
        minutes: int = DEFAULT_MINUTES,
        max_devices: int = DEFAULT_MAX_DEVICES,
    ) -> None:
        if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
            raise ValueError("minutes must be an int >= 1")
        if isinstance(max_devices, bool) or not isinstance(max_devices, int) or max_devices < 1:
            raise ValueError("max_devices must be an int >= 1")
        self._clock = clock
        self._minutes = minutes
        self._max_devices = max_devices
        self._series: OrderedDict[str, _Series] = OrderedDict()
        self._lock = threading.Lock()

    def _minute(self) -> int:
        return int(self._clock.now().timestamp() // 60)

    def count(self, device_id: str, messages: int = 1) -> None:
        minute = self._minute()
        with self._lock:
            series = self._series.get(device_id)
            if series is None:
                series = self._series[device_id] = _Series(minute, self._minutes)
                if len(self._series) > self._max_devices:
                    self._series.popitem(last=False)
            else:
                self._series.move_to_end(device_id)
            series.roll(minute)
            series.counts[-1] += messages
            series.total += messages

    def rate(self, device_id: str) -> TelemetryRate:
        minute = self._minute()
        with self._lock:
            series = self._series.get(device_id)
            if series is None:
                return TelemetryRate((0,) * self._minutes, 0)
            series.roll(minute)
            return TelemetryRate(tuple(series.counts), series.total)

    def __len__(self) -> int:
        with self._lock:
            return len(self._series)

    def handle(self, topic: str, payload: bytes) -> Sequence[Message]:
        """The route handler for ``fg/v1/dev/+/telemetry`` (inline: on the event loop)."""
        parts = topic.split("/")
        if len(parts) == 5 and parts[4] == "telemetry":
            self.count(parts[3])
        return ()
