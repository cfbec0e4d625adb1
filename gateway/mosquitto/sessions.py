"""Who is connected to Mosquitto, read from its own log notices. Pure: fed one line at a time.

Mosquitto 2.0 has no interface that lists connected clients (``$SYS`` only counts them, and
dynsec knows accounts, not sessions). Its connection notices do name each one::

    New connection from 127.0.0.1:49519 on port 18831.
    New client connected from 127.0.0.1:49519 as devA (p2, c1, k60, u'devA').
    Client devA disconnected.

The first line gives the listener (by port), the second the client id and username (a bridge
that announced itself with ``try_private`` gets "New bridge connected" instead), and the
disconnect notices end the session. With ``log_dest topic`` the broker publishes these on
``$SYS/broker/log/N``, which the gateway's admin client follows. It is approximate: notices
sent while the admin connection was down are missed, and the set is empty after a restart of
the gateway until clients reconnect (a restart of the broker empties it truly).

A client id that connects again while its session is live takes that session over: Mosquitto
closes the older connection and keeps the new one. It logs "Client X already connected, closing
old connection." at *error* level (not on the notice topic), then the new connection's
"New client connected" notice, and no disconnect notice for the old connection (verified on
2.0.11). So a "connected" notice for a client id that is live already is the takeover.

``feed`` returns what a line changed: ``Connected`` (with the session it replaced, if any: the
broker judges whether a takeover is a clone) or ``Disconnected``; the broker turns these into
the gateway's connected/disconnected events.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from gateway.mosquitto.log_lines import MAX_PENDING, NEW_CONNECTION, log_text, logged_peer

__all__ = ["Connected", "Disconnected", "Session", "SessionTracker"]

_CONNECTED = re.compile(
    r"^New (?:client|bridge) connected from (?P<address>\S+) as (?P<client>.+)"
    r" \(p\d+, c\d+, k\d+(?:, u'(?P<username>.*)')?\)\.$"
)
_TAKEOVER = re.compile(r"^Client .+ already connected, closing old connection\.$")
_DISCONNECTED = re.compile(
    r"^Client (?P<client>.+?) (?:disconnected|closed its connection|been disconnected"
    r"|has exceeded timeout)"
)
_SOCKET_ERROR = re.compile(r"^Socket error on client (?P<client>.+?), disconnecting\.$")


@dataclass(frozen=True)
class Session:
    client_id: str
    port: int | None  # the listener's port; None when the connection line was missed
    username: str | None
    address: str  # "host:port"; "[host]:port" for IPv6, as the embedded broker writes one

    def __post_init__(self) -> None:
        # Mosquitto logs an IPv6 peer unbracketed ("::1:50106"): rewritten once, here, so every
        # reader (the callbacks, the observer, clone judgement) gets the form remote_host reads
        object.__setattr__(self, "address", logged_peer(self.address))


@dataclass(frozen=True)
class Connected:
    """``session`` began. ``replaced``: the live session of the same client id that Mosquitto
    closed for it (a takeover), else None."""

    session: Session
    replaced: Session | None = None


@dataclass(frozen=True)
class Disconnected:
    """``session`` ended."""

    session: Session


class SessionTracker:
    def __init__(self) -> None:
        self._pending: OrderedDict[str, int] = OrderedDict()
        self._sessions: dict[str, Session] = {}

    def feed(self, line: str) -> Connected | Disconnected | None:
        """Take one log line (with or without its timestamp); unknown lines are ignored.
        Returns the session that began or ended with it, else None."""
        text = log_text(line)
        if (match := NEW_CONNECTION.match(text)) is not None:
            self._pending[match["address"]] = int(match["port"])
            self._pending.move_to_end(match["address"])
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        elif (match := _CONNECTED.match(text)) is not None:
            address = match["address"]
            session = Session(
                client_id=match["client"],
                port=self._pending.pop(address, None),
                username=match["username"],
                address=address,
            )
            previous = self._sessions.get(session.client_id)
            self._sessions[session.client_id] = session
            return Connected(session, previous)
        elif _TAKEOVER.match(text) is not None:
            # logged at error level, so normally not fed; the "connected" notice that follows
            # is what reports the takeover
            return None
        elif (match := _DISCONNECTED.match(text) or _SOCKET_ERROR.match(text)) is not None:
            # "<unknown>": a connection that never completed its CONNECT
            ended = self._sessions.pop(match["client"], None)
            if ended is not None:
                return Disconnected(ended)
        return None

    def clear(self) -> list[Session]:
        """The broker restarted: nobody is connected. Returns the sessions that were."""
        ended = list(self._sessions.values())
        self._pending.clear()
        self._sessions.clear()
        return ended

    def sessions(self) -> dict[str, Session]:
        return dict(self._sessions)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._sessions
