"""The admin client, seen from the UI thread.

``gateway.admin.client.AdminClient`` runs its own network thread and calls back from it; Qt
widgets may only be touched from the UI thread. The bridge hands every callback to the UI
thread through a queued signal, so nothing in the console ever waits on the network and nothing
outside the UI thread touches a widget. Events skip the signal: they go straight into the
``EventInbox`` the window drains every 250 ms.

Errors are translated here, at the boundary: whatever the client raises reaches the console as
a ``RequestFailure`` with the admin API's reason code.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from PySide6.QtCore import QObject, Qt, Signal, Slot

from console.live import EventInbox

log = logging.getLogger(__name__)

# Reason codes the console itself gives a request that never reached the gateway.
NOT_CONNECTED = "not_connected"
CLIENT_FAILED = "client_failed"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class RequestFailure:
    """Why a request failed: the admin API's reason code (``forbidden``, ``not_found``,
    ``timeout``...) or one of the console's own (``not_connected``, ``client_failed``)."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError("reason must be a non-empty str")
        if not isinstance(self.detail, str):
            raise TypeError("detail must be a str")

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    @classmethod
    def from_exception(cls, error: BaseException) -> RequestFailure:
        reason = getattr(error, "reason", None)
        detail = getattr(error, "detail", None)
        if isinstance(reason, str) and reason:
            return cls(str(reason), detail if isinstance(detail, str) else str(error))
        return cls(CLIENT_FAILED, f"{type(error).__name__}: {error}")


Reply = Callable[[dict[str, Any] | None, RequestFailure | None], None]
Prepare = Callable[[dict[str, Any]], dict[str, Any]]
EventCallback = Callable[[dict[str, Any]], None]
ConnectionCallback = Callable[[str], None]
ClientCallback = Callable[[dict[str, Any] | None, BaseException | None], None]


class ClientLike(Protocol):
    """What the console uses of ``gateway.admin.client.AdminClient``."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def request_async(
        self,
        op: str,
        args: dict[str, Any] | None = None,
        callback: ClientCallback | None = None,
        *,
        timeout: float = ...,
    ) -> None: ...


ClientFactory = Callable[[EventCallback, ConnectionCallback], ClientLike]


class AdminBridge(QObject):
    """Owns one admin client. ``start()`` builds and starts it off the UI thread (building it
    decrypts the operator key); ``request()`` answers on the UI thread."""

    connection_changed = Signal(str)  # "connecting" | "connected" | "disconnected: <why>"
    failed = Signal(str)  # the client could not be built or started (wrong passphrase...)
    _deliver = Signal(object, object, object)

    def __init__(
        self, factory: ClientFactory, inbox: EventInbox, parent: QObject | None = None
    ) -> None:
        super().__init__(parent)
        self._factory = factory
        self.inbox = inbox
        self._client: ClientLike | None = None
        self._lock = threading.Lock()
        self._stopped = False
        self.state = "idle"
        # Queued even when emitted on the UI thread: a reply never runs inside the call that
        # asked for it.
        self._deliver.connect(self._run_reply, Qt.ConnectionType.QueuedConnection)
        self._relay = _ThreadRelay()
        self._relay.changed.connect(self._set_state, Qt.ConnectionType.QueuedConnection)
        self._relay.failed.connect(self.failed, Qt.ConnectionType.QueuedConnection)

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def start(self) -> None:
        threading.Thread(
            target=self._start_client, name="fleetgate-admin-start", daemon=True
        ).start()

    def _start_client(self) -> None:
        self._relay.changed.emit("connecting")
        try:
            client = self._factory(self._on_event, self._relay.changed.emit)
            client.start()
        except Exception as exc:
            failure = RequestFailure.from_exception(exc)
            log.warning("admin client did not start: %s", failure)
            self._relay.changed.emit(f"disconnected: {failure}")
            self._relay.failed.emit(str(failure))
            return
        with self._lock:
            if self._stopped:
                client.stop()
                return
            self._client = client

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            client, self._client = self._client, None
        if client is not None:
            try:
                client.stop()
            except Exception:
                log.exception("admin client did not stop cleanly")

    def request(
        self,
        op: str,
        args: Mapping[str, Any] | None,
        reply: Reply,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prepare: Prepare | None = None,
    ) -> None:
        """Send ``op``; ``reply(result, None)`` or ``reply(None, failure)`` runs later on the UI
        thread, exactly once. ``prepare(result)`` runs first on the client's thread: heavy
        work on a reply (parsing a fleet of 100k rows) stays off the UI thread."""
        with self._lock:
            client = self._client
        if client is None:
            self._deliver.emit(
                reply, None, RequestFailure(NOT_CONNECTED, "not connected to the gateway")
            )
            return
        answered = threading.Event()

        def done(result: dict[str, Any] | None, error: BaseException | None) -> None:
            if answered.is_set():
                return
            answered.set()
            if error is not None:
                self._deliver.emit(reply, None, RequestFailure.from_exception(error))
            elif not isinstance(result, dict):
                failure = RequestFailure(CLIENT_FAILED, "the gateway answered without a result")
                self._deliver.emit(reply, None, failure)
            else:
                try:
                    prepared = prepare(result) if prepare is not None else result
                except Exception as exc:
                    self._deliver.emit(reply, None, RequestFailure.from_exception(exc))
                    return
                self._deliver.emit(reply, prepared, None)

        try:
            client.request_async(
                op, dict(args) if args is not None else None, done, timeout=timeout
            )
        except Exception as exc:
            done(None, exc)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.inbox.push(event)

    @Slot(object, object, object)
    def _run_reply(
        self, reply: Reply, result: dict[str, Any] | None, failure: RequestFailure | None
    ) -> None:
        try:
            reply(result, failure)
        except Exception:
            log.exception("a reply handler failed")

    @Slot(str)
    def _set_state(self, state: str) -> None:
        self.state = state
        self.connection_changed.emit(state)


class _ThreadRelay(QObject):
    """Carries connection changes and start failures from the client's thread; a separate
    object so that the bridge's own signals are always emitted on the UI thread."""

    changed = Signal(str)
    failed = Signal(str)
