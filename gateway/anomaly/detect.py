"""Detections: what looked wrong, how sure we are (a score), and why, in words.

Each detector is a small pure function that turns measured values into a ``Detection`` (or
``None``); the engine decides when to call which. Scores live in 0..1 and are *escalating*:
0.5 at the detector's threshold, 0.75 at twice the threshold's evidence, 0.875 at three times,
1.0 for what is certain on its own (a clone, a firmware change without attestation). Policy
rules compare against these scores (``min_score``), so "strong" has one meaning for every kind.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType

from gateway.anomaly.baseline import RateReference, RateStats, ReferenceSource
from pki.clock import require_aware

__all__ = [
    "Detection",
    "DetectionKind",
    "EvidenceValue",
    "clone",
    "escalating_score",
    "firmware_change",
    "new_source",
    "new_topic",
    "probing",
    "rate_spike",
    "reconnect_storm",
    "request_flood",
    "silence",
    "volume_drift",
]

EvidenceValue = str | int | float
# Topics in reasons and evidence are clipped: a client chooses them, the console shows them.
_MAX_SHOWN = 120


class DetectionKind(StrEnum):
    """Stable wire codes of the detections (the console, the audit trail and policy rules use
    them)."""

    RATE_SPIKE = "rate_spike"
    VOLUME_DRIFT = "volume_drift"  # slow rise of volume (exfiltration), against a frozen reference
    SILENCE = "silence"
    NEW_TOPIC = "new_topic"
    PROBING = "probing"
    RECONNECT_STORM = "reconnect_storm"
    NEW_SOURCE = "new_source"
    FIRMWARE_CHANGE = "firmware_change"
    CLONE = "clone"


@dataclass(frozen=True, slots=True)
class Detection:
    """One finding about one identity at one time. ``evidence`` holds the numbers behind the
    reason (str -> str | int | float), read-only."""

    identity: str
    kind: DetectionKind
    score: float
    reason: str
    at: datetime
    evidence: Mapping[str, EvidenceValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.identity, str) or not self.identity:
            raise ValueError("identity must be a non-empty str")
        object.__setattr__(self, "kind", DetectionKind(self.kind))
        if isinstance(self.score, bool) or not isinstance(self.score, int | float):
            raise TypeError(f"score must be a number, not {type(self.score).__name__}")
        if not 0.0 <= self.score <= 1.0 or math.isnan(self.score):
            raise ValueError(f"score must lie in 0..1, not {self.score}")
        object.__setattr__(self, "score", float(self.score))
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError("reason must be a non-empty str")
        object.__setattr__(self, "at", require_aware(self.at, "at"))
        frozen: dict[str, EvidenceValue] = {}
        for key, value in dict(self.evidence).items():
            if not isinstance(key, str):
                raise TypeError(f"evidence keys must be str, not {type(key).__name__}")
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise TypeError(f"evidence[{key!r}] must be a str, int or float")
            frozen[key] = value
        object.__setattr__(self, "evidence", MappingProxyType(frozen))


def escalating_score(ratio: float) -> float:
    """0.5 when the evidence just reaches the threshold (``ratio`` 1), approaching 1 as it
    grows: ``1 - 0.5 ** ratio``; 0 for no evidence."""
    if math.isnan(ratio) or ratio <= 0:
        return 0.0
    return min(1.0, 1.0 - float(0.5**ratio))


def _n(value: float) -> str:
    """A count or rate for a sentence: 412, 1,200, 0.2."""
    if value == int(value) or abs(value) >= 10:
        return f"{value:,.0f}"
    return f"{value:.1f}"


def _b(value: float) -> str:
    """Bytes for a sentence: 512 B, 4.0 kB, 1.2 MB."""
    if value < 1000:
        return f"{value:.0f} B"
    if value < 1_000_000:
        return f"{value / 1000:.1f} kB"
    return f"{value / 1_000_000:.1f} MB"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _ratio(value: float, center: float) -> str:
    return f"{value / center:.1f}x" if center > 0 else "far above"


def rate_spike(
    identity: str, at: datetime, messages: int, bytes_: int, reference: RateReference
) -> Detection | None:
    """Messages or bytes in the last minute above ``reference``'s alarm levels."""
    over_messages = messages > reference.alarm_messages
    over_bytes = bytes_ > reference.alarm_bytes
    if not (over_messages or over_bytes):
        return None
    stats = reference.stats
    if reference.source is ReferenceSource.OWN and stats is not None:
        # 1 at the alarm level, 2 twice as far above the median as the alarm level, ...
        ratio = max(
            (messages - stats.median_messages)
            / max(reference.alarm_messages - stats.median_messages, 1e-9),
            (bytes_ - stats.median_bytes) / max(reference.alarm_bytes - stats.median_bytes, 1e-9),
        )
        if over_messages:
            reason = (
                f"publishes {_n(messages)} msg/min, {_ratio(messages, stats.median_messages)} "
                f"its own median of {_n(stats.median_messages)} (MAD {_n(stats.mad_messages)})"
            )
        else:
            reason = (
                f"sends {_b(bytes_)}/min, {_ratio(bytes_, stats.median_bytes)} its own median "
                f"of {_b(stats.median_bytes)} (MAD {_b(stats.mad_bytes)})"
            )
    else:
        ratio = max(
            messages / max(reference.alarm_messages, 1.0),
            bytes_ / max(reference.alarm_bytes, 1.0),
        )
        what = f"publishes {_n(messages)} msg/min" if over_messages else f"sends {_b(bytes_)}/min"
        limit = (
            f"{_n(reference.alarm_messages)} msg/min"
            if over_messages
            else f"{_b(reference.alarm_bytes)}/min"
        )
        if reference.source is ReferenceSource.PEERS:
            typical = (
                f"{_n(reference.peer_median_messages)} msg/min"
                if over_messages
                else f"{_b(reference.peer_median_bytes)}/min"
            )
            model = f"model {reference.model}" if reference.model else "its kind"
            reason = (
                f"{what} with no history of its own yet; the {reference.peers} warm peers of "
                f"{model} alert above {limit} (their median: {typical})"
            )
        elif reference.source is ReferenceSource.UNREGISTERED:
            reason = f"an identity the registry does not hold {what}, above the ceiling of {limit}"
        else:
            reason = f"{what} with no baseline yet (own or peers'), above the ceiling of {limit}"
    evidence: dict[str, EvidenceValue] = {
        "messages_per_minute": messages,
        "bytes_per_minute": bytes_,
        "reference": reference.source.value,
        "alarm_messages": round(reference.alarm_messages, 2),
        "alarm_bytes": round(reference.alarm_bytes, 2),
    }
    if stats is not None:
        evidence |= {
            "median_messages": stats.median_messages,
            "mad_messages": stats.mad_messages,
            "median_bytes": stats.median_bytes,
            "mad_bytes": stats.mad_bytes,
            "baseline_minutes": stats.minutes,
        }
    if reference.source is ReferenceSource.PEERS:
        evidence["peers"] = reference.peers
    return Detection(
        identity, DetectionKind.RATE_SPIKE, escalating_score(ratio), reason, at, evidence
    )


def request_flood(identity: str, at: datetime, *, requests: int, ceiling: int) -> Detection:
    """More enrollment or renewal requests in a minute than any device needs."""
    return Detection(
        identity,
        DetectionKind.RATE_SPIKE,
        escalating_score(requests / ceiling),
        f"sent {requests} enrollment or renewal requests in the last minute (ceiling {ceiling})",
        at,
        {"requests_per_minute": requests, "ceiling": ceiling, "reference": "requests"},
    )


def volume_drift(
    identity: str,
    at: datetime,
    *,
    measure: str,
    average: float,
    minutes: int,
    stats: RateStats,
    cusum: float,
    alarm: float,
) -> Detection:
    """A CUSUM over ``measure`` ("bytes" per minute or mean message "size") crossed ``alarm``;
    ``average`` is the measure over the ``minutes`` since the CUSUM left zero."""
    if measure == "size":
        usual, spread = stats.mean_size, stats.size_spread
        reason = (
            f"its messages have been growing: {_b(average)} each over the last {minutes} "
            f"min against a usual {_b(usual)} (spread {_b(spread)}); accumulated excess "
            f"{cusum:.1f} sd (alarm at {alarm:g})"
        )
    else:
        usual, spread = stats.mean_bytes, stats.mad_bytes
        reason = (
            f"its volume has been creeping up: {_b(average)}/min over the last {minutes} min "
            f"against a usual {_b(usual)}/min (MAD {_b(spread)}); accumulated excess "
            f"{cusum:.1f} sd (alarm at {alarm:g})"
        )
    # 0.5 when found, growing with how far the volume moved: 0.75 at twice the usual, 0.9
    # at 3.3 times (the CUSUM's own size says how sure, not how much).
    ratio = average / usual if usual > 0 else math.inf
    return Detection(
        identity,
        DetectionKind.VOLUME_DRIFT,
        max(0.5, escalating_score(ratio)),
        reason,
        at,
        {
            "measure": measure,
            "average": round(average, 1),
            "minutes": minutes,
            "usual": round(usual, 1),
            "spread": round(spread, 1),
            "cusum": round(cusum, 2),
            "alarm": alarm,
            "baseline_minutes": stats.minutes,
        },
    )


def silence(
    identity: str,
    at: datetime,
    *,
    silent_seconds: float,
    threshold_seconds: float,
    longest_gap: float,
    stats: RateStats,
) -> Detection:
    reason = (
        f"silent for {silent_seconds:.0f} s while connected; it usually publishes "
        f"{_n(stats.mean_messages)} msg/min and its longest recent gap was "
        f"{longest_gap:.0f} s (alarm after {threshold_seconds:.0f} s)"
    )
    return Detection(
        identity,
        DetectionKind.SILENCE,
        escalating_score(silent_seconds / threshold_seconds),
        reason,
        at,
        {
            "silent_seconds": round(silent_seconds, 1),
            "threshold_seconds": round(threshold_seconds, 1),
            "longest_gap_seconds": round(longest_gap, 1),
            "mean_messages": round(stats.mean_messages, 2),
        },
    )


NEW_TOPIC_SCORE = 0.6
"""A topic pattern neither the identity nor its peers used: notable, rarely harmful alone."""


def new_topic(
    identity: str,
    at: datetime,
    *,
    pattern: str,
    known: Sequence[str],
    peers_using: int,
    quorum: int,
) -> Detection:
    shown = ", ".join(_clip(p) for p in sorted(known)[:4]) or "none"
    reason = (
        f"published to {_clip(pattern)}, a topic pattern it never used and fewer than "
        f"{quorum} of its peers use ({peers_using}); it knows {shown}"
    )
    return Detection(
        identity,
        DetectionKind.NEW_TOPIC,
        NEW_TOPIC_SCORE,
        reason,
        at,
        {"pattern": _clip(pattern), "peers_using": peers_using, "known_patterns": len(known)},
    )


def probing(
    identity: str,
    at: datetime,
    denials: Sequence[tuple[float, str, str]],
    *,
    threshold: int,
    window_seconds: int,
) -> Detection | None:
    """``denials`` (time, action, topic) inside the window reached ``threshold``."""
    if len(denials) < threshold:
        return None
    actions = Counter(action for _, action, _ in denials)
    topics = list(dict.fromkeys(topic for _, _, topic in denials))
    by_action = ", ".join(f"{action} {count}" for action, count in sorted(actions.items()))
    reason = (
        f"{len(denials)} denied attempts on {len(topics)} topics in the last "
        f"{window_seconds} s ({by_action}), e.g. {_clip(topics[-1])}"
    )
    evidence: dict[str, EvidenceValue] = {
        "denials": len(denials),
        "topics": len(topics),
        "window_seconds": window_seconds,
        "threshold": threshold,
        "example": _clip(topics[-1]),
    }
    evidence |= {f"denied_{action}": count for action, count in actions.items()}
    return Detection(
        identity,
        DetectionKind.PROBING,
        escalating_score(len(denials) / threshold),
        reason,
        at,
        evidence,
    )


def reconnect_storm(
    identity: str,
    at: datetime,
    *,
    connects: int,
    hosts: int,
    threshold: int,
    window_seconds: int,
) -> Detection | None:
    if connects < threshold:
        return None
    reason = (
        f"connected {connects} times in {window_seconds} s from {hosts} "
        f"host{'s' if hosts != 1 else ''} (alarm at {threshold})"
    )
    return Detection(
        identity,
        DetectionKind.RECONNECT_STORM,
        escalating_score(connects / threshold),
        reason,
        at,
        {"connects": connects, "hosts": hosts, "window_seconds": window_seconds},
    )


NEW_SOURCE_SCORE = 0.5
"""A new address alone: DHCP and NAT change addresses; worth telling, not acting on."""


def new_source(
    identity: str, at: datetime, *, host: str, remote: str, known: Sequence[str]
) -> Detection:
    shown = ", ".join(_clip(h) for h in known[-4:]) or "none"
    return Detection(
        identity,
        DetectionKind.NEW_SOURCE,
        NEW_SOURCE_SCORE,
        f"connected from {_clip(host)}, an address it never used before (known: {shown})",
        at,
        {"host": _clip(host), "remote": _clip(remote), "known_hosts": len(known)},
    )


def _firmware(version: str | None, digest: str | None) -> str:
    text = version or "(no version)"
    return f"{text} (digest {digest[:12]}…)" if digest else text


def firmware_change(
    identity: str,
    at: datetime,
    *,
    reported: tuple[str | None, str | None],
    attested: tuple[str | None, str | None],
) -> Detection:
    reason = (
        f"renewed reporting firmware {_firmware(*reported)} while its last attestation "
        f"showed {_firmware(*attested)}, without re-attesting"
    )
    evidence: dict[str, EvidenceValue] = {
        key: value
        for key, value in (
            ("reported_version", reported[0]),
            ("reported_digest", reported[1]),
            ("attested_version", attested[0]),
            ("attested_digest", attested[1]),
        )
        if value is not None
    }
    return Detection(identity, DetectionKind.FIRMWARE_CHANGE, 1.0, reason, at, evidence)


def firmware_refused(identity: str, at: datetime, *, refusals: int) -> Detection:
    """The gateway refused the firmware the device presented (not on its model's allow-list):
    a tampered or unknown image. Certain on its own; the refusal already keeps it out."""
    return Detection(
        identity,
        DetectionKind.FIRMWARE_CHANGE,
        1.0,
        f"presented firmware that is not on its model's allow-list ({refusals} refused "
        "request(s)); a tampered or unknown image",
        at,
        {"refusals": refusals},
    )


def clone(identity: str, at: datetime, *, first_remote: str, second_remote: str) -> Detection:
    return Detection(
        identity,
        DetectionKind.CLONE,
        1.0,
        f"two sessions with one identity: {_clip(first_remote)} was live when "
        f"{_clip(second_remote)} connected",
        at,
        {"first_remote": _clip(first_remote), "second_remote": _clip(second_remote)},
    )
