"""Plugging the admin API into a ``Gateway``: routes, an event listener, a worker thread.

Admin requests run in their own worker thread, not in the transport's: the transport's single
worker serves enrollment, and a listing of a large fleet or a bulk revoke (each device enforced
on the broker before the reply) must not hold up devices waiting for their certificates. One
thread, so an operator's requests are answered in the order they were sent.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from gateway.admin.backend import GatewayBackend
from gateway.admin.events import EventRelay
from gateway.admin.service import AdminService
from gateway.admin.telemetry import TelemetryCounter
from gateway.admin.wire import (
    EVENTS_TOPIC,
    REQUEST_FILTER,
    AdminReason,
    AdminRequestError,
    error_reply,
    operator_of,
    parse_request,
    response_topic,
)
from gateway.home import load_audit_public_key
from gateway.protocol import topics
from gateway.transport import Message, Outgoing, Route

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

TELEMETRY_FILTER = f"{topics.PREFIX}/dev/+/telemetry"
# Requests queued behind the one being served; more are answered "busy" at once.
MAX_QUEUED = 100

_attached: weakref.WeakKeyDictionary[Gateway, AdminService] = weakref.WeakKeyDictionary()


class AdminDispatcher:
    """The inline route handler for admin requests: hand each to the worker thread, publish its
    reply when done. Runs on the gateway's event loop."""

    def __init__(
        self,
        handle: Callable[[str, bytes], list[Outgoing]],
        publish: Callable[[Outgoing], Awaitable[None]],
        *,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._handle = handle
        self._publish = publish
        self._max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="admin")
        self._queued = 0
        self._publishing: set[asyncio.Future[None]] = set()
        weakref.finalize(self, self._executor.shutdown, wait=False)

    def accept(self, topic: str, payload: bytes) -> Sequence[Message]:
        name = operator_of(topic)
        if name is None:
            return []
        if self._queued >= self._max_queued:
            return [self._busy(name, payload)]
        self._queued += 1
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._handle, topic, payload)
        future.add_done_callback(self._done)
        return []

    @staticmethod
    def _busy(name: str, payload: bytes) -> Outgoing:
        try:
            request_id: str | None = parse_request(payload).id
        except AdminRequestError as exc:
            request_id = exc.request_id
        body = error_reply(request_id, AdminReason.BUSY, "too many requests queued; retry later")
        return Outgoing(response_topic(name), body, qos=1)

    def _done(self, future: Future[list[Outgoing]] | asyncio.Future[list[Outgoing]]) -> None:
        self._queued -= 1
        try:
            replies = future.result()
        except Exception:  # AdminService.handle never raises; this is a bug, keep serving
            log.exception("admin request handling failed")
            return
        for reply in replies:
            task = asyncio.ensure_future(self._send(reply))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _send(self, reply: Outgoing) -> None:
        try:
            await self._publish(reply)
        except Exception as exc:  # the operator's client times out and may ask again
            log.warning("could not publish an admin reply on %s: %s", reply.topic, exc)


def attach_admin(gateway: Gateway) -> AdminService:
    """Add the admin API to ``gateway`` (before ``start()``): the request route, the telemetry
    counter and the event relay. Attaching twice returns the first service."""
    existing = _attached.get(gateway)
    if existing is not None:
        return existing
    if gateway.transport is not None:
        raise RuntimeError("attach_admin must be called before the gateway starts")

    async def publish(message: Outgoing) -> None:
        transport = gateway.transport
        if transport is not None:
            await transport.publish(message)

    async def publish_event(payload: bytes) -> None:
        await publish(Outgoing(EVENTS_TOPIC, payload, qos=0))

    try:
        audit_key = load_audit_public_key(gateway.settings)
    except (OSError, ValueError):
        log.warning("no audit public key: the admin API cannot verify audit checkpoints")
        audit_key = None
    telemetry = TelemetryCounter(gateway.clock)
    def heard() -> bool:
        # the embedded broker knows its subscriptions; Mosquitto's notices tell whether an
        # operator, the only kind allowed to read events, is connected
        audience = getattr(gateway.broker, "has_audience", None)
        return True if audience is None else bool(audience(EVENTS_TOPIC))

    relay = EventRelay(publish_event, heard=heard)
    service = AdminService(
        GatewayBackend(gateway, audit_key=audit_key),
        telemetry=telemetry,
        events=relay,
        audit_every=gateway.settings.audit_checkpoint_every,
    )
    dispatcher = AdminDispatcher(service.handle, publish)
    # shared: in a cluster one gateway answers each operator request, as for enrollment
    gateway.routes.append(Route(REQUEST_FILTER, dispatcher.accept, inline=True, shared=True))
    gateway.routes.append(Route(TELEMETRY_FILTER, telemetry.handle, inline=True))
    gateway.listeners.append(relay)
    _attached[gateway] = service
    return service
