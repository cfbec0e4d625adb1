"""Everything that touches amqtt 0.12.1 internals, in one place (the version is pinned for it).

- ``AuthPlugin``: amqtt builds plugins itself from dotted paths, so it finds its
  ``EmbeddedBroker`` through a registry keyed by a per-broker id passed in the plugin config.
  Topic decisions need no plugin: ``FilteringBroker`` asks ``permits`` directly.
- ``FilteringBroker``: amqtt's retained-message delivery skips the topic plugins. On every
  connect it sends the new client the retained messages of *every* subscription filter in the
  broker (not only its own), and messages queued for an offline session are delivered without
  a RECEIVE check. Both would hand one device another device's retained messages. It also
  routes through ``gateway.broker.routing.SubscriptionTable`` instead of testing every message
  against every filter in the broker.
- ``CompactSession``: amqtt's client session without a ``transitions`` state machine of its
  own (16 kB and ~0.4 ms of CPU per connection, for three states).
- ``QuietDisconnects``: amqtt logs a traceback each time a peer vanishes mid-write (a refused
  CONNACK, a kicked client); that is normal here and kept out of the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from math import floor
from typing import Any, Protocol

from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.errors import BrokerError
from amqtt.events import BrokerEvents
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol import broker_handler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from transitions import MachineError

from gateway.acl import Action
from gateway.broker.routing import SubscriptionTable, is_wildcard

__all__ = [
    "AuthPlugin",
    "CompactSession",
    "FilteringBroker",
    "Gatekeeper",
    "QuietDisconnects",
    "SessionStates",
    "install_compact_sessions",
    "install_quiet_disconnects",
    "register",
    "unregister",
]


class Gatekeeper(Protocol):
    """What the auth plugin asks of the EmbeddedBroker."""

    def authenticate(self, session: Session) -> bool: ...


# amqtt's SUBACK code for a refused subscription (upstream returns the bare number)
_SUBSCRIPTION_REFUSED = 0x80

_REGISTRY: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def register(key: str, gatekeeper: Gatekeeper) -> None:
    _REGISTRY[key] = gatekeeper


def unregister(key: str) -> None:
    _REGISTRY.pop(key, None)


def _gatekeeper(key: str) -> Gatekeeper | None:
    result: Gatekeeper | None = _REGISTRY.get(key)
    return result


class AuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    @dataclass
    class Config:
        broker_key: str = ""

    async def authenticate(self, *, session: Session) -> bool | None:
        gatekeeper = _gatekeeper(self.config.broker_key)
        return gatekeeper is not None and gatekeeper.authenticate(session)


class SessionStates:
    """amqtt's session state machine (``Session._init_states``: new -> connected <->
    disconnected, entering a state stamps the session's connect/disconnect times) written out.

    amqtt builds a ``transitions.Machine`` per session, with its State, Event and Transition
    objects: 16 kB and ~0.4 ms of CPU per connection, measured, for three states. What amqtt
    uses of it is here: ``state``, ``connect()`` (MachineError when already connected, which is
    how amqtt's broker detects a takeover), ``disconnect()`` (from any state), ``is_*()``."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> bool:
        if self.state == "connected":
            raise MachineError("Can't trigger event connect from state connected!")
        self.state = "connected"
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = "disconnected"
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == "new"

    def is_connected(self) -> bool:
        return self.state == "connected"

    def is_disconnected(self) -> bool:
        return self.state == "disconnected"


class CompactSession(Session):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    """amqtt's ``Session`` with ``SessionStates`` in place of its ``transitions.Machine``."""

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)


def install_compact_sessions() -> None:
    """amqtt's broker makes the session of each connection in ``BrokerProtocolHandler
    .init_from_connect``, by the module name ``Session``; pointing that name at
    ``CompactSession`` is the only way in short of copying the method. It concerns amqtt
    brokers only (amqtt's client makes its sessions elsewhere), and only this process."""
    if broker_handler.Session is Session:
        broker_handler.Session = CompactSession


class FilteringBroker(Broker):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    """amqtt's Broker with retained delivery held to the client's own subscriptions and to the
    RECEIVE check (see module docstring), and routing through an indexed subscription table
    (``gateway.broker.routing``): a message costs the filters that can match it, a session's
    start and end cost its own filters, not every filter in the broker."""

    def __init__(
        self,
        *args: object,
        permits: Callable[[Session, Action, str], bool],
        on_publish: Callable[[Session, str, int], None] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = SubscriptionTable(self._subscriptions)  # type: ignore[has-type]
        self._permits = permits
        self._on_publish = on_publish

    async def _topic_filtering(self, session: Session, topic: str, action: AmqttAction) -> bool:
        # Replaces upstream's, which asks every topic plugin through the plugin manager: a task
        # per plugin and a gather for each subscribe, publish and *delivery*, i.e. extra trips
        # through the event loop per message and per recipient. The decision is the same
        # ``permits`` a topic plugin would have returned, asked directly.
        return self._permits(session, Action(action.value), topic)

    async def _broadcast_message(
        self,
        session: Session | None,
        topic: str | None,
        data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        # amqtt calls this for a client's publish once the PUBLISH check allowed it, and for a
        # will; the gateway's own messages come with no session. Only the size is reported.
        if session is not None and topic and self._on_publish is not None:
            self._on_publish(session, topic, len(data or b""))
        await super()._broadcast_message(session, topic, data, force_qos)

    # -- the subscription table: amqtt's writers, kept in step with the table's indexes --------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        # upstream validates the filter, asks the SUBSCRIBE check and appends the entry; the
        # table's per-client index learns of it here
        code: int = await super().add_subscription(subscription, session)
        if code != _SUBSCRIPTION_REFUSED:
            self._subscriptions.record(subscription[0], session)
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        # replaces upstream's, which left a filter without subscribers in the table for good
        return self._subscriptions.discard(a_filter, session.client_id)

    async def _del_all_subscriptions(self, session: Session) -> None:
        # replaces upstream's walk of every filter in the broker at each session's end
        self._subscriptions.discard_client(session.client_id)

    # -- routing ------------------------------------------------------------------------------

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Upstream's ``Broker._run_broadcast`` with one change: the filters come from the
        table's index (exact topic, then the wildcard filters sharing a literal prefix, judged
        by amqtt's ``_matches``) instead of a walk of every filter with ``_matches``, which made
        each message cost every session in the broker. Each filter's subscribers are a snapshot
        taken before the first await (a subscribe or unsubscribe during the RECEIVE checks
        changes neither the walk nor who this message reaches). Per subscriber, as upstream:
        the RECEIVE check, queueing for an offline persistent session at QoS 1/2, delivery at
        the subscription's QoS (or the forced QoS of a will or internal message)."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for _filter, subscribers in self._subscriptions.matching(topic, self._matches):
            for target_session, sub_qos in subscribers:
                qos = broadcast.get("qos", sub_qos)
                if not await self._topic_filtering(
                    target_session, topic=topic, action=AmqttAction.RECEIVE
                ):
                    continue
                state = target_session.transitions.state
                if state != "connected":
                    if (
                        not target_session.clean_session
                        and qos in (QOS_1, QOS_2)
                        and not target_session.is_anonymous
                    ):
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                    continue
                handler = self._get_handler(target_session)
                if handler:
                    running_tasks.append(
                        asyncio.ensure_future(
                            handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
                        )
                    )

    async def _handle_client_session(
        self,
        reader: Any,
        writer: Any,
        client_session: Session,
        handler: Any,
        server: Any,
        listener_name: str,
    ) -> None:
        """Upstream's ``Broker._handle_client_session``, line for line but for its last step:
        upstream offers the new session the retained messages of *every* filter in the broker
        (one coroutine each, thousands per connect at fleet scale, for a clean session that has
        no subscription at all); here only the session's own filters are visited (the retained
        filtering below would skip the others anyway)."""
        listener = self.listeners_config[listener_name]
        authenticated = await self._authenticate(client_session, listener)
        if client_session.client_id is None:
            msg = "Client ID was not correctly created/set."
            raise BrokerError(msg)
        while True:
            try:
                client_session.transitions.connect()
                break
            except (MachineError, ValueError):
                if client_session.transitions.is_connected():
                    self.logger.warning(
                        f"Client {client_session.client_id} is already connected,"
                        " performing take-over."
                    )
                    old_session = self._sessions[client_session.client_id]
                    await old_session[1].handle_connection_closed()
                    await old_session[1].stop()
                    break
                self.logger.warning(
                    f"Client {client_session.client_id} is reconnecting too quickly, make it wait"
                )
                await asyncio.sleep(1)
        handler.attach(client_session, reader, writer)
        self._sessions[client_session.client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(authenticated)
        if not authenticated:
            await writer.close()
            return
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED,
            client_id=client_session.client_id,
            client_session=client_session,
        )
        await handler.start()
        await self._publish_session_retained_messages(client_session)
        for topic_filter in self._subscriptions.filters_of(client_session.client_id):
            await self._publish_retained_messages_for_subscription(
                (topic_filter, QOS_0), client_session
            )
        await self._client_message_loop(client_session, handler)

    # -- sessions that ended -------------------------------------------------------------------

    async def _session_monitor(self) -> None:
        """Upstream's ``Broker._session_monitor`` (once a second, forget ended clean sessions and
        persistent ones past their expiry), with its clean-up step in ``_expire_sessions``."""
        while True:
            await self._expire_sessions()
            await asyncio.sleep(1)

    async def _expire_sessions(self) -> None:
        """Upstream lists the client ids to forget, then cleans them up one by one across
        awaits, each by client id: a device that reconnected meanwhile under the same id (an
        enrollee becoming operational does, milliseconds later) lost its new, live session.
        Here each entry is forgotten only if it is still the session that was listed, and
        still disconnected."""
        expiry = self.config.session_expiry_interval
        retain_after = floor(time.time() - expiry) if expiry is not None else None
        ended = [
            (client_id, session)
            for client_id, (session, _) in list(self._sessions.items())
            if session.transitions.state == "disconnected"
            and (
                session.is_anonymous
                or session.clean_session
                or (
                    retain_after is not None
                    and session.last_disconnect_time
                    and session.last_disconnect_time < retain_after
                )
            )
        ]
        for client_id, session in ended:
            entry = self._sessions.get(client_id)
            if entry is not None and entry[0] is session and not session.transitions.is_connected():
                await self._cleanup_session(client_id)

    # -- retained messages --------------------------------------------------------------------

    def has_subscribers(self, topic: str) -> bool:
        """Whether a message on ``topic`` would reach anyone (offline persistent sessions
        included)."""
        return bool(self._subscriptions.matching(topic, self._matches))

    def _subscribed(self, session: Session, topic_filter: str) -> bool:
        return any(
            s.client_id == session.client_id for s, _ in self._subscriptions.get(topic_filter, ())
        )

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter, qos = subscription
        handler = self._get_handler(session)
        if handler is None or not self._subscribed(session, topic_filter):
            return
        tasks = []
        if is_wildcard(topic_filter):
            candidates = list(self._retained_messages.items())
        else:
            # an exact filter matches its own topic only: one lookup, not a walk of every
            # retained message (devices may retain their state: thousands of them)
            exact = self._retained_messages.get(topic_filter)
            candidates = [(topic_filter, exact)] if exact is not None else []
        for topic, retained in candidates:
            if not self._matches(topic, topic_filter):
                continue
            if not await self._topic_filtering(session, topic=topic, action=AmqttAction.RECEIVE):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(
                        retained.topic, retained.data, min(qos, retained.qos or qos), retain=True
                    )
                )
            )
        if tasks:
            await asyncio.wait(tasks)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        handler = self._get_handler(session)
        if handler is None:
            return
        tasks = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            # the state may have changed while the client was away (quarantine, revocation)
            if not await self._topic_filtering(
                session, topic=queued.topic, action=AmqttAction.RECEIVE
            ):
                continue
            tasks.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=True)
                )
            )
        if tasks:
            await asyncio.wait(tasks)


_DISCONNECT_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_DISCONNECT_WORDS = (
    "ConnectionResetError",
    "BrokenPipeError",
    # asyncio, when a TLS peer hangs up in the instant its handshake completes (scanners)
    "returning true from eof_received() has no effect when using ssl",
)


class QuietDisconnects(logging.Filter):
    """Drops log records about a peer disconnecting: normal for a broker, not worth a line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, _DISCONNECT_ERRORS):
            return False
        message = record.getMessage()
        return not any(words in message for words in _DISCONNECT_WORDS)


# Filters on a logger do not apply to records of its children, so each amqtt logger that
# reports peer disconnects gets one.
_NOISY_LOGGERS = (
    "amqtt",
    "amqtt.broker",
    "amqtt.adapters",
    "amqtt.mqtt.protocol.handler",
    "amqtt.mqtt.protocol.broker_handler",
    "amqtt.broker.plugins",
    "asyncio",
)
_QUIET = QuietDisconnects()


def install_quiet_disconnects() -> None:
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
    # amqtt's session state machine (the transitions library) logs three INFO lines per
    # connect and disconnect; left alone unless someone configured that logger on purpose.
    transitions = logging.getLogger("transitions")
    if transitions.level == logging.NOTSET:
        transitions.setLevel(logging.WARNING)
