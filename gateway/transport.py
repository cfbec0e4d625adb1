"""The one module that connects the sans-I/O enrollment core to MQTT.

The gateway is an ordinary MQTT client of its broker (on the internal listener). Requests are
handled in a worker thread: the core is synchronous (crypto and durable database commits) and
must not stall the event loop the embedded broker shares. Replies are published only after the
handler returns, and the handler returns only after the certificate's row is committed — so a
published certificate always has its row.

Three things keep a fleet's worth of requests moving (measured in docs/benchmarks.md):

- Pipelining: the worker takes the next request as soon as it has answered one; the answer is
  prepared and published (a broker round trip) while the next request is being handled.
- Fair turns: waiting requests are queued per device and served one device at a time, round
  robin, so a client sending a storm of requests waits behind itself, not in front of everyone.
- A bounded queue per device: a device has one request in flight (a retry repeats it); beyond
  ``max_queued_per_device`` waiting requests the rest are dropped unanswered and counted, the
  way a broker drops what it cannot deliver. The protocol makes a retry safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import aiomqtt

from gateway.faults import fault_point
from gateway.protocol.topics import device_of, topic_matches

log = logging.getLogger(__name__)

MAX_QUEUED_PER_DEVICE = 16
# A connection the broker drops before its CONNACK (Mosquitto kicks a session whose account a
# starting gateway of the cluster just set up) leaves aiomqtt waiting out its whole timeout:
# give up on such an attempt soon and connect again; acknowledgements of subscriptions and
# publications keep the longer limit.
CONNECT_TIMEOUT_SECONDS = 3.0
OPERATION_TIMEOUT_SECONDS = 10.0


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
    """Messages on ``topic_filter`` go to ``handler``. Handlers run in the transport's worker
    thread (they do crypto and database work); ``inline`` handlers run on the event loop
    instead and must be quick (counting, forwarding). A ``shared`` route is subscribed as
    ``$share/<group>/<filter>`` when the address names a share group: the broker then hands
    each message to one gateway of the group instead of to every gateway. A ``standby`` route
    is subscribed only while ``MqttTransport.activate`` says so (a duty of a cluster's leader
    alone: every other gateway would receive each of those messages for nothing)."""

    topic_filter: str
    handler: Handler
    inline: bool = False
    shared: bool = False
    standby: bool = False


@dataclass(frozen=True)
class BrokerAddress:
    """``mqtt5`` speaks MQTT 5 (Mosquitto); the embedded amqtt broker knows 3.1.1 only.
    ``share_group``: subscribe ``shared`` routes through that MQTT 5 shared-subscription group
    (several gateways, one fleet); None subscribes them plainly (one gateway)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    client_id: str = "fleetgate-gateway"
    mqtt5: bool = False
    share_group: str | None = None

    def __post_init__(self) -> None:
        group = self.share_group
        if group is not None and (
            not isinstance(group, str) or not group or any(c in group for c in "/+#\x00")
        ):
            raise ValueError(f"share_group must be a non-empty name without / + # NUL: {group!r}")

    def subscription(self, route: Route) -> str:
        """The filter to subscribe for ``route``."""
        if route.shared and self.share_group is not None:
            return f"$share/{self.share_group}/{route.topic_filter}"
        return route.topic_filter


@dataclass(frozen=True)
class _Request:
    route: Route
    topic: str
    payload: bytes


class FairQueue:
    """Requests queued per key (the device), served one key at a time in turn.

    ``put`` returns False (and keeps nothing) when that key already has ``per_key`` requests
    waiting. Not thread-safe: used from the event loop only."""

    def __init__(self, per_key: int = MAX_QUEUED_PER_DEVICE) -> None:
        if isinstance(per_key, bool) or not isinstance(per_key, int) or per_key < 1:
            raise ValueError("per_key must be a positive int")
        self._per_key = per_key
        self._queues: OrderedDict[str, deque[_Request]] = OrderedDict()
        self._size = 0
        self._ready = asyncio.Event()

    def __len__(self) -> int:
        return self._size

    def put(self, key: str, request: _Request) -> bool:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        elif len(queue) >= self._per_key:
            return False
        queue.append(request)
        self._size += 1
        self._ready.set()
        return True

    async def get(self) -> _Request:
        while not self._queues:
            self._ready.clear()
            await self._ready.wait()
        key, queue = next(iter(self._queues.items()))
        request = queue.popleft()
        self._size -= 1
        if queue:
            self._queues.move_to_end(key)  # its next request waits for everyone else's turn
        else:
            del self._queues[key]
        return request


def _nodelay(client: aiomqtt.Client) -> None:
    """Disable Nagle on the client's socket: request/reply over MQTT waits ~40-90 ms on
    delayed ACKs otherwise (measured with Mosquitto's default TCP settings)."""
    sock = getattr(client._client, "socket", lambda: None)()  # paho client under aiomqtt
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport:
    """Subscribe to request topics, hand each message to its route's handler, publish the
    answers.

    Reconnects with backoff when the broker goes away; messages in flight at that moment are
    answered after the device retries (the protocol makes retries safe).

    ``stats`` counts ``queued``, ``dropped`` (a device over its queue bound), ``published`` and
    ``publish_errors``; ``handled`` and ``handler_errors`` count handler calls; ``received``
    the messages the broker sent, by the filter of the routes they match (taken or not).
    """

    def __init__(
        self,
        address: BrokerAddress,
        routes: Sequence[Route],
        *,
        prepare: Callable[[Message], Awaitable[None]] | None = None,
        max_backoff: float = 5.0,
        max_queued_per_device: int = MAX_QUEUED_PER_DEVICE,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        """``prepare`` runs on the event loop before each reply is published (the service uses
        it to let a newly certified device onto the broker before it hears of its certificate).
        """
        self._address = address
        self._routes = list(routes)
        # Routes by filter, in the order first seen: a message is matched once per filter (the
        # behaviour watch and the admin API's telemetry counter share one).
        by_filter: dict[str, list[Route]] = {}
        for route in self._routes:
            by_filter.setdefault(route.topic_filter, []).append(route)
        self._by_filter = {f: tuple(group) for f, group in by_filter.items()}
        self._prepare = prepare
        self._max_backoff = max_backoff
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        self._connect_timeout = connect_timeout
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrollment")
        self._queue = FairQueue(max_queued_per_device)
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[None] | None = None
        self._replies: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()
        self._active: set[str] = set()  # standby routes' filters now subscribed
        self.connections = 0  # successful connects to the broker, reconnects included
        self._retained: dict[str, bytes] = {}
        self.handled = 0
        self.handler_errors = 0
        self.stats: Counter[str] = Counter()
        self.received: Counter[str] = Counter()  # messages the broker sent, by route filter

    async def start(self, timeout: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-transport")
        self._serving = asyncio.create_task(self._serve(), name="mqtt-transport-worker")
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self) -> None:
        for task in (self._task, self._serving, *self._replies):
            if task is not None:
                task.cancel()
        for task in (self._task, self._serving, *self._replies):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._worker.shutdown(wait=True)

    def forget(self, topic: str) -> None:
        """Stop re-sending the retained message on ``topic`` after a reconnect (it may be
        someone else's to publish now)."""
        self._retained.pop(topic, None)

    def _subscribed(self, route: Route, active: set[str] | None = None) -> bool:
        """Whether ``route`` is subscribed, with ``active`` (default: now) its standby set."""
        standby = self._active if active is None else active
        return not route.standby or route.topic_filter in standby

    def _standby_route(self, topic_filter: str) -> Route | None:
        return next(
            (r for r in self._routes if r.standby and r.topic_filter == topic_filter), None
        )

    def _always_on(self, topic_filter: str) -> bool:
        """Whether a route that is no standby one subscribes ``topic_filter`` anyway."""
        return any(not r.standby and r.topic_filter == topic_filter for r in self._routes)

    async def _follow_active(self, client: aiomqtt.Client, subscribed: set[str]) -> None:
        for topic_filter in self._active - subscribed:
            await self._switch(client, topic_filter, True)
        for topic_filter in subscribed - self._active:
            await self._switch(client, topic_filter, False)

    async def _switch(self, client: aiomqtt.Client, topic_filter: str, active: bool) -> None:
        route = self._standby_route(topic_filter)
        if route is None or self._always_on(topic_filter):
            return  # subscribed for another route all along: nothing to change
        subscription = self._address.subscription(route)
        if active:
            await client.subscribe(subscription, qos=1)
        else:
            await client.unsubscribe(subscription)

    async def activate(self, topic_filter: str, active: bool) -> None:
        """Subscribe the standby route of ``topic_filter`` (``active``), or leave it. Kept
        across reconnects; a failure here is mended by the reconnect that follows it."""
        if self._standby_route(topic_filter) is None:
            raise ValueError(f"no standby route for {topic_filter!r}")
        if active == (topic_filter in self._active):
            return
        if active:
            self._active.add(topic_filter)
        else:
            self._active.discard(topic_filter)
        client = self._client
        if client is None or not self._ready.is_set():
            return  # the connection being set up follows _active once ready
        try:
            await self._switch(client, topic_filter, active)
        except aiomqtt.MqttError as exc:
            log.info("%s %s on the next connection (%s)",
                     "subscribing" if active else "leaving", topic_filter, exc)

    async def publish(self, message: Message) -> None:
        """Publish now if connected; retained messages are also re-sent after a reconnect, so
        losing the connection while publishing one is not an error (raises ``MqttError`` for
        the others)."""
        if message.retain:
            self._retained[message.topic] = message.payload
        client = self._client
        if client is not None and self._ready.is_set():
            try:
                await client.publish(
                    message.topic, message.payload, qos=message.qos, retain=message.retain
                )
            except aiomqtt.MqttError as exc:
                if not message.retain:
                    raise
                log.info("%s is sent again after the reconnect (%s)", message.topic, exc)

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
                    timeout=self._connect_timeout,
                    max_queued_outgoing_messages=100_000,
                    # bounded: a flood waits in the broker (and is rate limited), not here
                    max_queued_incoming_messages=10_000,
                    protocol=(
                        aiomqtt.ProtocolVersion.V5
                        if self._address.mqtt5
                        else aiomqtt.ProtocolVersion.V311
                    ),
                ) as client:
                    client.timeout = OPERATION_TIMEOUT_SECONDS  # connected: see above
                    _nodelay(client)
                    subscribed = set(self._active)
                    # dict: each subscription once, in route order (two routes may share one)
                    wanted = {
                        self._address.subscription(route): None
                        for route in self._routes
                        if self._subscribed(route, subscribed)
                    }
                    for subscription in wanted:
                        await client.subscribe(subscription, qos=1)
                    self._client = client
                    for topic, payload in self._retained.items():
                        await client.publish(topic, payload, qos=1, retain=True)
                    self._ready.set()
                    self.connections += 1
                    backoff = 0.2
                    # activate() calls made while this connection was being set up
                    await self._follow_active(client, subscribed)
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            self._accept(str(message.topic), bytes(payload))
            except aiomqtt.MqttError as exc:
                self._ready.clear()
                self._client = None
                log.warning("broker connection lost (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    def _accept(self, topic: str, payload: bytes) -> None:
        """Hand the message to every route that takes it (two routes may share a filter: the
        behaviour watch and the admin API's telemetry counter); a standby route left a moment
        ago takes nothing more."""
        for topic_filter, routes in self._by_filter.items():
            if not topic_matches(topic_filter, topic):
                continue
            self.received[topic_filter] += 1  # what the broker sent, by filter
            for route in routes:
                if not self._subscribed(route):
                    continue
                if route.inline:
                    self._answer_inline(route, topic, payload)
                elif self._queue.put(device_of(topic) or topic, _Request(route, topic, payload)):
                    self.stats["queued"] += 1
                else:
                    self.stats["dropped"] += 1

    async def _serve(self) -> None:
        """Take requests in their fair order, one at a time through the worker thread."""
        loop = asyncio.get_running_loop()
        while True:
            request = await self._queue.get()
            try:
                replies = await loop.run_in_executor(
                    self._worker, request.route.handler, request.topic, request.payload
                )
            except Exception:
                # Handlers answer every bad input themselves; reaching here is a bug. Keep serving.
                self.handler_errors += 1
                log.exception("handler failed on %s", request.topic)
                continue
            self.handled += 1
            if replies:
                self._publish_later(replies)  # while the worker goes on with the next one

    def _answer_inline(self, route: Route, topic: str, payload: bytes) -> None:
        try:
            replies = route.handler(topic, payload)
        except Exception:
            self.handler_errors += 1
            log.exception("handler failed on %s", topic)
            return
        self.handled += 1
        if replies:
            self._publish_later(replies)

    def _publish_later(self, replies: Sequence[Message]) -> None:
        task = asyncio.create_task(self._publish_replies(replies))
        self._replies.add(task)
        task.add_done_callback(self._replies.discard)

    async def _publish_replies(self, replies: Sequence[Message]) -> None:
        for reply in replies:
            if self._prepare is not None:
                try:
                    await self._prepare(reply)
                except Exception:
                    # Not published: the device retries and the stored answer is sent again.
                    log.exception("could not prepare the reply on %s", reply.topic)
                    continue
            client = self._client
            if client is None:
                self.stats["publish_errors"] += 1  # the device retries after the reconnect
                continue
            try:
                await client.publish(
                    reply.topic, reply.payload, qos=reply.qos, retain=reply.retain
                )
            except aiomqtt.MqttError as exc:
                self.stats["publish_errors"] += 1
                log.warning("could not publish the reply on %s: %s", reply.topic, exc)
                continue
            self.stats["published"] += 1
            fault_point("after_publish")
