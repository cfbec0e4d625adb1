"""What one identity did, in bounded memory: counts, sizes, names and addresses, never payloads.

``IdentityMetrics`` is updated once per observation in O(1) (a long silence costs at most one
pass over the window's buckets and one over the history) and keeps:

- a one-minute sliding window of messages and bytes in ``bucket_seconds`` buckets (the rate a
  spike is judged on). The identity's minutes are aligned to buckets, so when a minute ends the
  window *is* that minute's total: no second set of counters per message;
- the minutes closed since the engine last looked (``closed``): only *clean* minutes, during
  which the identity was connected throughout (an offline hour must not teach its baseline that
  silence is normal), and no zero minutes while a silence alarm stands;
- the gaps between its publishes: their mean and coefficient of variation, how far the gaps
  longer than the mean exceed it on average (exponentially weighted estimates over the last
  ~200 gaps), and the longest gap in the last 30-60 minutes;
- enrollment and renewal requests apart from the volume: a certificate signing request is many
  times a telemetry message, and its rate is the enrollment service's business (it has its
  own rate limiter); only a flood of them is looked for here;
- topic patterns (the identity's own id replaced by ``{id}``, so peers compare), source hosts,
  recent denials and connects, renewals and the firmware it last reported, each capped.

Times are float seconds since the epoch; the engine reads its clock once per observation.
"""

from __future__ import annotations

import math
import zlib

__all__ = [
    "GAP_MEMORY",
    "GAP_PERIOD_MINUTES",
    "PROTOCOL_PATTERNS",
    "WINDOW_SECONDS",
    "IdentityMetrics",
    "host_of",
    "normalise_topic",
]

WINDOW_SECONDS = 60
GAP_PERIOD_MINUTES = 30
"""The longest gap is kept for the current and the previous period: a slowly forgotten max."""
GAP_MEMORY = 200
"""Gaps the mean and variance estimates remember (exponential weighting, 1/200 per gap)."""
MAX_DENIALS = 64
MAX_REQUESTS = 256
CONNECT_MEMORY_SECONDS = 3600
MAX_CONNECTS = 256
_MAX_TEXT = 200  # topics and hosts kept for evidence are clipped to this many characters

PROTOCOL_PATTERNS = frozenset({"fg/v1/enroll/{id}/req", "fg/v1/dev/{id}/renew/req"})
"""Patterns every device uses sooner or later (enrollment and renewal requests): never news."""


def normalise_topic(topic: str, identity: str) -> str:
    """``topic`` with every level equal to ``identity`` replaced by ``{id}``:
    ``fg/v1/dev/sensor-7/telemetry`` -> ``fg/v1/dev/{id}/telemetry`` for ``sensor-7``."""
    if identity not in topic:
        return topic[:_MAX_TEXT]
    levels = topic.split("/")
    return "/".join("{id}" if level == identity else level for level in levels)[:_MAX_TEXT]


def host_of(remote: str) -> str:
    """The host of a peer address: ``10.0.0.5:50000`` -> ``10.0.0.5``, ``[::1]:8883`` ->
    ``::1``; a bare host (or bare IPv6 address) is returned as is."""
    if remote.startswith("["):
        end = remote.find("]")
        return remote[1:end] if end > 0 else remote[:_MAX_TEXT]
    if remote.count(":") == 1:
        return remote.rsplit(":", 1)[0][:_MAX_TEXT]
    return remote[:_MAX_TEXT]


def phase_buckets(identity: str, slots: int) -> int:
    """Buckets by which this identity's minutes are offset from the wall clock's, so that the
    work done when minutes close is spread over the minute instead of landing all at once."""
    return zlib.crc32(identity.encode("utf-8", "surrogatepass")) % slots


class IdentityMetrics:
    __slots__ = (
        "alarm_bytes",
        "alarm_messages",
        "bucket",
        "bucket_seconds",
        "closed",
        "connected_at",
        "connects",
        "created",
        "denials",
        "disconnects",
        "firmware_refusals",
        "firmware_reported",
        "gap_count",
        "gap_current",
        "gap_mean",
        "gap_period",
        "gap_previous",
        "gap_var",
        "hosts",
        "identity",
        "last_publish",
        "long_count",
        "long_excess",
        "max_closed",
        "max_hosts",
        "max_topics",
        "minute",
        "minute_clean",
        "minute_end_bucket",
        "next_boundary",
        "patterns",
        "phase",
        "renewals",
        "requests",
        "sessions",
        "silenced",
        "slot_bytes",
        "slot_messages",
        "slots",
        "topics",
        "window_bytes",
        "window_messages",
    )

    def __init__(
        self,
        identity: str,
        now: float,
        *,
        bucket_seconds: int,
        max_closed: int,
        max_topics: int,
        max_hosts: int,
        alarm_messages: float,
        alarm_bytes: float,
    ) -> None:
        self.identity = identity
        self.created = now
        self.bucket_seconds = bucket_seconds
        self.slots = WINDOW_SECONDS // bucket_seconds
        self.slot_messages = [0] * self.slots
        self.slot_bytes = [0] * self.slots
        self.window_messages = 0
        self.window_bytes = 0
        self.bucket = int(now // bucket_seconds)
        self.next_boundary = float((self.bucket + 1) * bucket_seconds)
        self.phase = phase_buckets(identity, self.slots)
        self.minute = (self.bucket - self.phase) // self.slots
        self.minute_end_bucket = (self.minute + 1) * self.slots + self.phase
        self.minute_clean = False  # first seen mid-minute: this one does not count
        self.closed: list[tuple[int, int]] = []
        self.max_closed = max_closed
        self.sessions = 0
        self.silenced = False  # a silence alarm stands: zero minutes are not learned
        self.connected_at: float | None = None
        self.last_publish: float | None = None  # or the connect, whichever came last
        self.gap_count = 0
        self.gap_mean = 0.0
        self.gap_var = 0.0
        self.long_count = 0
        self.long_excess = 0.0
        self.gap_current = 0.0
        self.gap_previous = 0.0
        self.gap_period = self.minute
        self.topics: dict[str, str] = {}  # raw topic -> pattern (a cache, capped)
        self.patterns: set[str] = set()
        self.max_topics = max_topics
        self.denials: list[tuple[float, str, str]] = []
        self.connects: list[float] = []
        self.disconnects = 0
        self.hosts: dict[str, float] = {}  # host -> last connect, oldest first
        self.max_hosts = max_hosts
        self.renewals = 0
        self.requests: list[float] = []  # enrollment and renewal requests, last minute
        self.firmware_reported: tuple[str | None, str | None] | None = None
        self.firmware_refusals = 0  # requests refused for firmware off the allow-list
        self.alarm_messages = alarm_messages
        self.alarm_bytes = alarm_bytes

    # time

    def advance(self, now: float) -> None:
        """Roll the window and the minute forward to ``now`` (a time before the current bucket,
        as a wall clock stepped back by NTP gives, is counted in the current one)."""
        if now < self.next_boundary:
            return
        bucket = int(now // self.bucket_seconds)
        self.next_boundary = float((bucket + 1) * self.bucket_seconds)
        if bucket >= self.minute_end_bucket:
            self._roll(self.minute_end_bucket - 1)  # the window now holds exactly the minute
            self._close_minutes((bucket - self.phase) // self.slots)
        self._roll(bucket)

    def _roll(self, bucket: int) -> None:
        steps = bucket - self.bucket
        if steps <= 0:
            return
        if steps >= self.slots:
            self.slot_messages = [0] * self.slots
            self.slot_bytes = [0] * self.slots
            self.window_messages = 0
            self.window_bytes = 0
        else:
            messages, sizes, slots = self.slot_messages, self.slot_bytes, self.slots
            for step in range(1, steps + 1):
                slot = (self.bucket + step) % slots
                self.window_messages -= messages[slot]
                self.window_bytes -= sizes[slot]
                messages[slot] = 0
                sizes[slot] = 0
        self.bucket = bucket

    def _close_minutes(self, minute: int) -> None:
        if self.minute_clean and not (self.silenced and self.window_messages == 0):
            self._push(self.window_messages, self.window_bytes)
        skipped = minute - self.minute - 1
        if skipped > 0 and self.sessions > 0 and not self.silenced:
            # Connected and silent the whole time: real zero minutes.
            for _ in range(min(skipped, self.max_closed)):
                self._push(0, 0)
        self.minute = minute
        self.minute_end_bucket = (minute + 1) * self.slots + self.phase
        self.minute_clean = self.sessions > 0
        periods = (minute - self.gap_period) // GAP_PERIOD_MINUTES
        if periods >= 1:
            self.gap_previous = self.gap_current if periods == 1 else 0.0
            self.gap_current = 0.0
            self.gap_period = minute

    def _push(self, messages: int, bytes_: int) -> None:
        self.closed.append((messages, bytes_))
        if len(self.closed) > self.max_closed:
            del self.closed[0]

    # observations

    def published(self, now: float, size: int) -> bool:
        """Count one message of ``size`` bytes; True when the window is over its alarm level."""
        if now >= self.next_boundary:
            self.advance(now)
        slot = self.bucket % self.slots
        self.slot_messages[slot] += 1
        self.slot_bytes[slot] += size
        self.window_messages += 1
        self.window_bytes += size
        last = self.last_publish
        if last is not None:
            gap = now - last
            if gap > self.gap_current:
                self.gap_current = gap
            count = self.gap_count
            if count < GAP_MEMORY:
                count = self.gap_count = count + 1
            # Exponentially weighted mean and variance (Welford's update with weight 1/count).
            delta = gap - self.gap_mean
            if delta > 0:
                # How far gaps longer than the mean go beyond it, on average: the scale of
                # the tail (for bursts, of the pauses between them).
                long = self.long_count
                if long < GAP_MEMORY:
                    long = self.long_count = long + 1
                self.long_excess += (delta - self.long_excess) / long
            self.gap_mean += delta / count
            self.gap_var += (delta * (gap - self.gap_mean) - self.gap_var) / count
        elif self.sessions == 0:
            # A publish proves a session we did not see open (the gateway restarted under it).
            self.sessions = 1
            self.minute_clean = False
        self.last_publish = now
        self.silenced = False
        return self.window_messages > self.alarm_messages or self.window_bytes > self.alarm_bytes

    def learn_topic(self, topic: str) -> tuple[str, bool, bool]:
        """Remember ``topic``; returns (its pattern, whether the pattern is new to it, whether
        the pattern was kept within the cap)."""
        pattern = normalise_topic(topic, self.identity)
        if len(self.topics) < self.max_topics:
            self.topics[topic] = pattern
        if pattern in self.patterns:
            return pattern, False, True
        if len(self.patterns) >= self.max_topics:
            return pattern, True, False
        self.patterns.add(pattern)
        return pattern, True, True

    def requested(self, now: float) -> int:
        """Count one enrollment or renewal request; returns those in the last minute."""
        requests = self.requests
        requests.append(now)
        horizon = now - WINDOW_SECONDS
        while requests and requests[0] < horizon:
            del requests[0]
        if len(requests) > MAX_REQUESTS:
            del requests[: len(requests) - MAX_REQUESTS]
        return len(requests)

    def denied(
        self, now: float, action: str, topic: str, window: float
    ) -> list[tuple[float, str, str]]:
        """Record a denial; returns the denials inside the last ``window`` seconds."""
        self.advance(now)
        denials = self.denials
        denials.append((now, action, topic[:_MAX_TEXT]))
        horizon = now - window
        while denials and denials[0][0] < horizon:
            del denials[0]
        if len(denials) > MAX_DENIALS:
            del denials[: len(denials) - MAX_DENIALS]
        return denials

    def recent_denials(self, now: float, window: float) -> list[tuple[float, str, str]]:
        horizon = now - window
        return [d for d in self.denials if d[0] >= horizon]

    def connected(self, now: float, host: str) -> tuple[bool, bool]:
        """A session opened from ``host``; returns (the host is new, a known host was evicted
        to make room)."""
        self.advance(now)
        self.sessions += 1
        self.minute_clean = False
        self.connected_at = now
        self.last_publish = now  # silence is measured from the connect until a publish
        connects = self.connects
        connects.append(now)
        horizon = now - CONNECT_MEMORY_SECONDS
        while connects and connects[0] < horizon:
            del connects[0]
        if len(connects) > MAX_CONNECTS:
            del connects[: len(connects) - MAX_CONNECTS]
        hosts = self.hosts
        new = hosts.pop(host, None) is None
        hosts[host] = now  # most recent last
        evicted = False
        if len(hosts) > self.max_hosts:
            del hosts[next(iter(hosts))]
            evicted = True
        return new, evicted

    def connects_within(self, now: float, window: float) -> int:
        horizon = now - window
        return sum(1 for t in self.connects if t >= horizon)

    def disconnected(self, now: float) -> None:
        self.advance(now)
        self.minute_clean = False
        self.disconnects += 1
        if self.sessions > 0:
            self.sessions -= 1
        if self.sessions == 0:
            self.last_publish = None
            self.connected_at = None

    @property
    def longest_gap(self) -> float:
        return max(self.gap_current, self.gap_previous)

    @property
    def gap_cv(self) -> float:
        """Coefficient of variation of the gaps: ~0 for a periodic sender, ~1 for Poisson."""
        if self.gap_mean <= 0:
            return 1.0
        return math.sqrt(max(self.gap_var, 0.0)) / self.gap_mean
