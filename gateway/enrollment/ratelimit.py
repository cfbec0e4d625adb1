"""Token buckets that keep one device, or a flood rotating through device ids, from taking the
enrollment core for itself.

Every request costs a token from two buckets: the device's own (keyed by the device id of the
topic, which on both listeners is the MQTT client id the broker admitted) and one shared by all
devices. A bucket holds at most ``burst`` tokens and refills at ``rate`` per second. A request
that finds either bucket empty is answered ``rate_limited`` (advice: the same message again,
later) without being decoded further, verified or written anywhere.

Memory is bounded: at most ``max_tracked`` device buckets are kept, the least recently used
dropped first. A dropped bucket comes back full, which only ever favours a device that was
quiet long enough to fall out.

Pure: time comes from the injected clock, nothing else is touched.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pki.clock import Clock

__all__ = ["LimitScope", "RateLimiter", "RateLimits", "RateVerdict", "TokenBucket"]


class LimitScope(StrEnum):
    DEVICE = "device"
    TOTAL = "total"


def _check_positive(name: str, value: object, *, integer: bool) -> None:
    allowed = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


@dataclass(frozen=True)
class RateLimits:
    """How much one device, and all devices together, may ask of the enrollment core.

    The defaults leave a well-behaved device far below its limit (a conversation is three
    requests; retries come seconds apart) and stop a client that sends hundreds a second.
    """

    per_device_rate: float = 1.0  # tokens per second
    per_device_burst: int = 20
    total_rate: float = 500.0
    total_burst: int = 1000
    max_tracked: int = 100_000

    def __post_init__(self) -> None:
        _check_positive("per_device_rate", self.per_device_rate, integer=False)
        _check_positive("per_device_burst", self.per_device_burst, integer=True)
        _check_positive("total_rate", self.total_rate, integer=False)
        _check_positive("total_burst", self.total_burst, integer=True)
        _check_positive("max_tracked", self.max_tracked, integer=True)


@dataclass(frozen=True)
class RateVerdict:
    """``allowed``, or refused by the bucket of ``scope`` for about ``retry_after`` seconds.
    ``first`` marks the first refusal after requests were allowed: the one worth an audit
    record (a flood then costs one record, not one per message)."""

    allowed: bool
    scope: LimitScope | None = None
    retry_after: float = 0.0
    first: bool = False

    def __post_init__(self) -> None:
        if self.allowed and (self.scope is not None or self.first or self.retry_after):
            raise ValueError("an allowed verdict names no scope, wait or first refusal")
        if not self.allowed and self.scope is None:
            raise ValueError("a refusal names the bucket that refused")


class TokenBucket:
    """``burst`` tokens at most, ``rate`` new tokens per second; starts full."""

    __slots__ = ("_at", "_tokens", "burst", "limited", "rate")

    def __init__(self, rate: float, burst: int, now: datetime) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now
        self.limited = False  # the last request was refused

    def _refill(self, now: datetime) -> None:
        # A clock that steps back (NTP correction) refills nothing rather than going negative.
        elapsed = max((now - self._at).total_seconds(), 0.0)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._at = max(now, self._at)

    def available(self, now: datetime) -> bool:
        self._refill(now)
        return self._tokens >= 1.0

    def take(self) -> None:
        self._tokens -= 1.0

    def wait(self) -> float:
        """Seconds until the next token (after a refill at the same time)."""
        return max(0.0, (1.0 - self._tokens) / self.rate)


class RateLimiter:
    """Per-device and total token buckets; ``check(device_id)`` spends a token from both."""

    def __init__(self, limits: RateLimits, clock: Clock) -> None:
        if not isinstance(limits, RateLimits):
            raise TypeError(f"limits must be RateLimits, not {type(limits).__name__}")
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._total = TokenBucket(limits.total_rate, limits.total_burst, clock.now())
        self._devices: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def tracked(self) -> int:
        return len(self._devices)

    def check(self, device_id: str) -> RateVerdict:
        if not isinstance(device_id, str):
            raise TypeError(f"device_id must be a str, not {type(device_id).__name__}")
        now = self._clock.now()
        with self._lock:
            device = self._device_bucket(device_id, now)
            for scope, bucket in ((LimitScope.DEVICE, device), (LimitScope.TOTAL, self._total)):
                if not bucket.available(now):
                    first = not bucket.limited
                    bucket.limited = True
                    return RateVerdict(False, scope, bucket.wait(), first)
            device.take()
            self._total.take()
            device.limited = self._total.limited = False
            return RateVerdict(True)

    def _device_bucket(self, device_id: str, now: datetime) -> TokenBucket:
        bucket = self._devices.get(device_id)
        if bucket is None:
            limits = self.limits
            bucket = TokenBucket(limits.per_device_rate, limits.per_device_burst, now)
            self._devices[device_id] = bucket
            while len(self._devices) > limits.max_tracked:
                self._devices.popitem(last=False)
        else:
            self._devices.move_to_end(device_id)
        return bucket
