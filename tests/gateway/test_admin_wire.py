"""The admin API's wire format: topics, the request envelope, replies and events."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from gateway.admin.roles import Role, may, parse_role, required_role
from gateway.admin.wire import (
    EVENTS_TOPIC,
    REQUEST_FILTER,
    AdminReason,
    AdminRequest,
    AdminRequestError,
    encode_event,
    encode_request,
    error_reply,
    ok_reply,
    operator_of,
    parse_request,
    request_topic,
    response_topic,
)
from gateway.protocol.topics import topic_matches


def test_topics_are_spelled_once() -> None:
    assert request_topic("alice") == "fg/v1/admin/alice/req"
    assert response_topic("alice") == "fg/v1/admin/alice/resp"
    assert EVENTS_TOPIC == "fg/v1/admin/events"
    assert topic_matches(REQUEST_FILTER, request_topic("alice"))
    assert not topic_matches(REQUEST_FILTER, response_topic("alice"))
    assert not topic_matches(REQUEST_FILTER, EVENTS_TOPIC)


@pytest.mark.parametrize("name", ["a/b", "+", "#", "", "x" * 65, ".hidden"])
def test_a_topic_for_a_name_that_is_no_identity_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        request_topic(name)
    with pytest.raises(ValueError):
        response_topic(name)


@pytest.mark.parametrize(
    ("topic", "operator"),
    [
        ("fg/v1/admin/alice/req", "alice"),
        ("fg/v1/admin/alice/resp", None),
        ("fg/v1/admin/events", None),
        ("fg/v1/admin/a+b/req", None),
        ("fg/v1/admin//req", None),
        ("fg/v2/admin/alice/req", None),
        ("fg/v1/dev/alice/req", None),
        ("fg/v1/admin/alice/req/more", None),
        (42, None),
    ],
)
def test_operator_of_reads_only_request_topics(topic: object, operator: str | None) -> None:
    assert operator_of(topic) == operator


def test_a_request_round_trips() -> None:
    payload = encode_request("r-1", "quarantine", {"ids": ["dev-1"], "reason": "odd"})
    assert json.loads(payload) == {
        "v": 1,
        "id": "r-1",
        "op": "quarantine",
        "args": {"ids": ["dev-1"], "reason": "odd"},
    }
    request = parse_request(payload)
    assert request == AdminRequest("r-1", "quarantine", {"ids": ["dev-1"], "reason": "odd"})


def test_args_may_be_left_out() -> None:
    assert parse_request(b'{"v":1,"id":"r","op":"whoami"}').args == {}


def test_unknown_envelope_fields_are_ignored_for_later_revisions() -> None:
    assert parse_request(b'{"v":1,"id":"r","op":"whoami","trace":"x"}').op == "whoami"


@pytest.mark.parametrize(
    ("request_id", "op", "args", "error"),
    [
        ("", "whoami", {}, ValueError),
        ("a b", "whoami", {}, ValueError),
        ("r", "", {}, ValueError),
        ("r", "whoami", [], TypeError),
    ],
)
def test_a_request_value_validates_itself(
    request_id: str, op: str, args: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        AdminRequest(request_id, op, args)  # type: ignore[arg-type]


def test_an_error_carries_its_reason_and_the_id_when_readable() -> None:
    with pytest.raises(AdminRequestError) as caught:
        parse_request(b'{"v":1,"id":"r-7","op":5}')
    assert caught.value.reason is AdminReason.INVALID_FIELD
    assert caught.value.request_id == "r-7"
    with pytest.raises(AdminRequestError) as caught:
        parse_request(b"nope")
    assert caught.value.reason is AdminReason.MALFORMED and caught.value.request_id is None


def test_replies_have_the_documented_shape() -> None:
    ok = {"v": 1, "id": "r", "ok": True, "result": {"x": 1}}
    assert json.loads(ok_reply("r", {"x": 1})) == ok
    assert json.loads(error_reply(None, AdminReason.FORBIDDEN, "no")) == {
        "v": 1,
        "id": None,
        "ok": False,
        "error": {"reason": "forbidden", "detail": "no"},
    }


def test_an_event_has_the_documented_shape() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json.loads(encode_event("connected", "dev-1", at, {"remote": "1.2.3.4:5"})) == {
        "v": 1,
        "kind": "connected",
        "subject": "dev-1",
        "at": "2026-01-02T03:04:05+00:00",
        "data": {"remote": "1.2.3.4:5"},
    }


def test_reason_codes_are_stable_snake_case() -> None:
    assert {r.value for r in AdminReason} == {
        "malformed",
        "payload_too_large",
        "unsupported_version",
        "invalid_field",
        "unknown_op",
        "forbidden",
        "not_found",
        "wrong_kind",
        "self_action",
        "not_pending",
        "transition_forbidden",
        "busy",
        "unavailable",
        "not_enforced_yet",
        "internal",
    }


def test_roles_are_parsed_leniently_and_checked_strictly() -> None:
    assert parse_role("admin") is Role.ADMIN
    assert parse_role("root") is None and parse_role(None) is None and parse_role(1) is None
    assert required_role("revoke") is Role.ADMIN
    with pytest.raises(KeyError):
        required_role("format_disk")
    assert not may(Role.ADMIN, "format_disk")
    assert not may(None, "whoami")
