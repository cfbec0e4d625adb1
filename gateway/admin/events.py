"""Gateway events to operators: every ``GatewayEvent`` goes out on ``fg/v1/admin/events``, and
the ones that need a person (clones, anomalies) are kept for the "attention" view.

The gateway emits events on its event loop (broker callbacks, enforcement); an event emitted
from another thread is handed to the loop with ``call_soon_threadsafe``, because the MQTT
client lives on the loop and is not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from gateway.admin.wire import encode_event
from gateway.protocol.codec import decode_response
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import IssuedCertificate
from gateway.store import CertificateRecord
from pki.clock import require_aware

log = logging.getLogger(__name__)

# Kinds an operator has to look at; "anomaly" comes from behaviour monitoring extensions.
NOTABLE_KINDS = frozenset({"clone", "anomaly"})
DEFAULT_KEEP = 200
# Publishes waiting for the broker; beyond this (a broker that stopped reading) events are
# dropped and counted rather than piling up in memory.
MAX_IN_FLIGHT = 10_000


class EventLike(Protocol):
    """What the relay reads of an event (``gateway.service.GatewayEvent`` fits)."""

    @property
    def kind(self) -> str: ...
    @property
    def subject(self) -> str | None: ...
    @property
    def at(self) -> datetime: ...
    @property
    def data(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class EventView:
    """One event as operators see it."""

    kind: str
    subject: str | None
    at: datetime
    data: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError("kind must be a non-empty str")
        if self.subject is not None and not isinstance(self.subject, str):
            raise TypeError("subject must be a str or None")
        require_aware(self.at, "at")
        object.__setattr__(self, "data", {str(k): str(v) for k, v in self.data.items()})

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "at": self.at.isoformat(),
            "data": dict(self.data),
        }

    def encode(self) -> bytes:
        return encode_event(self.kind, self.subject, self.at, self.data)


def issued_certificate_data(
    payload: object, certificate: CertificateRecord | None = None
) -> dict[str, str]:
    """A ``certificate_issued`` event's data: the new certificate's ``not_after`` (ISO 8601) and
    ``serial`` (hex, as ``get_identity`` shows it): from its registry record when the caller
    has it, else read from the answer sent to the device (a replayed answer).

    With it a console updates the row in place instead of reloading the whole fleet on every
    renewal. An answer that does not decode to a certificate gives no data (the event still
    says a certificate was issued)."""
    if certificate is not None:
        return _issued_data(certificate.not_after, certificate.serial)
    if not isinstance(payload, bytes):
        return {}
    try:
        response = decode_response(payload)
        if not isinstance(response, IssuedCertificate):
            return {}
        parsed = x509.load_der_x509_certificate(response.certificate)
        not_after = parsed.not_valid_after_utc
    except (ProtocolError, ValueError):
        return {}
    return _issued_data(not_after, parsed.serial_number)


def _issued_data(not_after: datetime, serial: int) -> dict[str, str]:
    return {"not_after": not_after.isoformat(), "serial": f"{serial:x}"}


Publish = Callable[[bytes], Awaitable[None]]


class EventRelay:
    """A gateway event listener: publish each event, remember the notable ones.

    ``publish`` sends one encoded event (``None``: remember only, for tests and tools).
    ``heard`` says whether anyone is subscribed to the event stream now (``None``: assume so);
    an event nobody can receive is neither encoded nor sent, since a fleet's enrollments emit
    several each and, with no console open, that was a twentieth of the embedded broker's
    CPU (QoS 0 events to nobody are dropped by the broker anyway).
    ``metrics`` counts ``published``, ``unheard``, ``dropped.<why>`` and ``errors.publish``.
    """

    def __init__(
        self,
        publish: Publish | None,
        *,
        keep: int = DEFAULT_KEEP,
        heard: Callable[[], bool] | None = None,
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError("keep must be an int >= 1")
        self._publish = publish
        self._heard = heard
        self._notable: deque[EventView] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: set[asyncio.Future[None]] = set()
        self.metrics: Counter[str] = Counter()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that owns the MQTT client (learnt from the first event emitted on it
        otherwise)."""
        self._loop = loop

    def __call__(self, event: EventLike) -> None:
        view = EventView(event.kind, event.subject, event.at, dict(event.data))
        if view.kind in NOTABLE_KINDS:
            with self._lock:
                self._notable.appendleft(view)
        if self._publish is None:
            return
        if self._heard is not None and not self._listened_to():
            self.metrics["unheard"] += 1
            return
        self._schedule(view.encode())

    def _listened_to(self) -> bool:
        assert self._heard is not None
        try:
            return bool(self._heard())
        except Exception:  # when in doubt, send
            log.debug("could not tell whether anyone listens to events", exc_info=True)
            return True

    def recent(self) -> list[EventView]:
        """Notable events, newest first."""
        with self._lock:
            return list(self._notable)

    def _schedule(self, payload: bytes) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None:
            self._loop = running
            self._start(payload)
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            self.metrics["dropped.no_loop"] += 1
            return
        try:
            loop.call_soon_threadsafe(self._start, payload)
        except RuntimeError:  # the loop closed between the check and the call
            self.metrics["dropped.no_loop"] += 1

    def _start(self, payload: bytes) -> None:
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            self.metrics["dropped.backlog"] += 1
            return
        task = asyncio.ensure_future(self._send(payload))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, payload: bytes) -> None:
        assert self._publish is not None
        try:
            await self._publish(payload)
        except Exception as exc:  # an event lost must never disturb the gateway
            self.metrics["errors.publish"] += 1
            log.debug("could not publish an admin event: %s", exc)
        else:
            self.metrics["published"] += 1
