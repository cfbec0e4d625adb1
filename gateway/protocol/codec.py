"""JSON wire codec for protocol v1: bytes in, one frozen message out (or ``ProtocolError``).

Untrusted bytes meet this module first, so it refuses cheaply and in a fixed order: size cap,
UTF-8, JSON (with limits on numbers, nesting and duplicate keys), then the envelope (``v``,
``type``, ``id``), then the fields. Unknown fields are ignored so a later minor revision can add
some without breaking older gateways or devices.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.protocol import strictjson
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import (
    MAX_PAYLOAD,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    VERSION,
    Challenge,
    Enroll,
    Error,
    Firmware,
    Hello,
    IssuedCertificate,
    Message,
    Pending,
    Renew,
    Request,
    Response,
    TokenEnroll,
    valid_request_id,
)
from gateway.protocol.reasons import ReasonCode

# Our messages nest at most three deep (object -> firmware object / chain array); one level of
# slack for unknown fields. Anything deeper is an attack or a bug.
MAX_DEPTH = 4
_REASON_FOR = {
    strictjson.Rejection.TOO_LARGE: ReasonCode.PAYLOAD_TOO_LARGE,
    strictjson.Rejection.MALFORMED: ReasonCode.MALFORMED,
    strictjson.Rejection.INVALID: ReasonCode.INVALID_FIELD,
}

_M = TypeVar("_M", bound=Message)
MESSAGE_CLASSES = (*REQUEST_TYPES.values(), *RESPONSE_TYPES.values())


class _Field(Exception):
    """A field is missing or has the wrong JSON type or encoding."""


def _load_object(payload: bytes) -> dict[str, Any]:
    try:
        return strictjson.load_object(payload, max_bytes=MAX_PAYLOAD)
    except strictjson.JsonRejected as exc:
        raise ProtocolError(_REASON_FOR[exc.kind], exc.detail) from None


def _envelope(obj: dict[str, Any], known: dict[str, type[_M]]) -> tuple[type[_M], str | None]:
    """Check ``v``, ``type`` and ``id``; return the message class and the (valid) id."""
    raw_id = obj.get("id")
    request_id = raw_id if valid_request_id(raw_id) else None
    if strictjson.depth(obj) > MAX_DEPTH:
        raise ProtocolError(ReasonCode.INVALID_FIELD, "nesting too deep", request_id)
    if "v" not in obj:
        raise ProtocolError(ReasonCode.INVALID_FIELD, "missing field 'v'", request_id)
    version = obj["v"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ProtocolError(ReasonCode.INVALID_FIELD, "'v' must be an integer", request_id)
    if version != VERSION:
        raise ProtocolError(
            ReasonCode.UNSUPPORTED_VERSION, f"version {version}; this gateway speaks 1", request_id
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ReasonCode.INVALID_FIELD, "'type' must be a string", request_id)
    cls = known.get(kind)
    if cls is None:
        raise ProtocolError(ReasonCode.UNKNOWN_TYPE, f"unknown type {kind[:64]!r}", request_id)
    if "id" not in obj:
        raise ProtocolError(ReasonCode.INVALID_FIELD, "missing field 'id'")
    if request_id is None and not (cls is Error and raw_id is None):
        raise ProtocolError(
            ReasonCode.INVALID_FIELD, "'id' must be 1-64 characters of [A-Za-z0-9_-]"
        )
    return cls, request_id


# Field readers: JSON type and encoding only; value rules live in the message classes.


def _get(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise _Field(f"missing field {key!r}")
    return obj[key]


def _str(obj: dict[str, Any], key: str) -> str:
    value = _get(obj, key)
    if not isinstance(value, str):
        raise _Field(f"{key!r} must be a string")
    return value


def _int(obj: dict[str, Any], key: str) -> int:
    value = _get(obj, key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Field(f"{key!r} must be an integer")
    return value


def _optional_int(obj: dict[str, Any], key: str) -> int | None:
    # Absent means "not asked"; an explicit null is as wrong as any other non-integer.
    if key not in obj:
        return None
    return _int(obj, key)


def _unbase64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise _Field(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _Field(f"{what} is not standard base64 with padding") from None
    # One spelling per value: refuse non-zero padding bits and the like.
    if base64.b64encode(data).decode("ascii") != text:
        raise _Field(f"{what} is not canonical base64")
    return data


def _bytes(obj: dict[str, Any], key: str) -> bytes:
    return _unbase64(_get(obj, key), repr(key))


def _chain(obj: dict[str, Any], key: str) -> tuple[bytes, ...]:
    value = _get(obj, key)
    if not isinstance(value, list):
        raise _Field(f"{key!r} must be a list of base64 strings")
    return tuple(_unbase64(item, f"{key}[{index}]") for index, item in enumerate(value))


def _firmware(obj: dict[str, Any], key: str, *, required: bool) -> Firmware | None:
    if key not in obj and not required:
        return None
    value = _get(obj, key)
    if not isinstance(value, dict):
        raise _Field(f"{key!r} must be an object")
    return Firmware(version=_str(value, "version"), digest=_str(value, "digest"))


def _required_firmware(obj: dict[str, Any]) -> Firmware:
    firmware = _firmware(obj, "firmware", required=True)
    assert firmware is not None  # required=True never returns None
    return firmware


_READERS: dict[type, Callable[[dict[str, Any], Any], Message]] = {
    Hello: lambda o, i: Hello(id=i, chain=_chain(o, "chain")),
    Enroll: lambda o, i: Enroll(
        id=i,
        nonce=_bytes(o, "nonce"),
        device_nonce=_bytes(o, "device_nonce"),
        csr=_bytes(o, "csr"),
        chain=_chain(o, "chain"),
        firmware=_required_firmware(o),
        time=_int(o, "time"),
        evidence=_bytes(o, "evidence"),
        lifetime=_optional_int(o, "lifetime"),
    ),
    TokenEnroll: lambda o, i: TokenEnroll(
        id=i,
        token=_str(o, "token"),
        csr=_bytes(o, "csr"),
        time=_int(o, "time"),
        firmware=_firmware(o, "firmware", required=False),
        lifetime=_optional_int(o, "lifetime"),
    ),
    Renew: lambda o, i: Renew(
        id=i,
        csr=_bytes(o, "csr"),
        time=_int(o, "time"),
        signature=_bytes(o, "signature"),
        firmware=_firmware(o, "firmware", required=False),
        lifetime=_optional_int(o, "lifetime"),
    ),
    Challenge: lambda o, i: Challenge(
        id=i, nonce=_bytes(o, "nonce"), expires_at=_int(o, "expires_at")
    ),
    IssuedCertificate: lambda o, i: IssuedCertificate(
        id=i,
        certificate=_bytes(o, "certificate"),
        chain=_chain(o, "chain"),
        not_after=_int(o, "not_after"),
        renew_after=_int(o, "renew_after"),
    ),
    Pending: lambda o, i: Pending(id=i, retry_after=_int(o, "retry_after")),
    Error: lambda o, i: Error(id=i, reason=_str(o, "reason"), detail=_str(o, "detail")),
}


def _decode(payload: bytes, known: dict[str, type[_M]]) -> _M:
    obj = _load_object(payload)
    cls, request_id = _envelope(obj, known)
    try:
        message = _READERS[cls](obj, request_id)
    except _Field as exc:
        raise ProtocolError(ReasonCode.INVALID_FIELD, str(exc), request_id) from None
    except (TypeError, ValueError) as exc:
        raise ProtocolError(ReasonCode.INVALID_FIELD, str(exc), request_id) from None
    assert isinstance(message, cls)
    return message


def decode_request(payload: bytes) -> Request:
    """Parse a device's request; ``ProtocolError`` for anything that is not a valid one."""
    return _decode(payload, REQUEST_TYPES)


def decode_response(payload: bytes) -> Response:
    """Parse a gateway's response (the device side); ``ProtocolError`` as for requests."""
    return _decode(payload, RESPONSE_TYPES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _firmware_json(firmware: Firmware) -> dict[str, str]:
    return {"version": firmware.version, "digest": firmware.digest}


def _with_lifetime(fields: dict[str, Any], lifetime: int | None) -> dict[str, Any]:
    # Only when asked: a request without a wish keeps the bytes it had before the field existed.
    if lifetime is not None:
        fields["lifetime"] = lifetime
    return fields


def _fields(message: Message) -> dict[str, Any]:
    match message:
        case Hello(chain=chain):
            return {"chain": [_b64(der) for der in chain]}
        case Enroll():
            fields: dict[str, Any] = {
                "nonce": _b64(message.nonce),
                "device_nonce": _b64(message.device_nonce),
                "csr": _b64(message.csr),
                "chain": [_b64(der) for der in message.chain],
                "firmware": _firmware_json(message.firmware),
                "time": message.time,
                "evidence": _b64(message.evidence),
            }
            return _with_lifetime(fields, message.lifetime)
        case TokenEnroll():
            fields = {
                "token": message.token,
                "csr": _b64(message.csr),
                "time": message.time,
            }
            if message.firmware is not None:
                fields["firmware"] = _firmware_json(message.firmware)
            return _with_lifetime(fields, message.lifetime)
        case Renew():
            fields = {
                "csr": _b64(message.csr),
                "time": message.time,
                "signature": _b64(message.signature),
            }
            if message.firmware is not None:
                fields["firmware"] = _firmware_json(message.firmware)
            return _with_lifetime(fields, message.lifetime)
        case Challenge():
            return {"nonce": _b64(message.nonce), "expires_at": message.expires_at}
        case IssuedCertificate():
            return {
                "certificate": _b64(message.certificate),
                "chain": [_b64(der) for der in message.chain],
                "not_after": message.not_after,
                "renew_after": message.renew_after,
            }
        case Pending():
            return {"retry_after": message.retry_after}
        case Error():
            return {"reason": str(message.reason), "detail": message.detail}
    raise TypeError(f"not a protocol message: {type(message).__name__}")


def encode(message: Message) -> bytes:
    """Compact JSON, fields in a fixed order: the same message always gives the same bytes."""
    if not isinstance(message, MESSAGE_CLASSES):
        raise TypeError(f"not a protocol message: {type(message).__name__}")
    document: dict[str, Any] = {"v": VERSION, "type": message.TYPE, "id": message.id}
    document.update(_fields(message))
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")
