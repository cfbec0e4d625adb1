"""JSON from untrusted peers, parsed once and strictly: the device protocol and the admin API
share it.

Refused, each with a kind the caller maps to its own reason code: more bytes than allowed,
bytes that are not UTF-8 JSON, a repeated key (two parsers could pick different values),
absurd numbers (10**10000-style integers cost quadratic time; NaN and Infinity are no JSON),
nesting deep enough to exhaust the parser, and anything but an object at the top.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Any

MAX_INTEGER_DIGITS = 15


class Rejection(StrEnum):
    TOO_LARGE = "too_large"  # over the byte limit
    MALFORMED = "malformed"  # not UTF-8, not JSON, a repeated key, not an object
    INVALID = "invalid"  # JSON, but a value no message can hold


class JsonRejected(ValueError):
    def __init__(self, kind: Rejection, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class _Absurd(Exception):
    """A JSON value no message can hold (raised from the parser hooks)."""


class _DuplicateKey(Exception):
    pass


def _parse_int(text: str) -> int:
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
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_object(payload: bytes, *, max_bytes: int, what: str = "a message") -> dict[str, Any]:
    """One JSON object from ``payload``, or JsonRejected saying why not."""
    if not isinstance(payload, bytes | bytearray):
        raise JsonRejected(Rejection.MALFORMED, "payload must be bytes")
    if len(payload) > max_bytes:
        raise JsonRejected(Rejection.TOO_LARGE, f"{len(payload)} bytes, at most {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRejected(Rejection.MALFORMED, f"not UTF-8: {exc.reason}") from None
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_unique_keys,
        )
    except _Absurd as exc:
        raise JsonRejected(Rejection.INVALID, str(exc)) from None
    except RecursionError:
        raise JsonRejected(Rejection.INVALID, "nesting too deep") from None
    except _DuplicateKey as exc:
        raise JsonRejected(Rejection.MALFORMED, f"duplicate key {str(exc)[:64]!r}") from None
    except ValueError as exc:  # json.JSONDecodeError and int-conversion limits
        raise JsonRejected(Rejection.MALFORMED, f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise JsonRejected(Rejection.MALFORMED, f"{what} is a JSON object")
    return value


def depth(value: object) -> int:
    """How deeply objects and arrays nest in ``value`` (a scalar is 0), without recursion."""
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
