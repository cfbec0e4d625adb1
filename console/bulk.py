"""Bulk actions on a selection: split into requests the gateway accepts, one result per device.

A request is capped at 64 KiB, so "select all, quarantine" over a large fleet goes out in
chunks, one after the other. Every id gets exactly one result: the gateway's own for it, or,
when a whole chunk failed (timeout, connection lost, ``forbidden`` for the request), that
chunk's failure repeated for each of its ids. One failure never hides the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from console.bridge import RequestFailure

ACTIONS = ("approve", "quarantine", "release", "revoke")
# The gateway takes at most 1000 ids per request (and 64 KiB); it enforces each change on the
# broker before it answers, and a revoke re-signs the CRL, so chunks stay small enough to be
# answered well within CHUNK_TIMEOUT.
CHUNK_SIZE = 200
CHUNK_TIMEOUT = 120.0
MISSING_RESULT = "missing_result"


@dataclass(frozen=True)
class DeviceResult:
    id: str
    ok: bool
    state: str = ""
    reason: str = ""
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("id must be a non-empty str")
        if self.ok and self.reason:
            raise ValueError("a success carries no reason")
        if not self.ok and not self.reason:
            raise ValueError("a failure needs a reason")


def results_from_reply(ids: Sequence[str], result: Mapping[str, Any]) -> list[DeviceResult]:
    """Per-device results of one reply, in the order of ``ids``; an id the reply left out is a
    failure (``missing_result``), never silently a success."""
    by_id: dict[str, DeviceResult] = {}
    entries = result.get("results")
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str):
            continue
        identity_id = entry["id"]
        if entry.get("ok") is True:
            state = entry.get("state")
            by_id[identity_id] = DeviceResult(
                identity_id, True, state=state if isinstance(state, str) else ""
            )
            continue
        error = entry.get("error")
        error = error if isinstance(error, Mapping) else {}
        reason = error.get("reason")
        detail = error.get("detail")
        by_id[identity_id] = DeviceResult(
            identity_id,
            False,
            reason=reason if isinstance(reason, str) and reason else "failed",
            detail=detail if isinstance(detail, str) else "",
        )
    return [
        by_id.get(i)
        or DeviceResult(i, False, reason=MISSING_RESULT, detail="the gateway did not answer for it")
        for i in ids
    ]


def failed_for_all(ids: Sequence[str], failure: RequestFailure) -> list[DeviceResult]:
    return [DeviceResult(i, False, reason=failure.reason, detail=failure.detail) for i in ids]


Reply = Callable[[dict[str, Any] | None, RequestFailure | None], None]


class Send(Protocol):
    def __call__(
        self, op: str, args: Mapping[str, Any], reply: Reply, *, timeout: float = ...
    ) -> None: ...


class BulkAction:
    """Runs one action over ``ids`` in chunks through ``send`` (``AdminBridge.request``) and
    calls ``done(results)`` once, with a result for every id in order."""

    def __init__(
        self,
        action: str,
        ids: Sequence[str],
        reason: str,
        send: Send,
        done: Callable[[list[DeviceResult]], None],
        *,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
        if not ids:
            raise ValueError("a bulk action needs at least one id")
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.action = action
        self.ids = tuple(ids)
        self.reason = reason
        self._send = send
        self._done = done
        self._chunks = [self.ids[i : i + chunk_size] for i in range(0, len(self.ids), chunk_size)]
        self._results: list[DeviceResult] = []
        self._next = 0

    @property
    def progress(self) -> tuple[int, int]:
        return len(self._results), len(self.ids)

    def start(self) -> None:
        self._send_next()

    def _send_next(self) -> None:
        if self._next >= len(self._chunks):
            self._done(self._results)
            return
        chunk = self._chunks[self._next]
        self._next += 1

        def reply(result: dict[str, Any] | None, failure: RequestFailure | None) -> None:
            if failure is not None or result is None:
                self._results.extend(
                    failed_for_all(chunk, failure or RequestFailure("failed", "no answer"))
                )
            else:
                self._results.extend(results_from_reply(chunk, result))
            self._send_next()

        self._send(
            self.action, {"ids": list(chunk), "reason": self.reason}, reply, timeout=CHUNK_TIMEOUT
        )
