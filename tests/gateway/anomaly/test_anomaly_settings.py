"""The [anomaly] table of fleetgate.toml: defaults, a full example, errors that name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.anomaly import (
    DEFAULT_RULES,
    Action,
    AnomalySettings,
    AnomalySettingsError,
    DetectionKind,
)
from gateway.store import IdentityState
from pki.profile import IdentityKind

EXAMPLE = """
[anomaly]
enabled = true
bucket_seconds = 5
warmup_minutes = 10
cooldown_minutes = 15
monitored_kinds = ["device", "operator"]

[anomaly.thresholds]
spike_z = 6
probing_denials = 2
silence_min_seconds = 45

[[anomaly.rules]]
name = "new devices that probe"
kinds = ["probing", "new_topic"]
enrolled_less_than = 3600
action = "quarantine"

[[anomaly.rules]]
name = "old firmware is watched closely"
model = "th-sensor-*"
firmware_version = "1.3.*"
states = ["active"]
min_score = 0.6
action = "shorten_lifetime"
lifetime_seconds = 600

[[anomaly.rules]]
name = "everything else"
action = "alert"
"""


def test_an_absent_table_means_the_defaults() -> None:
    settings = AnomalySettings.from_table({})
    assert settings == AnomalySettings()
    assert settings.rules == DEFAULT_RULES
    assert settings.monitored_kinds == (IdentityKind.DEVICE,)


def test_a_full_example_parses() -> None:
    settings = AnomalySettings.from_table(tomllib.loads(EXAMPLE)["anomaly"])
    assert settings.bucket_seconds == 5 and settings.warmup_minutes == 10
    assert settings.monitored_kinds == (IdentityKind.DEVICE, IdentityKind.OPERATOR)
    assert settings.thresholds.spike_z == 6.0 and isinstance(settings.thresholds.spike_z, float)
    assert settings.thresholds.probing_denials == 2
    first, second, last = settings.rules
    assert first.match.kinds == {DetectionKind.PROBING, DetectionKind.NEW_TOPIC}
    assert first.match.enrolled_less_than == 3600 and first.action is Action.QUARANTINE
    assert second.match.states == {IdentityState.ACTIVE}
    assert second.match.firmware_version == "1.3.*" and second.match.min_score == 0.6
    assert second.lifetime_seconds == 600
    assert last.name == "everything else" and not last.match.about_identity


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"bogus": 1}, "unknown setting anomaly.bogus"),
        ({"enabled": "yes"}, "anomaly.enabled must be true or false"),
        ({"bucket_seconds": 7}, "anomaly.bucket_seconds must divide 60"),
        ({"bucket_seconds": 1.5}, "anomaly.bucket_seconds must be an integer"),
        ({"cooldown_minutes": 0}, "anomaly.cooldown_minutes must be an integer >= 1"),
        ({"warmup_minutes": 90}, "warmup_minutes must not exceed history_minutes"),
        ({"monitored_kinds": ["robot"]}, "anomaly.monitored_kinds: unknown value 'robot'"),
        ({"thresholds": {"spike": 3}}, "unknown setting anomaly.thresholds.spike"),
        ({"thresholds": {"spike_z": "high"}}, "anomaly.thresholds.spike_z must be a number"),
        ({"thresholds": {"storm_connects": 2.5}}, "thresholds.storm_connects must be an integer"),
        ({"thresholds": {"spike_z": -1}}, "anomaly.thresholds.spike_z must be > 0"),
        ({"thresholds": {"peer_quantile": 0.2}}, "peer_quantile must lie between 0.5 and 1"),
        ({"rules": {"name": "x"}}, "anomaly.rules must be an array of tables"),
        ({"rules": [{"action": "alert"}]}, r"anomaly.rules\[0\].name is required"),
        ({"rules": [{"name": "x"}]}, r"anomaly.rules\[0\].action is required"),
        (
            {"rules": [{"name": "x", "action": "alert"}, {"name": "y", "action": "nuke"}]},
            r"anomaly.rules\[1\].action: unknown action 'nuke'",
        ),
        (
            {"rules": [{"name": "x", "action": "alert", "kinds": ["spike"]}]},
            r"anomaly.rules\[0\].kinds: unknown value 'spike'",
        ),
        (
            {"rules": [{"name": "x", "action": "alert", "states": ["asleep"]}]},
            r"anomaly.rules\[0\].states: unknown value 'asleep'",
        ),
        (
            {"rules": [{"name": "x", "action": "alert", "min_score": 2}]},
            r"anomaly.rules\[0\].min_score must lie between 0 and 1",
        ),
        (
            {"rules": [{"name": "x", "action": "shorten_lifetime"}]},
            r"anomaly.rules\[0\]: rule 'x': shorten_lifetime needs lifetime_seconds",
        ),
        (
            {"rules": [{"name": "x", "action": "alert", "model": 5}]},
            r"anomaly.rules\[0\].model must be a non-empty string",
        ),
        (
            {"rules": [{"name": "x", "action": "alert", "colour": "red"}]},
            r"unknown setting anomaly.rules\[0\].colour",
        ),
        (
            {"rules": [{"name": "x", "action": "alert"}, {"name": "x", "action": "alert"}]},
            "the name 'x' is used twice",
        ),
    ],
)
def test_errors_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(AnomalySettingsError, match=message):
        AnomalySettings.from_table(table)


def test_the_error_is_a_value_error_for_the_config_loader() -> None:
    assert issubclass(AnomalySettingsError, ValueError)


def test_the_example_in_the_documentation_parses() -> None:
    doc = Path(__file__).parents[3] / "docs" / "anomaly.md"
    example = re.search(r"```toml\n(.*?)```", doc.read_text(), re.S)
    assert example is not None
    settings = AnomalySettings.from_table(tomllib.loads(example.group(1))["anomaly"])
    assert [rule.name for rule in settings.rules][-1] == "tell me about the rest"
