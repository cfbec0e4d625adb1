"""The broker's topic policy, rule by rule, without a broker."""

from __future__ import annotations

import pytest

from gateway.acl import (
    LISTENER_ENROLLMENT,
    LISTENER_INTERNAL,
    LISTENER_OPERATIONAL,
    Action,
    Principal,
    Refusal,
    TopicAcl,
    filter_is_valid,
)
from gateway.store import IdentityState

PUB, SUB, RECV = Action.PUBLISH, Action.SUBSCRIBE, Action.RECEIVE
ACTIVE, QUARANTINED = IdentityState.ACTIVE, IdentityState.QUARANTINED
PENDING, REVOKED = IdentityState.PENDING, IdentityState.REVOKED

DEV_A = Principal("device", "dev-a", LISTENER_OPERATIONAL, "ab" * 32, 12345)
ENROLLEE = Principal("enrollee", "dev-e", LISTENER_ENROLLMENT)
OPERATOR = Principal("operator", "alice", LISTENER_OPERATIONAL)
GATEWAY = Principal("service", "gateway", LISTENER_OPERATIONAL)
OTHER_SERVICE = Principal("service", "metrics", LISTENER_OPERATIONAL)
INTERNAL = Principal("internal", "fleetgate-gateway", LISTENER_INTERNAL)


@pytest.fixture
def states() -> dict[str, IdentityState]:
    return {
        "dev-a": ACTIVE,
        "dev-b": ACTIVE,
        "alice": ACTIVE,
        "gateway": ACTIVE,
        "metrics": ACTIVE,
    }


@pytest.fixture
def acl(states: dict[str, IdentityState]) -> TopicAcl:
    return TopicAcl(states.get)


# -- active device ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["fg/v1/dev/dev-a/telemetry", "fg/v1/dev/dev-a/state", "fg/v1/dev/dev-a/renew/req"]
)
def test_active_device_may_publish_its_own_topics(acl: TopicAcl, topic: str) -> None:
    assert acl.allows(DEV_A, PUB, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fg/v1/dev/dev-b/telemetry",  # another device
        "fg/v1/dev/dev-b/renew/req",
        "fg/v1/dev/dev-a/cmd/reboot",  # commands go to the device, not from it
        "fg/v1/dev/dev-a/renew/resp",
        "fg/v1/dev/dev-a/telemetry/extra",  # no sub-levels under telemetry
        "fg/v1/dev/dev-a/quarantine/x",  # not quarantined
        "fg/v1/enroll/dev-a/req",  # enrollment is another listener's business
        "fg/v1/pki/crl",
        "fg/v1/dev/dev-a",
        "fg/v1/dev/dev-a/+",  # wildcards are never publishable
        "fg/v1/dev/dev-a/#",
        "",
        "fg/v1/dev/dev-a/telemetry\x00",
        "$SYS/broker",
    ],
)
def test_active_device_may_not_publish_elsewhere(acl: TopicAcl, topic: str) -> None:
    assert not acl.allows(DEV_A, PUB, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fg/v1/dev/dev-a/renew/resp",
        "fg/v1/dev/dev-a/cmd",
        "fg/v1/dev/dev-a/cmd/reboot",
        "fg/v1/dev/dev-a/cmd/valve/open",
        "fg/v1/pki/ca",
        "fg/v1/pki/crl",
    ],
)
def test_active_device_receives_and_subscribes_its_own_topics(acl: TopicAcl, topic: str) -> None:
    assert acl.allows(DEV_A, RECV, topic)
    assert acl.allows(DEV_A, SUB, topic)


@pytest.mark.parametrize(
    "topic",
    [
        "fg/v1/dev/dev-b/cmd/reboot",
        "fg/v1/dev/dev-b/renew/resp",
        "fg/v1/dev/dev-a/telemetry",
        "fg/v1/enroll/dev-a/resp",
        "fg/v1/dev/dev-a/command",  # "cmd" is a level, not a prefix of a word
        "fg/v1/pki/ca/extra",
    ],
)
def test_active_device_receives_nothing_else(acl: TopicAcl, topic: str) -> None:
    assert not acl.allows(DEV_A, RECV, topic)
    assert not acl.allows(DEV_A, SUB, topic)


@pytest.mark.parametrize(
    "topic_filter",
    ["fg/v1/dev/dev-a/cmd/#", "fg/v1/dev/dev-a/cmd/+", "fg/v1/dev/dev-a/cmd/+/open"],
)
def test_wildcards_inside_the_devices_own_command_tree_are_allowed(
    acl: TopicAcl, topic_filter: str
) -> None:
    assert acl.allows(DEV_A, SUB, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    [
        "fg/v1/dev/+/cmd/#",
        "fg/v1/dev/+/telemetry",
        "fg/v1/dev/dev-a/#",  # would include the device's own outgoing topics
        "fg/v1/dev/dev-a/+",
        "fg/v1/dev/dev-a/+/resp",
        "fg/v1/pki/+",  # ca and crl are granted one by one, not the level
        "fg/v1/#",
        "fg/#",
        "#",
        "+/+/+/+",
        "+/v1/dev/dev-a/cmd/#",
        "fg/v1/dev/dev-a/cmd#",  # malformed: '#' must be a whole level
        "fg/v1/dev/dev-a/cmd/#/x",  # malformed: '#' must be last
        "fg/v1/dev/dev-a/cmd/a+",  # malformed: '+' must be a whole level
        "",
    ],
)
def test_wildcard_escapes_are_refused(acl: TopicAcl, topic_filter: str) -> None:
    assert not acl.allows(DEV_A, SUB, topic_filter)


def test_device_rules_are_per_name(acl: TopicAcl) -> None:
    dev_b = Principal("device", "dev-b", LISTENER_OPERATIONAL)
    assert acl.allows(dev_b, PUB, "fg/v1/dev/dev-b/telemetry")
    assert not acl.allows(dev_b, PUB, "fg/v1/dev/dev-a/telemetry")


# -- quarantine -------------------------------------------------------------------------------


def test_quarantined_device_may_publish_only_under_its_quarantine_topic(
    acl: TopicAcl, states: dict[str, IdentityState]
) -> None:
    states["dev-a"] = QUARANTINED
    assert acl.allows(DEV_A, PUB, "fg/v1/dev/dev-a/quarantine/telemetry")
    assert acl.allows(DEV_A, PUB, "fg/v1/dev/dev-a/quarantine/a/b")
    for topic in (
        "fg/v1/dev/dev-a/telemetry",
        "fg/v1/dev/dev-a/state",
        "fg/v1/dev/dev-a/renew/req",
        "fg/v1/dev/dev-b/quarantine/telemetry",
    ):
        assert not acl.allows(DEV_A, PUB, topic), topic


def test_quarantined_device_receives_only_its_renewal_answer(
    acl: TopicAcl, states: dict[str, IdentityState]
) -> None:
    states["dev-a"] = QUARANTINED
    assert acl.allows(DEV_A, RECV, "fg/v1/dev/dev-a/renew/resp")
    assert acl.allows(DEV_A, SUB, "fg/v1/dev/dev-a/renew/resp")
    for topic in ("fg/v1/dev/dev-a/cmd/reboot", "fg/v1/pki/ca", "fg/v1/pki/crl"):
        assert not acl.allows(DEV_A, RECV, topic), topic
    assert not acl.allows(DEV_A, SUB, "fg/v1/dev/dev-a/cmd/#")


def test_state_changes_apply_to_the_very_next_decision(
    acl: TopicAcl, states: dict[str, IdentityState]
) -> None:
    topic = "fg/v1/dev/dev-a/telemetry"
    assert acl.allows(DEV_A, PUB, topic)
    states["dev-a"] = QUARANTINED
    assert not acl.allows(DEV_A, PUB, topic)
    states["dev-a"] = ACTIVE
    assert acl.allows(DEV_A, PUB, topic)
    states["dev-a"] = REVOKED
    assert not acl.allows(DEV_A, PUB, topic)
    assert not acl.allows(DEV_A, RECV, "fg/v1/dev/dev-a/renew/resp")
    del states["dev-a"]
    assert not acl.allows(DEV_A, RECV, "fg/v1/pki/ca")


# -- enrollees --------------------------------------------------------------------------------


def test_enrollee_may_use_only_its_own_enrollment_topics(acl: TopicAcl) -> None:
    assert acl.allows(ENROLLEE, PUB, "fg/v1/enroll/dev-e/req")
    assert acl.allows(ENROLLEE, SUB, "fg/v1/enroll/dev-e/resp")
    assert acl.allows(ENROLLEE, RECV, "fg/v1/enroll/dev-e/resp")
    for action, topic in [
        (PUB, "fg/v1/enroll/dev-x/req"),
        (PUB, "fg/v1/enroll/dev-e/resp"),
        (PUB, "fg/v1/dev/dev-e/telemetry"),
        (SUB, "fg/v1/enroll/dev-e/req"),
        (SUB, "fg/v1/enroll/+/resp"),
        (SUB, "fg/v1/enroll/dev-e/+"),
        (SUB, "fg/v1/enroll/dev-e/#"),
        (SUB, "fg/v1/pki/ca"),
        (RECV, "fg/v1/enroll/dev-x/resp"),
        (RECV, "fg/v1/pki/ca"),
    ]:
        assert not acl.allows(ENROLLEE, action, topic), (action, topic)


def test_enrollee_of_a_revoked_device_gets_nothing(
    acl: TopicAcl, states: dict[str, IdentityState]
) -> None:
    states["dev-e"] = REVOKED
    assert not acl.allows(ENROLLEE, PUB, "fg/v1/enroll/dev-e/req")


# -- operators, services, internal ------------------------------------------------------------


def test_operator_may_use_its_own_admin_topics_and_the_events_only(acl: TopicAcl) -> None:
    assert acl.allows(OPERATOR, PUB, "fg/v1/admin/alice/req")
    for action in (SUB, RECV):
        assert acl.allows(OPERATOR, action, "fg/v1/admin/alice/resp")
        assert acl.allows(OPERATOR, action, "fg/v1/admin/events")
    assert not acl.allows(OPERATOR, PUB, "fg/v1/admin/bob/req")
    assert not acl.allows(OPERATOR, PUB, "fg/v1/admin/alice/resp")  # replies come from us
    assert not acl.allows(OPERATOR, PUB, "fg/v1/admin/events")
    assert not acl.allows(OPERATOR, PUB, "fg/v1/dev/dev-a/cmd/reboot")
    assert not acl.allows(OPERATOR, SUB, "fg/v1/#")
    assert not acl.allows(OPERATOR, RECV, "fg/v1/dev/dev-a/telemetry")


@pytest.mark.parametrize(
    ("action", "topic"),
    [
        (RECV, "fg/v1/admin/bob/resp"),  # another operator's replies
        (SUB, "fg/v1/admin/bob/resp"),
        (SUB, "fg/v1/admin/+/resp"),  # a wildcard reaching other operators' replies
        (SUB, "fg/v1/admin/#"),
        (SUB, "fg/v1/admin/alice/#"),  # would cover alice/req, which only goes to the gateway
        (RECV, "fg/v1/admin/bob/req"),  # another operator's requests
        (RECV, "fg/v1/admin/alice/req"),
        (RECV, "fg/v1/admin/alice/resp/x"),
    ],
)
def test_an_operator_cannot_read_another_operators_conversation(
    acl: TopicAcl, action: Action, topic: str
) -> None:
    assert not acl.allows(OPERATOR, action, topic)


@pytest.mark.parametrize("state", [QUARANTINED, PENDING, REVOKED])
def test_an_operator_that_is_not_active_gets_no_topic(
    acl: TopicAcl, states: dict[str, IdentityState], state: IdentityState
) -> None:
    states["alice"] = state
    assert not acl.allows(OPERATOR, PUB, "fg/v1/admin/alice/req")
    assert not acl.allows(OPERATOR, SUB, "fg/v1/admin/events")
    assert not acl.allows(OPERATOR, RECV, "fg/v1/admin/alice/resp")


def test_the_gateway_service_may_do_everything_other_services_nothing(acl: TopicAcl) -> None:
    for action in (PUB, RECV):
        assert acl.allows(GATEWAY, action, "fg/v1/dev/dev-a/cmd/reboot")
        assert not acl.allows(OTHER_SERVICE, action, "fg/v1/dev/dev-a/cmd/reboot")
    assert acl.allows(GATEWAY, SUB, "#")
    assert not acl.allows(OTHER_SERVICE, SUB, "#")


def test_internal_principal_may_do_everything_but_malformed_filters(acl: TopicAcl) -> None:
    assert acl.allows(INTERNAL, SUB, "#")
    assert acl.allows(INTERNAL, SUB, "+/+/+/+")
    assert acl.allows(INTERNAL, PUB, "fg/v1/dev/dev-a/cmd/x")
    assert acl.allows(INTERNAL, RECV, "anything/at/all")
    assert not acl.allows(INTERNAL, SUB, "a/#/b")
    assert not acl.allows(INTERNAL, PUB, "a/+")


def test_a_principal_on_the_wrong_listener_gets_nothing(acl: TopicAcl) -> None:
    misplaced = Principal("device", "dev-a", LISTENER_ENROLLMENT)
    assert not acl.allows(misplaced, PUB, "fg/v1/dev/dev-a/telemetry")
    assert acl.admits(misplaced) == Refusal.WRONG_LISTENER


# -- admission --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (ACTIVE, None),
        (QUARANTINED, None),  # stays connected, diverted
        (PENDING, "device_pending"),
        (REVOKED, "device_revoked"),
        (None, "not_enrolled"),
    ],
)
def test_device_admission_follows_its_state(
    acl: TopicAcl,
    states: dict[str, IdentityState],
    state: IdentityState | None,
    expected: str | None,
) -> None:
    if state is None:
        del states["dev-a"]
    else:
        states["dev-a"] = state
    assert acl.admits(DEV_A, client_id="dev-a") == expected


def test_a_device_cannot_take_another_client_id(acl: TopicAcl) -> None:
    assert acl.admits(DEV_A, client_id="dev-b") == Refusal.CLIENT_ID_MISMATCH
    assert acl.admits(DEV_A, client_id="dev-a") is None
    assert acl.admits(ENROLLEE, client_id="dev-a") == "client_id_mismatch"


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (None, None),
        (PENDING, None),
        (ACTIVE, None),
        (QUARANTINED, None),
        (REVOKED, "device_revoked"),
    ],
)
def test_enrollee_admission_refuses_only_revoked_devices(
    acl: TopicAcl,
    states: dict[str, IdentityState],
    state: IdentityState | None,
    expected: str | None,
) -> None:
    if state is not None:
        states["dev-e"] = state
    assert acl.admits(ENROLLEE, client_id="dev-e") == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [(None, "not_enrolled"), (PENDING, "identity_pending"), (REVOKED, "identity_revoked")],
)
def test_operator_admission_follows_its_state(
    acl: TopicAcl, states: dict[str, IdentityState], state: IdentityState | None, expected: str
) -> None:
    if state is None:
        del states["alice"]
    else:
        states["alice"] = state
    assert acl.admits(OPERATOR) == expected


def test_internal_principal_is_admitted_with_any_client_id(acl: TopicAcl) -> None:
    assert acl.admits(INTERNAL, client_id="whatever") is None


def test_refusal_codes_are_stable_snake_case() -> None:
    assert {r.value for r in Refusal} == {
        "not_enrolled",
        "device_pending",
        "device_revoked",
        "identity_pending",
        "identity_revoked",
        "client_id_mismatch",
        "wrong_listener",
    }


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"kind": "robot"}, ValueError),
        ({"name": "a/b"}, ValueError),
        ({"name": "+"}, ValueError),
        ({"name": ""}, ValueError),
        ({"name": 7}, TypeError),
        ({"listener": ""}, ValueError),
        ({"cert_fingerprint": "xyz"}, ValueError),
        ({"cert_fingerprint": "AB" * 32}, ValueError),
        ({"serial": 0}, ValueError),
        ({"serial": True}, ValueError),
    ],
)
def test_principal_rejects_bad_values(kwargs: dict[str, object], error: type[Exception]) -> None:
    values: dict[str, object] = {"kind": "device", "name": "dev-a", "listener": "operational"}
    values.update(kwargs)
    with pytest.raises(error):
        Principal(**values)  # type: ignore[arg-type]


def test_acl_rejects_wrong_types(acl: TopicAcl) -> None:
    with pytest.raises(TypeError):
        TopicAcl("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        acl.allows("dev-a", PUB, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        acl.admits("dev-a")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        acl.allows(DEV_A, "delete", "fg/v1/dev/dev-a/telemetry")  # type: ignore[arg-type]
    assert not acl.allows(DEV_A, PUB, None)  # type: ignore[arg-type]


def test_actions_accept_their_string_values(acl: TopicAcl) -> None:
    assert acl.allows(DEV_A, "publish", "fg/v1/dev/dev-a/telemetry")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("topic_filter", "valid"),
    [
        ("a/b", True),
        ("#", True),
        ("+", True),
        ("a/+/b/#", True),
        ("/", True),
        ("a//b", True),
        ("", False),
        ("a#", False),
        ("#/a", False),
        ("a/b+", False),
        ("a\x00b", False),
        ("a" * 70_000, False),
    ],
)
def test_filter_syntax(topic_filter: str, valid: bool) -> None:
    assert filter_is_valid(topic_filter) is valid
