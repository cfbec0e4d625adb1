"""Policy rules: conditions on the detection and the registry's context, first match wins."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.anomaly import (
    DEFAULT_RULES,
    Action,
    Detection,
    DetectionKind,
    IdentityContext,
    Match,
    Policy,
    Rule,
)
from gateway.store import IdentityState
from pki.profile import IdentityKind

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def detection(kind: DetectionKind, score: float = 0.5) -> Detection:
    return Detection("dev-1", kind, score, "a reason", NOW)


def context(**changes: object) -> IdentityContext:
    values: dict[str, object] = {
        "kind": IdentityKind.DEVICE,
        "state": IdentityState.ACTIVE,
        "model": "th-sensor-v2",
        "firmware_version": "1.4.2",
        "firmware_digest": "ab" * 32,
        "enrolled_at": NOW - timedelta(days=2),
    }
    values.update(changes)
    return IdentityContext(**values)  # type: ignore[arg-type]


def test_the_first_matching_rule_wins() -> None:
    policy = Policy(
        [
            Rule("spikes of sensors", Action.QUARANTINE, Match(model="th-sensor-*", min_score=0.8)),
            Rule("any spike", Action.ALERT, Match(kinds=frozenset({DetectionKind.RATE_SPIKE}))),
            Rule("never reached for spikes", Action.REATTEST),
        ]
    )
    strong, weak = detection(DetectionKind.RATE_SPIKE, 0.95), detection(DetectionKind.RATE_SPIKE)
    assert policy.decide(strong, context(), NOW).name == "spikes of sensors"  # type: ignore[union-attr]
    assert policy.decide(weak, context(), NOW).name == "any spike"  # type: ignore[union-attr]
    assert policy.decide(strong, context(model="meter"), NOW).name == "any spike"  # type: ignore[union-attr]
    assert policy.decide(detection(DetectionKind.SILENCE), context(), NOW).name == (  # type: ignore[union-attr]
        "never reached for spikes"
    )


def test_no_matching_rule_means_no_action() -> None:
    policy = Policy([Rule("clones only", Action.QUARANTINE, Match(kinds=frozenset({"clone"})))])  # type: ignore[arg-type]
    assert policy.decide(detection(DetectionKind.SILENCE), context(), NOW) is None


@pytest.mark.parametrize(
    ("match", "ctx", "expected"),
    [
        (Match(states=frozenset({IdentityState.ACTIVE})), context(), True),
        (Match(states=frozenset({IdentityState.PENDING})), context(), False),
        (Match(firmware_version="1.4.*"), context(), True),
        (Match(firmware_version="1.5.*"), context(), False),
        (Match(firmware_digest="abab*"), context(), True),
        (Match(firmware_digest="ffff*"), context(firmware_digest=None), False),
        (Match(model="TH-*"), context(), False),  # globs are case-sensitive
        (Match(model="*"), context(model=None), True),
        (Match(model="th-*"), context(model=None), False),
        (Match(enrolled_less_than=3600), context(enrolled_at=NOW - timedelta(minutes=5)), True),
        (Match(enrolled_less_than=3600), context(), False),
        (Match(enrolled_more_than=86400), context(), True),
        (Match(enrolled_more_than=86400), context(enrolled_at=None), False),
    ],
)
def test_conditions_on_the_context(match: Match, ctx: IdentityContext, expected: bool) -> None:
    assert match.matches(detection(DetectionKind.NEW_SOURCE), ctx, NOW) is expected


def test_an_identity_the_registry_does_not_hold_matches_only_context_free_rules() -> None:
    found = detection(DetectionKind.RATE_SPIKE, 0.9)
    assert Match(min_score=0.8).matches(found, None, NOW)
    assert not Match(states=frozenset({IdentityState.ACTIVE})).matches(found, None, NOW)
    assert not Match(model="x*").matches(found, None, NOW)


@pytest.mark.parametrize(
    ("kind", "score", "action"),
    [
        (DetectionKind.CLONE, 1.0, Action.QUARANTINE),
        (DetectionKind.PROBING, 0.5, Action.QUARANTINE),
        (DetectionKind.FIRMWARE_CHANGE, 1.0, Action.QUARANTINE),
        (DetectionKind.RATE_SPIKE, 0.95, Action.QUARANTINE),
        (DetectionKind.RATE_SPIKE, 0.6, Action.ALERT),
        (DetectionKind.VOLUME_DRIFT, 0.95, Action.QUARANTINE),
        (DetectionKind.VOLUME_DRIFT, 0.6, Action.REATTEST),
        (DetectionKind.RECONNECT_STORM, 0.6, Action.SHORTEN_LIFETIME),
        (DetectionKind.SILENCE, 0.9, Action.ALERT),
        (DetectionKind.NEW_SOURCE, 0.5, Action.ALERT),
        (DetectionKind.NEW_TOPIC, 0.6, Action.ALERT),
    ],
)
def test_default_rules(kind: DetectionKind, score: float, action: Action) -> None:
    rule = Policy(DEFAULT_RULES).decide(detection(kind, score), context(), NOW)
    assert rule is not None and rule.action is action


def test_default_rules_only_alert_about_what_the_registry_does_not_hold() -> None:
    rule = Policy(DEFAULT_RULES).decide(detection(DetectionKind.PROBING, 1.0), None, NOW)
    assert rule is not None and rule.action is Action.ALERT


def test_rules_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="lifetime_seconds"):
        Rule("short", Action.SHORTEN_LIFETIME)
    with pytest.raises(ValueError, match=">= 60"):
        Rule("short", Action.SHORTEN_LIFETIME, lifetime_seconds=30)
    with pytest.raises(ValueError, match="shorten_lifetime only"):
        Rule("alert", Action.ALERT, lifetime_seconds=900)
    with pytest.raises(ValueError, match="min_score"):
        Match(min_score=1.5)
    with pytest.raises(ValueError):
        Match(kinds=frozenset({"no_such_kind"}))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unique"):
        Policy([Rule("a", Action.ALERT), Rule("a", Action.QUARANTINE)])


def test_actions_are_ranked_mildest_first() -> None:
    ranks = [a.rank for a in (Action.ALERT, Action.SHORTEN_LIFETIME, Action.REATTEST)]
    assert ranks == sorted(ranks) and Action.QUARANTINE.rank > max(ranks)


def test_detections_validate_and_keep_evidence_read_only() -> None:
    found = Detection("dev-1", DetectionKind.SILENCE, 0.7, "quiet", NOW, {"seconds": 40})
    with pytest.raises(TypeError):
        found.evidence["seconds"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match=r"0\.\.1"):
        Detection("dev-1", DetectionKind.SILENCE, 1.2, "quiet", NOW)
    with pytest.raises(ValueError, match="timezone"):
        Detection("dev-1", DetectionKind.SILENCE, 0.5, "quiet", datetime(2026, 1, 1))
    with pytest.raises(TypeError, match="evidence"):
        Detection("dev-1", DetectionKind.SILENCE, 0.5, "quiet", NOW, {"x": [1]})  # type: ignore[dict-item]
    assert DetectionKind("volume_drift") is DetectionKind.VOLUME_DRIFT
