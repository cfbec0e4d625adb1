"""How far the leader has enforced the registry, told to the other gateways over MQTT.

Every state change appends to the audit chain in its own transaction, so an audit sequence
number names a point in the registry's history. After each round of enforcement the leader
publishes, retained, the head it enforced up to; a gateway that changed a state itself (an
operator acting through it) waits until the leader announces a number at least as high as the
change's, so "revoked" still means "cut on the broker" when its call returns, without the
follower touching the broker and doing the change a second time.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence

from gateway.protocol import topics
from gateway.transport import Message, Outgoing

__all__ = ["ENFORCED_TOPIC", "EnforcementWatch", "announcement", "parse_announcement"]

log = logging.getLogger(__name__)

ENFORCED_TOPIC = f"{topics.PREFIX}/cluster/enforced"
"""Retained; only gateways (the internal account) may publish or read it."""

_MAX_PAYLOAD = 1024


def announcement(seq: int, leader: str) -> Outgoing:
    """The leader's message: everything up to audit ``seq`` is in force on the broker."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("seq must be an int >= 0")
    body = json.dumps({"seq": seq, "leader": leader}, separators=(",", ":")).encode()
    return Outgoing(ENFORCED_TOPIC, body, qos=1, retain=True)


def parse_announcement(payload: bytes) -> int:
    """The sequence number announced; ValueError for anything else."""
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError("announcement too large")
    data = json.loads(payload)
    seq = data.get("seq") if isinstance(data, dict) else None
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"no sequence number in {payload[:80]!r}")
    return seq


class EnforcementWatch:
    """The highest sequence number announced, and waiters for a given one."""

    def __init__(self) -> None:
        self._seq = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def seq(self) -> int:
        return self._seq

    def handle(self, topic: str, payload: bytes) -> Sequence[Message]:
        """Inline transport route for ``ENFORCED_TOPIC``; answers nothing."""
        try:
            self.note(parse_announcement(payload))
        except ValueError as exc:
            log.warning("ignored an enforcement announcement: %s", exc)
        return []

    def note(self, seq: int) -> None:
        """Record an announcement. Only ever moves forward: a deposed leader's late message,
        or its retained one replayed after a reconnect, cannot take back a newer one."""
        if seq <= self._seq:
            return
        self._seq = seq
        waiting = []
        for wanted, future in self._waiters:
            if wanted <= seq:
                if not future.done():
                    future.set_result(None)
            else:
                waiting.append((wanted, future))
        self._waiters = waiting

    async def wait(self, seq: int, timeout: float) -> bool:
        """True once everything up to ``seq`` is enforced; False after ``timeout`` seconds."""
        if seq <= self._seq:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return True
