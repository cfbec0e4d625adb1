"""Typed access to the ``args`` of one admin request.

Each op names the arguments it accepts; an unknown one, a wrong JSON type or a value out of
range is an ``invalid_field`` error naming the argument, before anything is read or changed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

from gateway.admin.wire import AdminReason, AdminRequest, AdminRequestError
from pki.profile import is_identity_name

MAX_BULK = 1000  # ids in one bulk request (a 64 KiB request holds about 3000 short ones)
MAX_TEXT = 200


class RequestArgs:
    """Typed access to a request's ``args``; every problem is an ``invalid_field`` error."""

    def __init__(self, request: AdminRequest, allowed: frozenset[str]) -> None:
        self._args = request.args
        self._id = request.id
        unknown = sorted(set(self._args) - allowed)
        if unknown:
            self.fail(f"unknown argument {unknown[0][:64]!r}")

    @property
    def request_id(self) -> str:
        return self._id

    def fail(self, detail: str) -> NoReturn:
        raise AdminRequestError(AdminReason.INVALID_FIELD, detail, self._id)

    def text(self, key: str, *, required: bool = False, limit: int = MAX_TEXT) -> str | None:
        if key not in self._args:
            if required:
                self.fail(f"missing argument {key!r}")
            return None
        value = self._args[key]
        if not isinstance(value, str):
            self.fail(f"{key!r} must be a string")
        if required and not value.strip():
            self.fail(f"{key!r} must not be empty")
        if len(value) > limit:
            self.fail(f"{key!r} must be at most {limit} characters")
        if "\x00" in value:
            self.fail(f"{key!r} must not contain NUL")
        return value

    def name(self, key: str) -> str:
        value = self.text(key, required=True)
        if not is_identity_name(value):
            self.fail(f"{key!r} is not an identity name")
        assert value is not None
        return value

    def choice(self, key: str, kind: Callable[[str], Any], *, required: bool = False) -> Any:
        value = self.text(key, required=required)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError:
            self.fail(f"{key!r}: {value[:64]!r} is not one of the allowed values")

    def integer(self, key: str, *, default: int, low: int, high: int) -> int:
        if key not in self._args:
            return default
        value = self._args[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(f"{key!r} must be an integer")
        if not low <= value <= high:
            self.fail(f"{key!r} must lie between {low} and {high}")
        return int(value)

    def time(self, key: str) -> datetime | None:
        value = self.text(key, limit=64)
        if value is None:
            return None
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{key!r} is not an ISO-8601 time")
        if when.tzinfo is None or when.utcoffset() is None:
            self.fail(f"{key!r} must carry a time zone offset")
        return when

    def ids(self, key: str = "ids") -> list[str]:
        if key not in self._args:
            self.fail(f"missing argument {key!r}")
        value = self._args[key]
        if not isinstance(value, list) or not value:
            self.fail(f"{key!r} must be a non-empty list of identity names")
        if len(value) > MAX_BULK:
            self.fail(f"{key!r} holds {len(value)} ids, at most {MAX_BULK}")
        for item in value:
            if not is_identity_name(item):
                shown = item[:64] if isinstance(item, str) else type(item).__name__
                self.fail(f"{key!r}: {shown!r} is not an identity name")
        return list(dict.fromkeys(value))  # once each, in the order given
