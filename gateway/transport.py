"""The one module that connects the sans-I/O enrollment core to MQTT.

The gateway is an ordinary MQTT client of its broker (on the internal listener). Requests are
handled one at a time in a worker thread: the core is synchronous (crypto and a durable
database commit, ~1-2 ms each) and must not stall the event loop the embedded broker shares.
Replies are published only after the handler returns, and the handler returns only after the
certificate's row is committed — so a published certificate always has its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import aiomqtt

from gateway.protocol.topics import topic_matches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Message(Protocol):
    """What a handler returns: the enrollment core's ``Publish`` has this shape."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def qos(self) -> int: ...
    @property
    def retain(self) -> bool: ...


Handler = Callable[[str, bytes], Sequence[Message]]


@dataclass(frozen=True)
class Route:
    """Messages on ``topic_filter`` go to ``handler``. Handlers run one at a time in the
    transport's worker thread (they do crypto and database work); ``inline`` handlers run on
    the event loop instead and must be quick (counting, forwarding)."""

    topic_filter: str
    handler: Handler
    inline: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    client_id: str = "fleetgate-gateway"


def _nodelay(client: aiomqtt.Client) -> None:
    """Disable Nagle on the client's socket: request/reply over MQTT waits ~40-90 ms on
    delayed ACKs otherwise (measured with Mosquitto's default TCP settings)."""
    sock = getattr(client._client, "socket", lambda: None)()  # paho client under aiomqtt
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport:
    """Subscribe to request topics, hand each message to ``handler``, publish its answers.

    Reconnects with backoff when the broker goes away; messages in flight at that moment are
    answered after the device retries (the protocol makes retries safe).
    """

    def __init__(
        self,
        address: BrokerAddress,
        routes: Sequence[Route],
        *,
        prepare: Callable[[Message], Awaitable[None]] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        """``prepare`` runs on the event loop before each reply is published (the service uses
        it to let a newly certified device onto the broker before it hears of its certificate).
        """
        self._address = address
        self._routes = list(routes)
        self._prepare = prepare
        self._max_backoff = max_backoff
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrollment")
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._retained: dict[str, bytes] = {}
        self.handled = 0
        self.handler_errors = 0

    async def start(self, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-transport")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._worker.shutdown(wait=True)

    async def publish(self, message: Message) -> None:
        """Publish now if connected; retained messages are also re-sent after a reconnect."""
        if message.retain:
            self._retained[message.topic] = message.payload
        client = self._client
        if client is not None and self._ready.is_set():
            await client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                async with aiomqtt.Client(
                    self._address.host,
                    self._address.port,
                    identifier=self._address.client_id,
                    username=self._address.username,
                    password=self._address.password,
                    keepalive=30,
                    max_queued_outgoing_messages=100_000,
                ) as client:
                    _nodelay(client)
                    for route in self._routes:
                        await client.subscribe(route.topic_filter, qos=1)
                    self._client = client
                    for topic, payload in self._retained.items():
                        await client.publish(topic, payload, qos=1, retain=True)
                    self._ready.set()
                    backoff = 0.2
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            await self._dispatch(client, str(message.topic), bytes(payload))
            except aiomqtt.MqttError as exc:
                self._ready.clear()
                self._client = None
                log.warning("broker connection lost (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _dispatch(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        route = next((r for r in self._routes if topic_matches(r.topic_filter, topic)), None)
        if route is None:
            return
        loop = asyncio.get_running_loop()
        try:
            if route.inline:
                replies = route.handler(topic, payload)
            else:
                replies = await loop.run_in_executor(self._worker, route.handler, topic, payload)
        except Exception:
            # Handlers answer every bad input themselves; reaching here is a bug. Keep serving.
            self.handler_errors += 1
            log.exception("handler failed on %s", topic)
            return
        self.handled += 1
        for reply in replies:
            if self._prepare is not None:
                try:
                    await self._prepare(reply)
                except Exception:
                    # Not published: the device retries and the stored answer is sent again.
                    log.exception("could not prepare the reply on %s", reply.topic)
                    continue
            await client.publish(reply.topic, reply.payload, qos=reply.qos, retain=reply.retain)
