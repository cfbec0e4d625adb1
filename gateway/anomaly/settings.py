"""The ``[anomaly]`` table of fleetgate.toml, parsed once into frozen values.

Every key has a default, so ``[anomaly]`` may be absent; an unknown key, a wrong type or an
out-of-range value is an ``AnomalySettingsError`` (a ``ValueError``) naming the key, e.g.
``anomaly.thresholds.spike_z must be a number``. When the file has no ``[[anomaly.rules]]``
the documented ``DEFAULT_RULES`` apply; when it has some, they replace the defaults entirely
(first match wins, so a partial merge would be guesswork).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from gateway.anomaly.detect import DetectionKind
from gateway.anomaly.policy import DEFAULT_RULES, Action, Match, Rule
from gateway.store import IdentityState
from pki.profile import IdentityKind

__all__ = ["AnomalySettings", "AnomalySettingsError", "Thresholds"]

_BUCKET_DIVISORS = (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60)


class AnomalySettingsError(ValueError):
    """A key of ``[anomaly]`` is unknown, of the wrong type or out of range."""


def _positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise AnomalySettingsError(f"{where} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class Thresholds:
    """Where each detector fires (docs/anomaly.md: why these defaults)."""

    spike_z: float = 5.0  # robust z-score of a one-minute window over the own median
    peer_quantile: float = 0.95  # a newcomer must exceed the alarm level of this share of peers
    min_peers: int = 3  # warm members a model needs before newcomers are held to it
    max_messages_per_minute: int = 600  # ceiling while neither own nor peer baseline exists
    max_bytes_per_minute: int = 1_000_000
    unregistered_messages_per_minute: int = 30  # identities the registry does not hold
    drift_k: float = 0.75  # CUSUM allowance, in standard deviations
    drift_h: float = 8.0  # CUSUM alarm level, in standard deviations
    drift_clip: float = 4.0  # most one minute may add to the CUSUM
    drift_warmup_minutes: int = 30  # minutes of history before drift is judged
    silence_factor: float = 4.0  # silence alarm after this many times its longest recent gap
    silence_tail: float = 18.0  # ... or the mean gap + this many times the long gaps' excess
    silence_min_seconds: int = 30
    probing_denials: int = 3  # denied attempts ...
    probing_window_seconds: int = 300  # ... within this window
    storm_connects: int = 6  # connects ...
    storm_window_seconds: int = 300  # ... within this window
    topic_warmup_minutes: int = 60  # before a topic pattern it never used is news
    topic_quorum_fraction: float = 0.1  # share of a model's members that make a pattern usual
    grace_after_connect_seconds: int = 10  # no rate alarm right after a connect (backlog)

    def __post_init__(self) -> None:
        where = "anomaly.thresholds."
        for item in fields(self):
            value = getattr(self, item.name)
            kind = int if isinstance(item.default, int) else float
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise AnomalySettingsError(f"{where}{item.name} must be a number")
            if kind is int and not isinstance(value, int):
                raise AnomalySettingsError(f"{where}{item.name} must be an integer")
            _positive(f"{where}{item.name}", value, allow_zero=item.name.startswith("grace"))
        if not 0.5 <= self.peer_quantile <= 1.0:
            raise AnomalySettingsError(f"{where}peer_quantile must lie between 0.5 and 1")
        if not 0.0 < self.topic_quorum_fraction <= 1.0:
            raise AnomalySettingsError(f"{where}topic_quorum_fraction must lie in (0, 1]")
        if self.drift_clip <= self.drift_k:
            raise AnomalySettingsError(f"{where}drift_clip must exceed drift_k")


@dataclass(frozen=True)
class AnomalySettings:
    enabled: bool = True
    bucket_seconds: int = 10  # resolution of the one-minute sliding window
    history_minutes: int = 60  # clean minutes a device's own baseline keeps
    warmup_minutes: int = 5  # clean minutes before its own baseline is trusted ...
    warmup_messages: int = 20  # ... holding at least this many messages
    cooldown_minutes: int = 30  # the same (identity, kind) is raised again only if it escalates
    max_identities: int = 100_000  # the longest-silent identity is forgotten beyond this
    max_unregistered: int = 10_000  # identities the registry does not hold, tracked at most
    max_topics_per_identity: int = 16
    max_hosts_per_identity: int = 8
    max_patterns_per_model: int = 64
    monitored_kinds: tuple[IdentityKind, ...] = (IdentityKind.DEVICE,)
    thresholds: Thresholds = field(default_factory=Thresholds)
    rules: tuple[Rule, ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise AnomalySettingsError("anomaly.enabled must be true or false")
        for item in fields(self):
            if item.name in ("enabled", "monitored_kinds", "thresholds", "rules"):
                continue
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AnomalySettingsError(f"anomaly.{item.name} must be an integer >= 1")
        if self.bucket_seconds not in _BUCKET_DIVISORS:
            raise AnomalySettingsError(
                f"anomaly.bucket_seconds must divide 60 (one of "
                f"{', '.join(map(str, _BUCKET_DIVISORS))}), got {self.bucket_seconds}"
            )
        if self.warmup_minutes > self.history_minutes:
            raise AnomalySettingsError("anomaly.warmup_minutes must not exceed history_minutes")
        kinds = tuple(self.monitored_kinds)
        if not kinds or not all(isinstance(k, IdentityKind) for k in kinds):
            raise AnomalySettingsError("anomaly.monitored_kinds must list identity kinds")
        object.__setattr__(self, "monitored_kinds", kinds)
        if not isinstance(self.thresholds, Thresholds):
            raise AnomalySettingsError("anomaly.thresholds must be a Thresholds")
        rules = tuple(self.rules)
        if not all(isinstance(rule, Rule) for rule in rules):
            raise AnomalySettingsError("anomaly.rules must be Rule values")
        names = [rule.name for rule in rules]
        for name in names:
            if names.count(name) > 1:
                raise AnomalySettingsError(f"anomaly.rules: the name {name!r} is used twice")
        object.__setattr__(self, "rules", rules)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AnomalySettings:
        """Parse ``[anomaly]`` as ``tomllib`` gives it."""
        if not isinstance(table, Mapping):
            raise AnomalySettingsError("[anomaly] must be a table")
        kwargs: dict[str, Any] = {}
        known = {item.name: item for item in fields(cls)}
        for key, value in table.items():
            if key not in known:
                raise AnomalySettingsError(f"unknown setting anomaly.{key}")
            if key == "thresholds":
                kwargs[key] = _thresholds(value)
            elif key == "rules":
                kwargs[key] = _rules(value)
            elif key == "monitored_kinds":
                kwargs[key] = _enum_list("anomaly.monitored_kinds", value, IdentityKind)
            elif key == "enabled":
                if not isinstance(value, bool):
                    raise AnomalySettingsError("anomaly.enabled must be true or false")
                kwargs[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise AnomalySettingsError(f"anomaly.{key} must be an integer")
                kwargs[key] = value
        return cls(**kwargs)


def _thresholds(value: object) -> Thresholds:
    if not isinstance(value, Mapping):
        raise AnomalySettingsError("anomaly.thresholds must be a table")
    known = {item.name: item for item in fields(Thresholds)}
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        if key not in known:
            raise AnomalySettingsError(f"unknown setting anomaly.thresholds.{key}")
        is_int = isinstance(known[key].default, int)
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise AnomalySettingsError(f"anomaly.thresholds.{key} must be a number")
        if is_int and not isinstance(item, int):
            raise AnomalySettingsError(f"anomaly.thresholds.{key} must be an integer")
        kwargs[key] = item if is_int else float(item)
    return Thresholds(**kwargs)


def _enum_list(where: str, value: object, enum: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AnomalySettingsError(f"{where} must be a list of strings")
    out = []
    for item in value:
        try:
            out.append(enum(item))
        except ValueError:
            choices = ", ".join(e.value for e in enum)
            raise AnomalySettingsError(
                f"{where}: unknown value {item!r} (one of {choices})"
            ) from None
    return tuple(out)


_RULE_KEYS = frozenset(
    {
        "name",
        "action",
        "lifetime_seconds",
        "kinds",
        "model",
        "firmware_version",
        "firmware_digest",
        "states",
        "min_score",
        "enrolled_less_than",
        "enrolled_more_than",
    }
)


def _rules(value: object) -> tuple[Rule, ...]:
    if not isinstance(value, list):
        raise AnomalySettingsError("anomaly.rules must be an array of tables ([[anomaly.rules]])")
    return tuple(_rule(f"anomaly.rules[{index}]", table) for index, table in enumerate(value))


def _rule(where: str, table: object) -> Rule:
    if not isinstance(table, Mapping):
        raise AnomalySettingsError(f"{where} must be a table")
    unknown = sorted(set(table) - _RULE_KEYS)
    if unknown:
        raise AnomalySettingsError(f"unknown setting {where}.{unknown[0]}")
    for key in ("name", "action"):
        if key not in table:
            raise AnomalySettingsError(f"{where}.{key} is required")
    for key in ("name", "action", "model", "firmware_version", "firmware_digest"):
        if key in table and (not isinstance(table[key], str) or not table[key]):
            raise AnomalySettingsError(f"{where}.{key} must be a non-empty string")
    try:
        action = Action(table["action"])
    except ValueError:
        raise AnomalySettingsError(
            f"{where}.action: unknown action {table['action']!r} "
            f"(one of {', '.join(a.value for a in Action)})"
        ) from None
    match: dict[str, Any] = {}
    if "kinds" in table:
        match["kinds"] = frozenset(_enum_list(f"{where}.kinds", table["kinds"], DetectionKind))
    if "states" in table:
        match["states"] = frozenset(_enum_list(f"{where}.states", table["states"], IdentityState))
    for key in ("model", "firmware_version", "firmware_digest"):
        if key in table:
            match[key] = table[key]
    if "min_score" in table:
        score = table["min_score"]
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise AnomalySettingsError(f"{where}.min_score must be a number")
        if not 0.0 <= score <= 1.0:
            raise AnomalySettingsError(f"{where}.min_score must lie between 0 and 1")
        match["min_score"] = float(score)
    for key in ("enrolled_less_than", "enrolled_more_than", "lifetime_seconds"):
        if key in table:
            seconds = table[key]
            if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 0:
                raise AnomalySettingsError(f"{where}.{key} must be a number of seconds >= 0")
    try:
        return Rule(
            name=table["name"],
            action=action,
            match=Match(
                **match,
                enrolled_less_than=table.get("enrolled_less_than"),
                enrolled_more_than=table.get("enrolled_more_than"),
            ),
            lifetime_seconds=table.get("lifetime_seconds"),
        )
    except (TypeError, ValueError) as error:
        raise AnomalySettingsError(f"{where}: {error}") from error
