"""Context-aware policy: ordered rules map a detection and what the registry says about its
identity to an action. The first rule that matches wins; no match, no action.

A rule matches when every condition it sets holds: detection kinds, a model glob, firmware
version and digest globs, identity states, a minimum score, and time since enrollment. A
condition about the identity (model, firmware, state, enrollment) never matches an identity
the registry does not hold; a rule that sets none of them does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from fnmatch import fnmatchcase

from gateway.anomaly.context import IdentityContext
from gateway.anomaly.detect import Detection, DetectionKind
from gateway.store import IdentityState

__all__ = [
    "DEFAULT_RULES",
    "MIN_LIFETIME_SECONDS",
    "Action",
    "Match",
    "Policy",
    "Rule",
]

MIN_LIFETIME_SECONDS = 60
"""The shortest certificate lifetime a rule may impose (the gateway's own minimum)."""


class Action(StrEnum):
    """What the gateway does about a detection, mildest first."""

    ALERT = "alert"  # tell the operators (event stream, console, audit)
    SHORTEN_LIFETIME = "shorten_lifetime"  # cap the lifetime of its next certificates
    REATTEST = "reattest"  # refuse its next renewal until it attests afresh
    QUARANTINE = "quarantine"  # shrink its rights to the quarantine outlet now

    @property
    def rank(self) -> int:
        """Severity order: a later detection of the same kind may escalate, never repeat."""
        return _RANK[self]


_RANK = {
    Action.ALERT: 0,
    Action.SHORTEN_LIFETIME: 1,
    Action.REATTEST: 2,
    Action.QUARANTINE: 3,
}


@dataclass(frozen=True, slots=True)
class Match:
    """The conditions of one rule; the defaults match everything."""

    kinds: frozenset[DetectionKind] = frozenset()  # empty: any kind
    model: str = "*"
    firmware_version: str = "*"
    firmware_digest: str = "*"
    states: frozenset[IdentityState] = frozenset()  # empty: any state
    min_score: float = 0.0
    enrolled_less_than: int | None = None  # seconds since enrollment
    enrolled_more_than: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", frozenset(DetectionKind(k) for k in self.kinds))
        object.__setattr__(self, "states", frozenset(IdentityState(s) for s in self.states))
        for name in ("model", "firmware_version", "firmware_digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty glob")
        score = self.min_score
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise TypeError("min_score must be a number")
        if math.isnan(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"min_score must lie in 0..1, not {score}")
        for name in ("enrolled_less_than", "enrolled_more_than"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise ValueError(f"{name} must be a number of seconds >= 0")

    @property
    def about_identity(self) -> bool:
        """True when a condition needs the registry's context."""
        return (
            self.model != "*"
            or self.firmware_version != "*"
            or self.firmware_digest != "*"
            or bool(self.states)
            or self.enrolled_less_than is not None
            or self.enrolled_more_than is not None
        )

    def matches(self, detection: Detection, context: IdentityContext | None, now: datetime) -> bool:
        if self.kinds and detection.kind not in self.kinds:
            return False
        if detection.score < self.min_score:
            return False
        if not self.about_identity:
            return True
        if context is None:
            return False
        if not _glob(self.model, context.model):
            return False
        if not _glob(self.firmware_version, context.firmware_version):
            return False
        if not _glob(self.firmware_digest, context.firmware_digest):
            return False
        if self.states and context.state not in self.states:
            return False
        if self.enrolled_less_than is not None or self.enrolled_more_than is not None:
            if context.enrolled_at is None:
                return False
            age = (now - context.enrolled_at).total_seconds()
            if self.enrolled_less_than is not None and not age < self.enrolled_less_than:
                return False
            if self.enrolled_more_than is not None and not age > self.enrolled_more_than:
                return False
        return True


def _glob(pattern: str, value: str | None) -> bool:
    """Case-sensitive glob; an unknown value matches only ``*``."""
    if pattern == "*":
        return True
    return value is not None and fnmatchcase(value, pattern)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    match: Match = Match()
    lifetime_seconds: int | None = None  # with SHORTEN_LIFETIME only

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError("a rule needs a name")
        object.__setattr__(self, "action", Action(self.action))
        if not isinstance(self.match, Match):
            raise TypeError(f"match must be a Match, not {type(self.match).__name__}")
        lifetime = self.lifetime_seconds
        if self.action is Action.SHORTEN_LIFETIME:
            if isinstance(lifetime, bool) or not isinstance(lifetime, int):
                raise ValueError(f"rule {self.name!r}: shorten_lifetime needs lifetime_seconds")
            if lifetime < MIN_LIFETIME_SECONDS:
                raise ValueError(
                    f"rule {self.name!r}: lifetime_seconds must be >= {MIN_LIFETIME_SECONDS}"
                )
        elif lifetime is not None:
            raise ValueError(
                f"rule {self.name!r}: lifetime_seconds goes with shorten_lifetime only"
            )


class Policy:
    """Ordered rules; ``decide`` returns the first that matches, or ``None``."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self._rules = tuple(rules)
        names = [rule.name for rule in self._rules]
        for rule in self._rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules must be Rule values, not {type(rule).__name__}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")

    @property
    def rules(self) -> Sequence[Rule]:
        return self._rules

    def decide(
        self, detection: Detection, context: IdentityContext | None, now: datetime
    ) -> Rule | None:
        for rule in self._rules:
            if rule.match.matches(detection, context, now):
                return rule
        return None


_ACTIVE = frozenset({IdentityState.ACTIVE})

DEFAULT_RULES: tuple[Rule, ...] = (
    # Certain on their own: one certificate in two places, a device touching what is not its
    # own, firmware that changed without being measured.
    Rule(
        "clone",
        Action.QUARANTINE,
        Match(kinds=frozenset({DetectionKind.CLONE}), states=_ACTIVE),
    ),
    Rule(
        "probing",
        Action.QUARANTINE,
        Match(kinds=frozenset({DetectionKind.PROBING}), states=_ACTIVE),
    ),
    Rule(
        "firmware-change",
        Action.QUARANTINE,
        Match(kinds=frozenset({DetectionKind.FIRMWARE_CHANGE}), states=_ACTIVE),
    ),
    # Volume far beyond its own history or its peers' (score 0.9: over 3.3x the threshold's
    # evidence): contain now.
    Rule(
        "strong-volume",
        Action.QUARANTINE,
        Match(
            kinds=frozenset({DetectionKind.RATE_SPIKE, DetectionKind.VOLUME_DRIFT}),
            states=_ACTIVE,
            min_score=0.9,
        ),
    ),
    # A slow rise is what exfiltration by modified firmware looks like: make it prove its
    # firmware at the next renewal.
    Rule(
        "drift",
        Action.REATTEST,
        Match(kinds=frozenset({DetectionKind.VOLUME_DRIFT}), states=_ACTIVE),
    ),
    # Churn: shorter certificates bring it back to the gateway sooner.
    Rule(
        "reconnect-storm",
        Action.SHORTEN_LIFETIME,
        Match(kinds=frozenset({DetectionKind.RECONNECT_STORM}), states=_ACTIVE),
        lifetime_seconds=900,
    ),
    # Moderate spikes, silence, new topics, new addresses, and identities the registry does
    # not hold (an enrollment flood): tell the operators.
    Rule("alert", Action.ALERT),
)
"""Used when fleetgate.toml has no ``[[anomaly.rules]]`` (docs/anomaly.md explains each)."""
