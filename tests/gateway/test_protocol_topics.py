"""Topic builders and parsers: one spelling of every topic, and no way out of one's own."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import topics
from gateway.protocol.topics import Channel, RequestTopic


def test_builders_spell_the_documented_topics() -> None:
    assert topics.enroll_request("dev-1") == "fg/v1/enroll/dev-1/req"
    assert topics.enroll_response("dev-1") == "fg/v1/enroll/dev-1/resp"
    assert topics.renew_request("dev-1") == "fg/v1/dev/dev-1/renew/req"
    assert topics.renew_response("dev-1") == "fg/v1/dev/dev-1/renew/resp"
    assert topics.telemetry("dev-1") == "fg/v1/dev/dev-1/telemetry"
    assert topics.state("dev-1") == "fg/v1/dev/dev-1/state"
    assert topics.command("dev-1", "reboot") == "fg/v1/dev/dev-1/cmd/reboot"
    assert topics.commands_filter("dev-1") == "fg/v1/dev/dev-1/cmd/#"
    assert topics.quarantine("dev-1") == "fg/v1/dev/dev-1/quarantine/telemetry"
    assert topics.quarantine_filter("dev-1") == "fg/v1/dev/dev-1/quarantine/#"
    assert topics.CA_TOPIC == "fg/v1/pki/ca"
    assert topics.CRL_TOPIC == "fg/v1/pki/crl"
    assert topics.GATEWAY_SUBSCRIPTIONS == ("fg/v1/enroll/+/req", "fg/v1/dev/+/renew/req")


@pytest.mark.parametrize("device_id", ["", "+", "#", "a/b", "-lead", ".dot", "x" * 65, "é"])
def test_builders_refuse_ids_that_could_escape_a_topic_level(device_id: str) -> None:
    for build in (topics.enroll_request, topics.renew_response, topics.telemetry):
        with pytest.raises(ValueError):
            build(device_id)


@pytest.mark.parametrize("name", ["", "+", "a#"])
def test_command_and_quarantine_names_have_no_wildcards(name: str) -> None:
    with pytest.raises(ValueError):
        topics.command("dev-1", name)
    with pytest.raises(ValueError):
        topics.quarantine("dev-1", name)


def test_request_topics_parse_to_device_and_channel() -> None:
    parsed = topics.parse_request_topic("fg/v1/enroll/dev-1/req")
    assert parsed == RequestTopic("dev-1", Channel.ENROLL)
    assert parsed.response == "fg/v1/enroll/dev-1/resp"
    renew = topics.parse_request_topic("fg/v1/dev/dev-1/renew/req")
    assert renew == RequestTopic("dev-1", Channel.RENEW)
    assert renew.response == "fg/v1/dev/dev-1/renew/resp"


@pytest.mark.parametrize(
    "topic",
    [
        "fg/v1/enroll/dev-1/resp",
        "fg/v1/dev/dev-1/renew/resp",
        "fg/v1/dev/dev-1/telemetry",
        "fg/v1/enroll/+/req",
        "fg/v1/enroll/dev-1/req/extra",
        "fg/v2/enroll/dev-1/req",
        "fg/v1/enroll//req",
        "fg/v1/enroll/-x/req",
        "fg/v1/pki/ca",
        "",
        "/",
    ],
)
def test_other_topics_are_not_requests(topic: str) -> None:
    assert topics.parse_request_topic(topic) is None


def test_device_of_names_the_owner_of_per_device_topics() -> None:
    assert topics.device_of("fg/v1/dev/dev-1/cmd/reboot") == "dev-1"
    assert topics.device_of("fg/v1/enroll/dev-2/req") == "dev-2"
    assert topics.device_of("fg/v1/pki/crl") is None
    assert topics.device_of("fg/v1/dev/+/telemetry") is None


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("fg/v1/dev/a/cmd/#", "fg/v1/dev/a/cmd/reboot", True),
        ("fg/v1/dev/a/cmd/#", "fg/v1/dev/a/cmd", True),
        ("fg/v1/dev/a/cmd/#", "fg/v1/dev/b/cmd/x", False),
        ("fg/v1/dev/+/telemetry", "fg/v1/dev/a/telemetry", True),
        ("fg/v1/dev/+/telemetry", "fg/v1/dev/a/b/telemetry", False),
        ("#", "fg/v1/x", True),
        ("#", "$SYS/broker", False),
        ("+/+", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/#/b", "a/x/b", False),
    ],
)
def test_topic_matches_follows_mqtt_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert topics.topic_matches(topic_filter, topic) is expected


@given(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True))
def test_every_valid_id_round_trips_through_both_request_topics(device_id: str) -> None:
    for channel in Channel:
        parsed = topics.parse_request_topic(topics.request_topic(channel, device_id))
        assert parsed == RequestTopic(device_id, channel)
