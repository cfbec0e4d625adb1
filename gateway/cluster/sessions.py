"""Who is connected, asked of the leader.

Only the leader reads the broker's connection notices: every notice of the fleet costs each
reader an MQTT message, and only the leader acts on them (docs/scale-out.md). A gateway that
does not lead and must say who is connected (the admin API's fleet list, identity detail,
operators) asks the leader: a question on ``SESSIONS_ASK_TOPIC`` naming the asker and a fresh
id, the leader's answer on the asker's own topic (``answer_topic``). No answer within the
timeout, a moment without a leader, is ``ClusterError(NO_LEADER)``.

Both messages travel on the internal listener, which only the gateways' accounts reach; a
malformed one is dropped, logged and counted by the side that received it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import aiomqtt

from gateway.acl import Principal
from gateway.cluster.errors import ClusterError, ClusterReason
from gateway.protocol import topics
from gateway.transport import Message, Outgoing

__all__ = [
    "SESSIONS_ASK_TOPIC",
    "SessionsAsker",
    "answer",
    "answer_topic",
    "parse_answer",
    "parse_question",
    "question",
]

log = logging.getLogger(__name__)

SESSIONS_ASK_TOPIC = f"{topics.PREFIX}/cluster/sessions/ask"
_ANSWER_PREFIX = f"{topics.PREFIX}/cluster/sessions/to"
_MAX_QUESTION = 512
# a session is under 200 bytes as JSON: room for a fleet of 100,000 and more
_MAX_ANSWER = 32 * 1024 * 1024
ASK_TIMEOUT_SECONDS = 3.0


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except RecursionError:  # nested deeper than the parser goes: no message of ours
        raise ValueError("nested too deep") from None


def answer_topic(node: str) -> str:
    """Where the leader answers ``node`` (a node name has no '/', '+' or '#')."""
    return f"{_ANSWER_PREFIX}/{node}"


def _ask_id(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise ValueError("no question id")
    return value


def question(node: str, ask_id: str) -> Outgoing:
    body = json.dumps({"from": node, "id": ask_id}, separators=(",", ":")).encode()
    return Outgoing(SESSIONS_ASK_TOPIC, body, qos=1)


def parse_question(payload: bytes) -> tuple[str, str]:
    """(asking node, question id); ValueError for anything else."""
    if len(payload) > _MAX_QUESTION:
        raise ValueError("question too large")
    data = _json(payload)
    if not isinstance(data, dict):
        raise ValueError("a question is a JSON object")
    node = data.get("from")
    if not isinstance(node, str) or not node or any(c in node for c in "/+#"):
        raise ValueError("no asking node")
    return node, _ask_id(data.get("id"))


def answer(node: str, ask_id: str, sessions: dict[str, Principal]) -> Outgoing:
    rows = [[client_id, p.kind, p.name, p.listener] for client_id, p in sessions.items()]
    body = json.dumps({"id": ask_id, "sessions": rows}, separators=(",", ":")).encode()
    return Outgoing(answer_topic(node), body, qos=1)


def parse_answer(payload: bytes) -> tuple[str, dict[str, Principal]]:
    """(question id, client id -> principal); ValueError for anything else."""
    if len(payload) > _MAX_ANSWER:
        raise ValueError("answer too large")
    data = _json(payload)
    if not isinstance(data, dict) or not isinstance(data.get("sessions"), list):
        raise ValueError("an answer is a JSON object with a list of sessions")
    sessions: dict[str, Principal] = {}
    for row in data["sessions"]:
        if not (isinstance(row, list) and len(row) == 4 and all(isinstance(v, str) for v in row)):
            raise ValueError(f"a session is four strings, not {str(row)[:80]}")
        client_id, kind, name, listener = row
        try:
            sessions[client_id] = Principal(kind, name, listener)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"session {client_id[:64]!r}: {exc}") from None
    return _ask_id(data.get("id")), sessions


Publish = Callable[[Outgoing], Awaitable[None]]


class SessionsAsker:
    """A follower's side: asks, and takes the answers on its own topic (an inline transport
    route). ``metrics`` counts ``asked``, ``answered``, ``unanswered``, ``bad_answer`` and
    ``late_answer`` (one that came after its asker gave up)."""

    def __init__(self, node: str, timeout: float = ASK_TIMEOUT_SECONDS) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.node = node
        self._timeout = timeout
        self._waiting: dict[str, asyncio.Future[dict[str, Principal]]] = {}
        self.metrics: Counter[str] = Counter()

    @property
    def topic(self) -> str:
        return answer_topic(self.node)

    async def ask(self, publish: Publish) -> dict[str, Principal]:
        """The leader's session table; ClusterError(NO_LEADER) when none answers in time."""
        ask_id = secrets.token_hex(8)
        future: asyncio.Future[dict[str, Principal]] = asyncio.get_running_loop().create_future()
        self._waiting[ask_id] = future
        self.metrics["asked"] += 1
        try:
            await publish(question(self.node, ask_id))
            return await asyncio.wait_for(future, self._timeout)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            self.metrics["unanswered"] += 1
            raise ClusterError(
                ClusterReason.NO_LEADER,
                f"no leader said who is connected within {self._timeout} s",
            ) from exc
        finally:
            self._waiting.pop(ask_id, None)

    def handle_answer(self, topic: str, payload: bytes) -> Sequence[Message]:
        try:
            ask_id, sessions = parse_answer(payload)
        except ValueError as exc:
            self.metrics["bad_answer"] += 1
            log.warning("ignored an answer about sessions: %s", exc)
            return []
        future = self._waiting.get(ask_id)
        if future is None or future.done():
            self.metrics["late_answer"] += 1
            return []
        self.metrics["answered"] += 1
        future.set_result(sessions)
        return []
