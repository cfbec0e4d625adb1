"""Helpers shared by the console tests (fixtures live in conftest.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from console.rows import DeviceRow

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PROFILE_PASSPHRASE = b"console-test-passphrase"


# -- a scripted admin client -------------------------------------------------------------------


class ScriptedError(Exception):
    """Shaped like gateway.admin.client.AdminError: a reason code and a detail."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


Handler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class ScriptedClient:
    """Answers requests from ``handlers`` on its own thread, as the real client does."""

    handlers: dict[str, Handler]
    on_event: Callable[[dict[str, Any]], None]
    on_connection: Callable[[str], None]
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    timeouts: dict[str, float] = field(default_factory=dict)  # the last one asked, by op
    started: bool = False

    def start(self) -> None:
        self.started = True
        self.on_connection("connected")

    def stop(self) -> None:
        self.started = False

    def request_async(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        callback: Callable[..., None] | None = None,
        *,
        timeout: float = 10.0,
    ) -> None:
        self.requests.append((op, dict(args or {})))
        self.timeouts[op] = timeout

        def answer() -> None:
            assert callback is not None
            handler = self.handlers.get(op)
            if handler is None:
                callback(None, ScriptedError("unknown_op", op))
                return
            try:
                callback(handler(dict(args or {})), None)
            except ScriptedError as error:
                callback(None, error)

        threading.Thread(target=answer, daemon=True).start()

    def emit(self, event: dict[str, Any]) -> None:
        self.on_event(event)


def wire_row(row: DeviceRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "state": row.state,
        "model": row.model,
        "manufacturer": row.manufacturer,
        "firmware_version": row.firmware_version,
        "connected": row.connected,
        "last_seen_at": row.last_seen_at.isoformat() if row.last_seen_at else None,
        "cert_not_after": row.cert_not_after.isoformat() if row.cert_not_after else None,
        "role": row.role or None,
    }


