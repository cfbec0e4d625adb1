"""Observations on Mosquitto: ``published`` names a device only by the topics only it may
publish to (the gateway's message client receives every device message the ACL let through;
``DEVICE_PUBLISH_FILTERS`` are what it subscribes to)."""

from __future__ import annotations

import pytest
from paho.mqtt.client import topic_matches_sub

from gateway.acl import LISTENER_OPERATIONAL, Action, Principal, TopicAcl
from gateway.mosquitto.observe import DEVICE_PUBLISH_FILTERS, published
from gateway.observe import Published
from gateway.protocol import topics
from gateway.store import IdentityState


@pytest.mark.parametrize(
    "topic",
    [
        topics.telemetry("dev-a"),
        topics.state("dev-a"),
        topics.renew_request("dev-a"),
        topics.quarantine("dev-a"),
        topics.quarantine("dev-a", "diagnostics"),
        "fg/v1/dev/dev-a/quarantine",
    ],
)
def test_a_devices_own_publish_topics_name_it(topic: str) -> None:
    assert published(topic, 12) == Published("dev-a", topic, 12)


@pytest.mark.parametrize(
    "topic",
    [
        topics.command("dev-a", "reboot"),  # applications -> device
        topics.renew_response("dev-a"),
        topics.enroll_request("dev-a"),  # anyone may claim an id before enrolling
        topics.CRL_TOPIC,
        "fg/v1/dev/dev-a",
        "fg/v1/dev/dev-a/telemetry/extra",
        "fg/v1/dev/a+b/telemetry",
        "fg/v2/dev/dev-a/telemetry",
        "fg/v1/admin/alice/req",
        "",
    ],
)
def test_other_topics_name_nobody(topic: str) -> None:
    assert published(topic, 0) is None


def test_sizes_are_checked() -> None:
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError):
            published(topics.telemetry("dev-a"), bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        published(b"fg/v1/dev/dev-a/telemetry", 1)  # type: ignore[arg-type]


_SAMPLES = [
    topics.telemetry("dev-a"),
    topics.state("dev-a"),
    topics.renew_request("dev-a"),
    topics.quarantine("dev-a", "diagnostics"),
    "fg/v1/dev/dev-a/quarantine",
    topics.command("dev-a", "reboot"),
    topics.renew_response("dev-a"),
    topics.enroll_request("dev-a"),
    "fg/v1/dev/dev-a/telemetry/extra",
    "fg/v1/dev/dev-a/other",
]


@pytest.mark.parametrize("topic", _SAMPLES)
def test_a_device_is_named_exactly_where_only_it_may_publish(topic: str) -> None:
    """The attribution rests on gateway.acl: ``published`` names dev-a for a topic exactly
    when dev-a may publish there as a device (active or quarantined) and dev-b may not."""
    states = {"dev-a": IdentityState.ACTIVE, "dev-b": IdentityState.ACTIVE}

    def may_publish(name: str) -> bool:
        result = False
        for state in (IdentityState.ACTIVE, IdentityState.QUARANTINED):
            states[name] = state
            principal = Principal("device", name, LISTENER_OPERATIONAL)
            result = result or acl.allows(principal, Action.PUBLISH, topic)
        return result

    acl = TopicAcl(states.get)
    observed = published(topic, 3)
    assert (observed is not None) == (may_publish("dev-a") and not may_publish("dev-b"))
    if observed is not None:
        assert observed.identity == "dev-a"


@pytest.mark.parametrize("topic", _SAMPLES)
def test_the_filters_bring_the_gateway_what_names_a_device(topic: str) -> None:
    """Renewal requests reach the gateway through its own route; everything else that names
    a device needs ``DEVICE_PUBLISH_FILTERS`` and nothing else matches them."""
    matched = any(topic_matches_sub(f, topic) for f in DEVICE_PUBLISH_FILTERS)
    if topic_matches_sub(topics.RENEW_REQUEST_FILTER, topic):
        assert not matched
        assert published(topic, 1) is not None
    else:
        assert matched == (published(topic, 1) is not None)
