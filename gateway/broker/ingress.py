"""How fast one connection may send: a token bucket on packets and one on bytes, per
connection, so that one client's flood slows that client and nobody else.

The embedded broker parses, checks and routes every packet on the event loop that also runs
the TLS handshakes and the enrollment core; a client sending a thousand requests a second took
that loop from every other device (their enrollment ran 65 times slower). The limit sits where
the broker reads a connection (``gateway.broker.connect.ReplayReader``): when a connection has
used its budget, its next read waits, its socket is not read meanwhile and TCP backpressure
throttles the sender at no cost to the broker. Nothing is dropped or reordered.

Defaults (``IngressLimit()``): 10 packets/s with bursts of 40, and 64 KiB/s with bursts of
256 KiB (the broker's largest packet, so one such packet always passes at once). A device's
enrollment is about six packets (subscribe, hello, enroll, their acknowledgements,
disconnect) and a few kB; telemetry every second or slower stays far below. The gateway's own
clients and operator/service identities are not limited (see ``EmbeddedBroker``).

Pure: the caller passes the time (``time.monotonic()``); the waiting is the caller's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["IngressLimit", "IngressMeter", "TokenBucket"]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, not {value!r}")


@dataclass(frozen=True)
class IngressLimit:
    """The budget of one connection (see module docstring for the defaults' reasons)."""

    packets_per_second: float = 10.0
    packet_burst: int = 40
    bytes_per_second: float = 64 * 1024
    byte_burst: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("packets_per_second", "packet_burst", "bytes_per_second", "byte_burst"):
            _check_positive(name, getattr(self, name))
        for name in ("packet_burst", "byte_burst"):
            if not isinstance(getattr(self, name), int):
                raise TypeError(f"{name} must be an int")


class TokenBucket:
    """At most ``burst`` tokens, refilled at ``rate`` per second. ``take`` always takes (the
    balance may go below zero) and says how long the taker must wait until the balance is
    back to zero: a large packet is never refused, it is paid for afterwards."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    def take(self, amount: float, now: float) -> float:
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate


class IngressMeter:
    """Charges one connection's buckets for the bytes the broker consumed from it.

    Packets are counted from MQTT 3.1.1 framing (fixed header byte, remaining length, body),
    followed across reads of any size, so the count is exact however the broker splits its
    reads. ``charge`` returns the seconds the connection must wait before its next read."""

    __slots__ = ("_body", "_bytes", "_in_length", "_length", "_packets", "_shift")

    def __init__(self, limit: IngressLimit, now: float) -> None:
        self._packets = TokenBucket(limit.packets_per_second, limit.packet_burst, now)
        self._bytes = TokenBucket(limit.bytes_per_second, limit.byte_burst, now)
        self._body = 0  # body bytes of the current packet still to come
        self._in_length = False  # inside the remaining-length field
        self._length = 0
        self._shift = 0

    def _count_packets(self, data: bytes) -> int:
        started = 0
        at, end = 0, len(data)
        while at < end:
            if self._body:
                step = min(self._body, end - at)
                self._body -= step
                at += step
            elif self._in_length:
                byte = data[at]
                at += 1
                self._length |= (byte & 0x7F) << self._shift
                self._shift += 7
                if not byte & 0x80 or self._shift >= 28:
                    # a malformed length is amqtt's to refuse; counting only resynchronises
                    self._in_length = False
                    self._body = self._length
            else:
                started += 1  # the fixed header's first byte: a new packet
                at += 1
                self._in_length = True
                self._length = 0
                self._shift = 0
        return started

    def charge(self, data: bytes, now: float) -> float:
        packets = self._count_packets(data)
        wait = self._bytes.take(len(data), now)
        if packets:
            wait = max(wait, self._packets.take(packets, now))
        return wait
