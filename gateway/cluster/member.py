"""What one gateway of several needs from the cluster: a name, the shared broker, the leader
election and the leader's enforcement announcements. ``gateway.service.Gateway`` takes a
``ClusterMember`` and asks it who leads; the decisions of what a leader does stay there."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from gateway.acl import Principal
from gateway.cluster.election import LeaderLock, Leadership, PostgresLeaderLock
from gateway.cluster.enforced import ENFORCED_TOPIC, EnforcementWatch, announcement
from gateway.cluster.errors import ClusterError, ClusterReason
from gateway.cluster.names import NODE_NAME, NODE_NAME_RULE
from gateway.cluster.sessions import SESSIONS_ASK_TOPIC, SessionsAsker, answer, parse_question
from gateway.cluster.shared_broker import SharedBroker, SharedBrokerControl, load_shared_broker
from gateway.config import Settings
from gateway.observe import Observer
from gateway.protocol import topics
from gateway.transport import Message, MqttTransport, Outgoing, Route
from pki.clock import Clock

__all__ = ["SHARE_GROUP", "ClusterMember", "default_node_name"]

log = logging.getLogger(__name__)

SHARE_GROUP = "fleetgate"
"""Shared-subscription group of every gateway: ``$share/fleetgate/<request filter>``."""

BROKER_COMMAND_TIMEOUT = 30.0


def default_node_name() -> str:
    """host-pid: unique among the gateways of one machine and across machines."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40].strip("-.") or "host"
    return f"{host}-{os.getpid()}"


class ClusterMember:
    """One gateway's membership. ``lock`` and ``shared`` default to the PostgreSQL advisory
    lock on the registry's database and ``<home>/cluster/broker.json``.

    ``ClusterError(NEEDS_POSTGRESQL)`` when the registry is not PostgreSQL (the leader lock
    lives there), ``NO_SHARED_BROKER`` / ``BAD_SHARED_BROKER`` when the descriptor is missing.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        node: str | None = None,
        lock: LeaderLock | None = None,
        shared: SharedBroker | None = None,
        interval: float = 1.0,
        enforce_timeout: float = 10.0,
    ) -> None:
        name = node if node is not None else default_node_name()
        if not isinstance(name, str) or NODE_NAME.fullmatch(name) is None:
            raise ValueError(f"node name {name!r}: {NODE_NAME_RULE}")
        if not enforce_timeout > 0:
            raise ValueError("enforce_timeout must be positive")
        self.node = name
        # a name of its own (--node) is the same at every start; a generated one (host-pid) is
        # new at each, and what is kept under it (its metrics file) is no one's after a stop
        self.node_given = node is not None
        self._lock = lock if lock is not None else PostgresLeaderLock(settings.database)
        self.shared = shared if shared is not None else load_shared_broker(settings.home)
        self._interval = interval
        self._enforce_timeout = enforce_timeout
        self.watch = EnforcementWatch()
        self._leadership: Leadership | None = None
        self._control: SharedBrokerControl | None = None
        self._asker = SessionsAsker(name)
        # bad_question: a malformed question about sessions, dropped
        self.metrics: Counter[str] = Counter()

    @property
    def is_leader(self) -> bool:
        return self._leadership is not None and self._leadership.is_leader

    @property
    def client_id(self) -> str:
        """The MQTT client id of this gateway's message client (one per gateway: a shared id
        would make the broker drop one gateway's session for the other's)."""
        return f"fleetgate-{self.node}"

    @property
    def account(self) -> str:
        """This gateway's message-client account on the shared broker."""
        return f"_fg_gw-{self.node}"

    def broker(
        self,
        *,
        clock: Clock,
        on_clone: Callable[[Principal, str, str], None] | None,
        observer: Observer | None = None,
        on_connect: Callable[[Principal, str], None] | None = None,
        on_disconnect: Callable[[Principal], None] | None = None,
    ) -> SharedBrokerControl:
        """This gateway's control of the shared broker. Its admin connection follows the
        broker's connection notices only while this gateway leads (see ``connected``); only
        the leader reacts to a clone."""

        def leader_only(principal: Principal, first: str, second: str) -> None:
            if self.is_leader and on_clone is not None:
                on_clone(principal, first, second)

        self._control = SharedBrokerControl(
            self.shared,
            internal_username=self.account,
            clock=clock,
            on_clone=leader_only,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            observer=observer,
            # A broker rewriting a large dynsec file answers late; a gateway that gave up at
            # start would just be one fewer.
            command_timeout=BROKER_COMMAND_TIMEOUT,
            follow_sessions=False,  # until elected
        )
        return self._control

    def routes(self) -> list[Route]:
        return [
            Route(ENFORCED_TOPIC, self.watch.handle, inline=True),
            Route(SESSIONS_ASK_TOPIC, self._answer_question, inline=True),
            Route(self._asker.topic, self._asker.handle_answer, inline=True),
        ]

    async def connected(self, transport: MqttTransport | None) -> dict[str, Principal]:
        """Client id -> who, from the leader's session table: this gateway's own while it
        leads, else the leader's answer (ClusterError(NO_LEADER) if none comes in time)."""
        control = self._control
        if control is None:
            return {}
        if self.is_leader:
            return control.connected()
        if transport is None:
            raise ClusterError(ClusterReason.NO_LEADER, "this gateway is not connected")
        return await self._asker.ask(transport.publish)

    @property
    def asked(self) -> Counter[str]:
        """What the questions this gateway asked the leader came to (``SessionsAsker``)."""
        return self._asker.metrics

    def _answer_question(self, topic: str, payload: bytes) -> Sequence[Message]:
        """Every gateway hears each question; the leader answers it."""
        if not self.is_leader or self._control is None:
            return []
        try:
            node, ask_id = parse_question(payload)
        except ValueError as exc:
            self.metrics["bad_question"] += 1
            log.warning("ignored a question about sessions: %s", exc)
            return []
        reply: Outgoing = answer(node, ask_id, self._control.connected())
        return [reply]

    async def start(
        self,
        *,
        on_elected: Callable[[], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
    ) -> None:
        if self._leadership is not None:
            raise RuntimeError("already started")

        async def elected() -> None:
            if self._control is not None:  # the leader's session table starts now
                await self._control.follow_sessions(True)
            await on_elected()

        async def deposed() -> None:
            if self._control is not None:
                await self._control.follow_sessions(False)
            await on_deposed()

        self._leadership = Leadership(
            self._lock, on_elected=elected, on_deposed=deposed, interval=self._interval
        )
        await self._leadership.start()

    async def stop(self) -> None:
        leadership, self._leadership = self._leadership, None
        if leadership is not None:
            await leadership.stop()

    async def announce(self, transport: MqttTransport, seq: int) -> None:
        """Leader: everything up to ``seq`` is in force."""
        self.watch.note(seq)
        await transport.publish(announcement(seq, self.node))

    async def wait_enforced(self, seq: int) -> None:
        """Follower: return once the leader enforced ``seq``; ClusterError(NOT_ENFORCED) after
        the timeout (the change stays recorded and a leader enforces it when there is one)."""
        if not await self.watch.wait(seq, self._enforce_timeout):
            raise ClusterError(
                ClusterReason.NOT_ENFORCED,
                f"audit event {seq} is recorded, but no leader confirmed enforcing it within "
                f"{self._enforce_timeout} s",
            )

    async def step_down(self, transport: MqttTransport | None) -> None:
        """Lost the lead: stop re-sending the leader's retained messages after a reconnect."""
        if transport is not None:
            transport.forget(ENFORCED_TOPIC)
            transport.forget(topics.CRL_TOPIC)
