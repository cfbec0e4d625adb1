"""The main instance's acl_file patterns give an active device exactly what ``gateway.acl``
grants it to publish and receive (the live tests in test_mosquitto_broker.py run them on a
real Mosquitto)."""

from __future__ import annotations

import itertools

from gateway.acl import Action, Principal, TopicAcl
from gateway.mosquitto.patterns import device_patterns, render_device_patterns
from gateway.protocol import topics
from gateway.store import IdentityState

NAMES = ("dev-a", "dev-b")
CORPUS = sorted(
    {topics.CA_TOPIC, topics.CRL_TOPIC, "fg/v1/other", "fg/v1/admin/dev-a/req"}
    | {
        topic
        for name in NAMES
        for topic in (
            topics.telemetry(name),
            topics.state(name),
            topics.renew_request(name),
            topics.renew_response(name),
            topics.command(name, "reboot"),
            f"fg/v1/dev/{name}/cmd",
            f"fg/v1/dev/{name}/cmd/a/b",
            topics.quarantine(name),
            topics.enroll_request(name),
            topics.enroll_response(name),
        )
    }
)


def pattern_allows(username: str, action: Action, topic: str) -> bool:
    """Mosquitto 2.0's acl_file for a user with no ``user`` section: a pattern of the right
    access, ``%u`` replaced by the username, matches the topic."""
    wanted = "write" if action is Action.PUBLISH else "read"
    return any(
        access == wanted and topics.topic_matches(pattern.replace("%u", username), topic)
        for access, pattern in device_patterns()
    )


def test_patterns_grant_an_active_device_exactly_its_topic_acl() -> None:
    rules = TopicAcl(lambda identity: IdentityState.ACTIVE)
    for name, topic, action in itertools.product(NAMES, CORPUS, (Action.PUBLISH, Action.RECEIVE)):
        device = Principal("device", name, "operational")
        assert pattern_allows(name, action, topic) == rules.allows(device, action, topic), (
            name, action, topic,
        )


def test_the_file_names_no_device_and_every_line_is_a_pattern() -> None:
    lines = [line for line in render_device_patterns().splitlines() if line and line[0] != "#"]
    assert lines and all(line.startswith(("pattern write ", "pattern read ")) for line in lines)
    assert "pattern write fg/v1/dev/%u/telemetry" in lines
    assert "pattern read fg/v1/dev/%u/cmd/#" in lines
    assert not any("quarantine" in line for line in lines)  # quarantine is dynsec's
