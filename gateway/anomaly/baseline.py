"""Robust baselines: what is normal for one identity, and for the peers of its model.

Every statistic here is chosen to be usable after a few minutes of data and to shrug off the
anomalies it is meant to find (docs/anomaly.md says why each one):

- per identity, the median and MAD of its per-minute message and byte counts and of its mean
  message size over the last ``history_minutes`` clean minutes (minutes it was connected
  throughout), with Poisson-shaped floors so a perfectly steady device does not alert on one
  extra message;
- per model, the ``peer_quantile`` of its warm members' own alarm thresholds, which a device
  with no history of its own is held to;
- for slow drifts, a one-sided CUSUM of clipped robust z-scores against the identity's own
  median, whose alarm minutes are kept out of the history (the reference stays frozen while it
  is being questioned).

Nothing here reads a clock or keeps more than ``history_minutes`` numbers per identity.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from itertools import repeat

__all__ = [
    "SIGMA_PER_MAD",
    "Cusum",
    "OwnBaseline",
    "PeerGroup",
    "RateReference",
    "RateStats",
    "ReferenceSource",
    "mad",
    "median",
    "quantile",
]

SIGMA_PER_MAD = 1.4826
"""MAD x this estimates the standard deviation of normally distributed data."""

# The smallest spread in bytes/min we believe: one small message more or less.
MIN_BYTES_SIGMA = 64.0
# The smallest spread of one message's size: a few bytes of JSON digits, or 5%.
MIN_SIZE_SIGMA = 4.0
MIN_SIZE_SIGMA_FRACTION = 0.05
# Arrivals are at least this irregular (periodic senders still jitter by a bucket) and at
# most this bursty, as far as the counting floor is concerned.
MIN_DISPERSION = 0.25
MAX_DISPERSION = 2.0
REFRESH_MINUTES = 5
# Counts are stored in unsigned 32-bit slots; a minute above 4 GiB is clipped, not wrapped.
_MAX_COUNT = 0xFFFFFFFF


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (0.0 for none)."""
    ordered = sorted(values)
    count = len(ordered)
    if count == 0:
        return 0.0
    middle = count // 2
    if count % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2


def mad(values: Sequence[float], center: float) -> float:
    """The median absolute deviation of ``values`` around ``center``."""
    # map() keeps the loop in C: this runs for every identity every minute.
    return median(list(map(abs, map(operator.sub, values, repeat(center)))))


def quantile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank ``fraction`` quantile (the maximum for few values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(math.ceil(fraction * len(ordered)) - 1, 0)
    return float(ordered[min(rank, len(ordered) - 1)])


@dataclass(frozen=True, slots=True)
class RateStats:
    """Median, MAD and mean of one identity's per-minute counts, and the spreads they imply.

    The spreads are floored by what counting alone produces. ``dispersion`` says how irregular
    the identity's traffic is: the larger of the coefficient of variation of its gaps and the
    square root of the index of dispersion (variance / mean) of its per-minute counts; about 1
    for Poisson arrivals, near 0 for a periodic sender, 2 for bursts of four (clamped to
    ``MIN_DISPERSION``..``MAX_DISPERSION``). A one-minute count then varies with standard
    deviation about ``dispersion * sqrt(mean)``, so a device that sent exactly 12 messages in
    every minute so far is not anomalous for sending 14, and a Poisson device whose first few
    minutes happened to agree is not held to that luck.
    """

    minutes: int
    messages: int  # in the whole history
    median_messages: float
    mad_messages: float
    mean_messages: float
    median_bytes: float
    mad_bytes: float
    mean_bytes: float
    size_minutes: int  # minutes with at least one message
    median_size: float  # bytes per message: the median over minutes with messages
    mean_size: float  # bytes per message: all bytes over all messages
    size_spread: float  # robust spread of one message's size (floored)
    dispersion: float = 1.0

    @classmethod
    def of(cls, messages: Sequence[int], sizes: Sequence[int], gap_cv: float) -> RateStats:
        count = max(len(messages), 1)
        total_messages = sum(messages)
        mean_m = total_messages / count
        squares = sum(map(operator.mul, messages, messages))
        variance = max(squares - count * mean_m * mean_m, 0.0) / max(count - 1, 1)
        index = variance / mean_m if mean_m > 0 else 1.0
        med_m = median(messages)
        med_b = median(sizes)
        busy = [(b / m, m) for m, b in zip(messages, sizes, strict=True) if m]
        per_message = [size for size, _ in busy]
        med_s = median(per_message)
        # A minute's mean size of n messages varies like one message's size / sqrt(n): scale
        # each minute's deviation back to one message. The spread is the larger of the MAD
        # estimate and the plain standard deviation: from 30 minutes the MAD alone is noisy,
        # and a spread estimated too small is a false drift alarm later.
        scaled = [abs(size - med_s) * math.sqrt(m) for size, m in busy]
        spread = max(
            SIGMA_PER_MAD * median(scaled),
            math.sqrt(sum(map(operator.mul, scaled, scaled)) / max(len(scaled) - 1, 1)),
        )
        return cls(
            minutes=len(messages),
            messages=total_messages,
            median_messages=med_m,
            mad_messages=mad(messages, med_m),
            mean_messages=mean_m,
            median_bytes=med_b,
            mad_bytes=mad(sizes, med_b),
            mean_bytes=sum(sizes) / count,
            size_minutes=len(per_message),
            median_size=med_s,
            mean_size=sum(sizes) / total_messages if total_messages else 0.0,
            size_spread=max(spread, MIN_SIZE_SIGMA_FRACTION * med_s, MIN_SIZE_SIGMA),
            dispersion=min(max(gap_cv, math.sqrt(index), MIN_DISPERSION), MAX_DISPERSION),
        )

    @property
    def sigma_messages(self) -> float:
        counting = self.dispersion * math.sqrt(max(self.mean_messages, 1.0))
        return max(SIGMA_PER_MAD * self.mad_messages, counting, 1.0)

    @property
    def sigma_bytes(self) -> float:
        size = self.mean_size or MIN_BYTES_SIGMA
        counting = self.dispersion * math.sqrt(max(self.mean_messages, 1.0)) * size
        return max(SIGMA_PER_MAD * self.mad_bytes, counting, MIN_BYTES_SIGMA)

    def drift_z(self, bytes_: float) -> float:
        """How far a minute's bytes lie above the mean, in standard deviations, on the
        square-root scale (Anscombe: ``2*sqrt(x + 3/8)`` of a Poisson count has variance ~1
        whatever its mean). The bytes count as messages of the mean size; the spread is the
        counting dispersion with the variation of sizes added. On the plain scale, a device
        averaging one message a minute sends three in a minute 6% of the time, where a normal
        z of 2.1 says 2%: its CUSUM would alarm several times more often than a chatty
        device's."""
        size = self.mean_size
        if size <= 0:
            return 0.0
        scale = math.sqrt(self.dispersion**2 + (self.size_spread / size) ** 2)
        observed = math.sqrt(bytes_ / size + 0.375)
        expected = math.sqrt(self.mean_bytes / size + 0.375)
        return 2 * (observed - expected) / scale

    @property
    def skew_messages(self) -> float:
        """Extra allowance for the long upper tail of small counts: for Poisson counts the
        upper quantile at a normal ``z`` is about ``mean + z*sqrt(mean) + (z*z + 2)/6``, and
        bursts of ``c`` messages multiply the last term by ``c`` (= dispersion squared); this
        returns the factor of ``(z*z + 2)/6``."""
        return self.dispersion**2


class ReferenceSource(StrEnum):
    """What a window was compared with."""

    OWN = "own"  # the identity's own history
    PEERS = "peers"  # the warm devices of its model
    CEILING = "ceiling"  # no baseline yet: the configured absolute ceiling
    UNREGISTERED = "unregistered"  # an identity the registry does not hold


@dataclass(frozen=True, slots=True)
class RateReference:
    """Messages and bytes per minute above which a one-minute window is a spike, and what the
    limits come from (for the reason text)."""

    source: ReferenceSource
    alarm_messages: float
    alarm_bytes: float
    stats: RateStats | None = None  # OWN
    z: float = 0.0  # OWN: robust z-score at the alarm
    peers: int = 0  # PEERS: warm members the limits come from
    peer_median_messages: float = 0.0
    peer_median_bytes: float = 0.0
    model: str | None = None

    @classmethod
    def own(cls, stats: RateStats, z: float) -> RateReference:
        """Alarm levels ``z`` spreads above the median, plus a skew allowance: small counts
        have a longer upper tail than a normal distribution (for Poisson counts the upper
        quantile at a normal z is about ``mean + z*sqrt(mean) + (z*z + 2)/6``)."""
        skew = stats.skew_messages * (z * z + 2) / 6
        size = stats.mean_size
        return cls(
            source=ReferenceSource.OWN,
            alarm_messages=stats.median_messages + z * stats.sigma_messages + skew,
            alarm_bytes=stats.median_bytes + z * stats.sigma_bytes + skew * size,
            stats=stats,
            z=z,
        )

    @classmethod
    def ceiling(
        cls, messages: float, bytes_: float, *, unregistered: bool = False
    ) -> RateReference:
        source = ReferenceSource.UNREGISTERED if unregistered else ReferenceSource.CEILING
        return cls(source=source, alarm_messages=messages, alarm_bytes=bytes_)


class Cusum:
    """One-sided CUSUM of clipped z-scores: ``S = max(0, S + min(z, clip) - k)``.

    ``k`` is the allowance (half the shift, in standard deviations, it is tuned to find);
    clipping one sample's contribution means a single outlier minute cannot raise the alarm,
    only a run of elevated minutes can. ``run`` and ``average`` describe the samples since
    ``S`` last left zero, for the reason text.
    """

    __slots__ = ("run", "total", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.run = 0
        self.total = 0.0

    def update(self, z: float, sample: float, k: float, clip: float) -> float:
        self.value = max(0.0, self.value + min(z, clip) - k)
        if self.value > 0:
            self.run += 1
            self.total += sample
        else:
            self.run = 0
            self.total = 0.0
        return self.value

    @property
    def average(self) -> float:
        return self.total / self.run if self.run else 0.0

    def reset(self) -> None:
        self.value = 0.0
        self.run = 0
        self.total = 0.0


class OwnBaseline:
    """The last ``capacity`` clean minutes of one identity, their statistics and its drift
    detectors. ``refresh()`` recomputes the statistics (a few sorts of at most ``capacity``
    numbers); the engine calls it once per closed minute, off the per-message path."""

    __slots__ = (
        "_bytes",
        "_capacity",
        "_count",
        "_messages",
        "_next",
        "drift_bytes",
        "drift_size",
        "held_out",
        "since_refresh",
        "stats",
    )

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._messages = array("I")
        self._bytes = array("I")
        self._next = 0  # where the next minute goes once the ring is full
        self._count = 0
        self.stats: RateStats | None = None
        self.drift_bytes = Cusum()
        self.drift_size = Cusum()
        self.held_out = 0  # consecutive minutes kept out of the history as anomalous
        self.since_refresh = 0  # minutes added since the statistics were computed

    @property
    def minutes(self) -> int:
        return self._count

    def add(self, messages: int, bytes_: int) -> None:
        self.since_refresh += 1
        messages = min(messages, _MAX_COUNT)
        bytes_ = min(bytes_, _MAX_COUNT)
        if self._count < self._capacity:
            self._messages.append(messages)
            self._bytes.append(bytes_)
            self._count += 1
            return
        self._messages[self._next] = messages
        self._bytes[self._next] = bytes_
        self._next = (self._next + 1) % self._capacity

    def due(self, young_minutes: int) -> bool:
        """Whether the statistics should be recomputed: after every minute while the history
        is shorter than ``young_minutes``, then every ``REFRESH_MINUTES`` (a median of an
        hour moves slowly, and recomputing it costs ~0.1 ms)."""
        if self.stats is None or self._count < young_minutes:
            return self.since_refresh > 0
        return self.since_refresh >= REFRESH_MINUTES

    def refresh(self, gap_cv: float) -> RateStats | None:
        """Recompute the statistics; ``gap_cv`` is the coefficient of variation of the
        identity's gaps (1.0 when too few are known)."""
        self.since_refresh = 0
        self.stats = RateStats.of(self._messages, self._bytes, gap_cv) if self._count else None
        return self.stats


class PeerGroup:
    """The identities of one model: their shared reference for members without a history of
    their own, and which topic patterns how many of them used."""

    __slots__ = (
        "created",
        "max_patterns",
        "members",
        "model",
        "reference",
        "refreshed_minute",
        "stale",
        "topic_users",
    )

    def __init__(self, model: str | None, created: float, max_patterns: int) -> None:
        self.model = model
        self.created = created
        self.max_patterns = max_patterns
        self.members: set[str] = set()
        self.topic_users: dict[str, int] = {}
        self.reference: RateReference | None = None
        self.refreshed_minute = -1
        self.stale = False

    def used(self, pattern: str) -> bool:
        """Count one more member using ``pattern``; False when the table is full (not kept)."""
        users = self.topic_users.get(pattern)
        if users is None:
            if len(self.topic_users) >= self.max_patterns:
                return False
            users = 0
        self.topic_users[pattern] = users + 1
        return True

    def refresh(self, warm: Iterable[RateReference], min_peers: int, fraction: float) -> None:
        """Recompute the shared reference from the members' own references: a member without
        history of its own is a spike only where ``fraction`` of its warm peers would call
        the same window a spike for themselves (robust to a model whose devices were set to
        different intervals, which a median of rates is not)."""
        references = [r for r in warm if r.stats is not None]
        self.stale = False
        if len(references) < min_peers:
            self.reference = None
            return
        self.reference = RateReference(
            source=ReferenceSource.PEERS,
            alarm_messages=quantile([r.alarm_messages for r in references], fraction),
            alarm_bytes=quantile([r.alarm_bytes for r in references], fraction),
            peers=len(references),
            peer_median_messages=median(
                [r.stats.median_messages for r in references if r.stats is not None]
            ),
            peer_median_bytes=median(
                [r.stats.median_bytes for r in references if r.stats is not None]
            ),
            model=self.model,
        )
