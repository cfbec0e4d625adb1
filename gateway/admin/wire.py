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
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.protocol.messages import valid_request_id
from gateway.protocol.topics import PREFIX
from pki.profile import is_identity_name

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
# A request is an envelope holding an args object holding at most a list of ids: three levels,
# one more of slack. Anything deeper is an attack or a bug.
MAX_DEPTH = 4
MAX_INTEGER_DIGITS = 15

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


class _Absurd(Exception):
    """A JSON value no request can hold (raised from the parser hooks)."""


class _DuplicateKey(Exception):
    pass


def _parse_int(text: str) -> int:
    # The cap stops 10**10000-style integers before Python spends quadratic time on them.
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _Absurd(f"integer with {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > 32:
        raise _Absurd("number too long")
    value = float(text)
    if not math.isfinite(value):
        raise _Absurd(f"number {text[:20]} out of range")
    return value


def _parse_constant(name: str) -> Any:
    raise _Absurd(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers could pick different values for a repeated key; refuse the ambiguity.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _depth(value: object) -> int:
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


def load_json_object(payload: bytes, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Bytes to one JSON object, or AdminRequestError (malformed, payload_too_large,
    invalid_field)."""
    if not isinstance(payload, bytes | bytearray):
        raise AdminRequestError(AdminReason.MALFORMED, "payload must be bytes")
    if len(payload) > limit:
        raise AdminRequestError(
            AdminReason.PAYLOAD_TOO_LARGE, f"{len(payload)} bytes, at most {limit}"
        )
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AdminRequestError(AdminReason.MALFORMED, f"not UTF-8: {exc.reason}") from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_unique_keys,
        )
    except _Absurd as exc:
        raise AdminRequestError(AdminReason.INVALID_FIELD, str(exc)) from None
    except RecursionError:
        raise AdminRequestError(AdminReason.INVALID_FIELD, "nesting too deep") from None
    except _DuplicateKey as exc:
        raise AdminRequestError(
            AdminReason.MALFORMED, f"duplicate key {str(exc)[:64]!r}"
        ) from None
    except ValueError as exc:  # json.JSONDecodeError and int-conversion limits
        raise AdminRequestError(AdminReason.MALFORMED, f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise AdminRequestError(AdminReason.MALFORMED, "a request is a JSON object")
    return value


def parse_request(payload: bytes) -> AdminRequest:
    """Parse one request; AdminRequestError names what is wrong (and the id, when readable)."""
    obj = load_json_object(payload)
    raw_id = obj.get("id")
    request_id = raw_id if valid_request_id(raw_id) else None
    if _depth(obj) > MAX_DEPTH:
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
