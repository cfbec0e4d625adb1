"""Everything that touches amqtt 0.12.1 internals, in one place (the version is pinned for it).

- ``AuthPlugin`` / ``TopicPlugin``: amqtt builds plugins itself from dotted paths, so they find
  their ``EmbeddedBroker`` through a registry keyed by a per-broker id passed in the plugin
  config.
- ``FilteringBroker``: amqtt's retained-message delivery skips the topic plugins. On every
  connect it sends the new client the retained messages of *every* subscription filter in the
  broker (not only its own), and messages queued for an offline session are delivered without
  a RECEIVE check. Both would hand one device another device's retained messages.
- ``QuietDisconnects``: amqtt logs a traceback each time a peer vanishes mid-write (a refused
  CONNACK, a kicked client); that is normal here and kept out of the logs.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.broker import Broker
from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from gateway.acl import Action

__all__ = [
    "AuthPlugin",
    "FilteringBroker",
    "Gatekeeper",
    "QuietDisconnects",
    "TopicPlugin",
    "install_quiet_disconnects",
    "register",
    "unregister",
]


class Gatekeeper(Protocol):
    """What the plugins ask of the EmbeddedBroker."""

    def authenticate(self, session: Session) -> bool: ...
    def permits(self, session: Session, action: Action, topic: str) -> bool: ...


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


class TopicPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    @dataclass
    class Config:
        broker_key: str = ""

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: AmqttAction | None = None,
    ) -> bool | None:
        gatekeeper = _gatekeeper(self.config.broker_key)
        if gatekeeper is None or session is None or topic is None or action is None:
            return False
        return gatekeeper.permits(session, Action(action.value), topic)


class _SnapshotItems(dict):  # type: ignore[type-arg]  # holds amqtt's own untyped values
    """amqtt 0.12.1 iterates its subscription table in ``_run_broadcast`` across awaits (the
    ACL check is a coroutine); a client subscribing or leaving meanwhile changes the dict's
    size, the broadcast task dies with RuntimeError and the message is lost for every
    subscriber. Iterating a snapshot keeps the delivery going."""

    def items(self):  # type: ignore[no-untyped-def]
        return list(super().items())


class FilteringBroker(Broker):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    """amqtt's Broker with retained delivery held to the client's own subscriptions and to the
    RECEIVE check (see module docstring), and a subscription table safe to change while a
    message is being delivered."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _SnapshotItems(self._subscriptions)  # type: ignore[has-type]

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
        for topic, retained in list(self._retained_messages.items()):
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
