"""The admin API's wire format: topics, the request envelope, replies and events.

Both ends use this module: the gateway parses requests and encodes replies with it, the client
library encodes requests and reads replies. Untrusted bytes meet ``parse_request`` first, so it
refuses cheaply and in a fixed order: size cap, UTF-8, JSON (bounded numbers and nesting, no
duplicate keys), then the envelope (``v``, ``id``, ``op``, ``args``).

    fg/v1/admin/<operator>/req   operator -> gateway  {"v":1,"id":..,"op":..,"args":{..}}
    fg/v1/admin/<operator>/resp  gateway -> operator  {"v":1,"id":..,"ok":true,"result":{..}}
                                                       {"v":1,"id":..,"ok":false,"error":{..}}
    fg/v1/admin/events           gateway -> operators {"v":1,"kind":..,"subject":..,"at":..,..}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.protocol import strictjson
from gateway.protocol.messages import valid_request_id
from gateway.protocol.topics import PREFIX
from pki.profile import is_identity_name

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
# A request is an envelope holding an args object holding at most a list of ids: three levels,
# one more of slack. Anything deeper is an attack or a bug.
MAX_DEPTH = 4

ADMIN_PREFIX = f"{PREFIX}/admin"
REQUEST_FILTER = f"{ADMIN_PREFIX}/+/req"
EVENTS_TOPIC = f"{ADMIN_PREFIX}/events"


class AdminReason(StrEnum):
    """Stable reason codes of the admin API's error replies (docs/admin-api.md lists them)."""

    # the envelope
    MALFORMED = "malformed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    INVALID_FIELD = "invalid_field"
    UNKNOWN_OP = "unknown_op"
    # who asks
    FORBIDDEN = "forbidden"
    # what is asked about
    NOT_FOUND = "not_found"
    WRONG_KIND = "wrong_kind"
    SELF_ACTION = "self_action"
    # lifecycle refusals, as gateway.operations words them
    NOT_PENDING = "not_pending"
    TRANSITION_FORBIDDEN = "transition_forbidden"
    # the gateway itself
    BUSY = "busy"
    UNAVAILABLE = "unavailable"
    # Several gateways: the change is recorded, but no leader confirmed it in force in time
    # (the next leader enforces it). The same code as gateway.cluster's ClusterError.
    NOT_ENFORCED = "not_enforced_yet"
    INTERNAL = "internal"


class AdminRequestError(Exception):
    """A request that cannot be served, with the reason code its error reply carries: an
    ``AdminReason``, or the ``gateway.operations.OperationRefusal`` code of a lifecycle refusal.

    ``request_id`` is the request's id when it could be read (the reply echoes it), else None.
    """

    def __init__(
        self, reason: AdminReason | str, detail: str, request_id: str | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.request_id = request_id


def request_topic(operator: str) -> str:
    return f"{ADMIN_PREFIX}/{_checked(operator)}/req"


def response_topic(operator: str) -> str:
    return f"{ADMIN_PREFIX}/{_checked(operator)}/resp"


def operator_of(topic: object) -> str | None:
    """The operator a request topic belongs to; None for any other topic.

    The broker lets an operator publish only to its own request topic, so the topic is proof
    of who asks."""
    if not isinstance(topic, str):
        return None
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != ADMIN_PREFIX or parts[4] != "req":
        return None
    return parts[3] if is_identity_name(parts[3]) else None


def _checked(operator: str) -> str:
    if not is_identity_name(operator):
        raise ValueError(f"{operator!r} is not a valid operator name")
    return operator


@dataclass(frozen=True)
class AdminRequest:
    """One parsed request. ``args`` holds JSON values; each op checks its own."""

    id: str
    op: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not valid_request_id(self.id):
            raise ValueError("id must be 1-64 characters of [A-Za-z0-9_-]")
        if not isinstance(self.op, str) or not self.op:
            raise ValueError("op must be a non-empty string")
        if not isinstance(self.args, Mapping):
            raise TypeError(f"args must be a mapping, not {type(self.args).__name__}")


_REASON_FOR = {
    strictjson.Rejection.TOO_LARGE: AdminReason.PAYLOAD_TOO_LARGE,
    strictjson.Rejection.MALFORMED: AdminReason.MALFORMED,
    strictjson.Rejection.INVALID: AdminReason.INVALID_FIELD,
}


def load_json_object(payload: bytes, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Bytes to one JSON object, or AdminRequestError (malformed, payload_too_large,
    invalid_field)."""
    try:
        return strictjson.load_object(payload, max_bytes=limit, what="a request")
    except strictjson.JsonRejected as exc:
        raise AdminRequestError(_REASON_FOR[exc.kind], exc.detail) from None


def parse_request(payload: bytes) -> AdminRequest:
    """Parse one request; AdminRequestError names what is wrong (and the id, when readable)."""
    obj = load_json_object(payload)
    raw_id = obj.get("id")
    request_id = raw_id if valid_request_id(raw_id) else None
    if strictjson.depth(obj) > MAX_DEPTH:
        raise AdminRequestError(AdminReason.INVALID_FIELD, "nesting too deep", request_id)
    version = obj.get("v")
    if "v" not in obj or not isinstance(version, int) or isinstance(version, bool):
        raise AdminRequestError(AdminReason.INVALID_FIELD, "'v' must be an integer", request_id)
    if version != VERSION:
        raise AdminRequestError(
            AdminReason.UNSUPPORTED_VERSION,
            f"version {version}; this gateway speaks {VERSION}",
            request_id,
        )
    if request_id is None:
        raise AdminRequestError(
            AdminReason.INVALID_FIELD, "'id' must be 1-64 characters of [A-Za-z0-9_-]"
        )
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise AdminRequestError(AdminReason.INVALID_FIELD, "'op' must be a string", request_id)
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise AdminRequestError(
            AdminReason.INVALID_FIELD, "'args' must be an object", request_id
        )
    return AdminRequest(request_id, op, args)


def encode_request(request_id: str, op: str, args: Mapping[str, Any] | None = None) -> bytes:
    request = AdminRequest(request_id, op, dict(args or {}))
    return _dump({"v": VERSION, "id": request.id, "op": request.op, "args": dict(request.args)})


def ok_reply(request_id: str, result: Mapping[str, Any]) -> bytes:
    return _dump({"v": VERSION, "id": request_id, "ok": True, "result": dict(result)})


def error_reply(request_id: str | None, reason: AdminReason | str, detail: str) -> bytes:
    error = {"reason": str(reason), "detail": detail}
    return _dump({"v": VERSION, "id": request_id, "ok": False, "error": error})


def encode_event(
    kind: str, subject: str | None, at: datetime, data: Mapping[str, str]
) -> bytes:
    return _dump(
        {"v": VERSION, "kind": kind, "subject": subject, "at": at.isoformat(), "data": dict(data)}
    )


def _dump(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
