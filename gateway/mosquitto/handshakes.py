"""Connections Mosquitto turned away during the TLS handshake, read from its log. Pure: fed one
line at a time.

A refused handshake on a TLS listener shows in Mosquitto 2.0.11's log as (verified; the second
line is at *error* level, on ``$SYS/broker/log/E``, the others on the notice topic)::

    New connection from 127.0.0.3:54465 on port 33277.
    OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed
    Client <unknown> disconnected: Protocol error.

and one refused at once, before it is counted as a connection (a client speaking plain MQTT to
the TLS port)::

    Client connection from 127.0.0.6 failed: error:0A00010B:SSL routines::wrong version number.

What the log does not tell:

- which connection an ``OpenSSL Error`` belongs to: it names none. ``feed`` gives it to the
  oldest connection on a TLS port still in its handshake (no "New client connected" yet), which
  is exact while handshakes do not overlap; when several were under way, ``candidates`` says how
  many and the address may be another of them.
- why a certificate failed verification: OpenSSL reports "certificate verify failed" alike for
  a CA we do not trust, a revoked certificate and an expired one, so all three are
  ``certificate_invalid`` here (the embedded broker tells them apart: ``unknown_ca``,
  ``certificate_revoked``, ``certificate_expired``).
- anything of the certificate itself (subject, issuer, fingerprint): Mosquitto never logs it.

Reason codes are ``gateway.broker.refusals.RefusalReason`` values, the embedded broker's where
they mean the same.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.broker.refusals import RefusalReason, remote_host
from gateway.mosquitto.log_lines import MAX_PENDING, NEW_CONNECTION, log_text, logged_peer

__all__ = ["HandshakeRefused", "HandshakeWatch", "refusal_reason"]

_CONNECTED = re.compile(r"^New (?:client|bridge) connected from (?P<address>\S+) as ")
_OPENSSL_ERROR = re.compile(r"^OpenSSL Error\[(?P<index>\d+)\]: (?P<error>.*)$")
# a connection that never completed its CONNECT has no client id yet
_UNKNOWN_ENDED = re.compile(r"^Client <unknown> ")
_ACCEPT_FAILED = re.compile(r"^Client connection from (?P<host>\S+) failed: (?P<error>.*?)\.?$")
# OpenSSL's "error:<code>:<library>::<reason>" (3.x) or "error:<code>:<lib>:<func>:<reason>"
_ERROR_REASON = re.compile(r"^error:[0-9A-Fa-f]+:(?:[^:]*:){2}(?P<reason>.+)$")

# OpenSSL's reason text -> our code; the first match wins
_REASONS: tuple[tuple[str, RefusalReason], ...] = (
    ("peer did not return a certificate", RefusalReason.NO_CLIENT_CERTIFICATE),
    ("certificate required", RefusalReason.NO_CLIENT_CERTIFICATE),  # TLS 1.3's alert
    ("certificate verify failed", RefusalReason.CERTIFICATE_INVALID),
    ("unexpected eof", RefusalReason.CONNECTION_CLOSED),
)
_CLIENT_ALERT = re.compile(r"^(?:tlsv1|tlsv13|sslv3) alert ")  # the client did not trust us


def refusal_reason(error: str) -> RefusalReason:
    """The reason code for one of OpenSSL's error strings as Mosquitto logs them."""
    match = _ERROR_REASON.match(error.strip())
    text = (match["reason"] if match else error).strip().lower()
    for fragment, reason in _REASONS:
        if fragment in text:
            return reason
    if _CLIENT_ALERT.match(text):
        return RefusalReason.CLIENT_REJECTED_SERVER
    return RefusalReason.TLS_HANDSHAKE_FAILED


def _error_text(error: str) -> str:
    match = _ERROR_REASON.match(error.strip())
    return (match["reason"] if match else error).strip()


@dataclass(frozen=True)
class HandshakeRefused:
    """One refused handshake. ``address``: "host:port" ("[host]:port" for IPv6, as
    ``gateway.broker.refusals.peer_address`` writes it), the host alone when Mosquitto named
    only that, "unknown" when its connection notice was missed; ``port``: the listener's, None
    when unknown; ``candidates``: how many connections were in their handshake on a TLS port
    when it failed (more than 1: the address may be another of them)."""

    address: str
    port: int | None
    reason: RefusalReason
    detail: str
    candidates: int = 1


class HandshakeWatch:
    """Pairs Mosquitto's "New connection" notices with the handshake errors that follow.
    ``tls_ports``: the listeners whose connections start with a TLS handshake."""

    def __init__(self, tls_ports: Iterable[int]) -> None:
        self._tls_ports = frozenset(tls_ports)
        self._pending: OrderedDict[str, int] = OrderedDict()  # address -> port, oldest first
        self._errors: list[str] = []

    def feed(self, line: str) -> HandshakeRefused | None:
        """Take one log line of any level (with or without its timestamp); returns the
        handshake it shows refused, else None."""
        text = log_text(line)
        if (match := _OPENSSL_ERROR.match(text)) is not None:
            if match["index"] == "0":
                self._errors = []
            self._errors.append(match["error"])
            return None
        # OpenSSL's errors belong to the line right after them: a refused handshake's
        # "Client <unknown> ..." follows at once. After any other line (a live session's
        # "Client dev-a disconnected", say) they were that connection's, never a later one's.
        errors, self._errors = self._errors, []
        if (match := NEW_CONNECTION.match(text)) is not None:
            address = logged_peer(match["address"])
            self._pending[address] = int(match["port"])
            self._pending.move_to_end(address)
            while len(self._pending) > MAX_PENDING:
                self._pending.popitem(last=False)
        elif (match := _CONNECTED.match(text)) is not None:
            self._pending.pop(logged_peer(match["address"]), None)  # its handshake succeeded
        elif _UNKNOWN_ENDED.match(text) is not None:
            return self._ended(errors)
        elif (match := _ACCEPT_FAILED.match(text)) is not None:
            return self._accept_failed(match["host"], match["error"])
        return None

    def _in_handshake(self) -> list[tuple[str, int]]:
        return [(a, p) for a, p in self._pending.items() if p in self._tls_ports]

    def _ended(self, errors: list[str]) -> HandshakeRefused | None:
        """A connection without a client id ended. After OpenSSL errors, it is a refused
        handshake; without, one that went away before its CONNECT (nothing to report, but its
        line leaves the table). Either way the oldest in its handshake is taken to be it."""
        candidates = self._in_handshake()
        address: str = "unknown"  # its "New connection" line was missed
        port: int | None = None
        if candidates:
            address, port = candidates[0]
            del self._pending[address]
        if not errors:
            return None
        reasons = [refusal_reason(e) for e in errors]
        # the first error OpenSSL queued is the cause; a later generic one only follows it
        reason = next((r for r in reasons if r is not RefusalReason.TLS_HANDSHAKE_FAILED),
                      reasons[0])
        detail = "; ".join(_error_text(e) for e in errors)
        return HandshakeRefused(address, port, reason, detail, len(candidates))

    def _accept_failed(self, host: str, error: str) -> HandshakeRefused:
        """Refused at once: the host is named, the port only when its "New connection" line
        came first (the newest one from that host)."""
        for address in reversed(self._pending):
            if remote_host(address) == host:
                port = self._pending.pop(address)
                return HandshakeRefused(address, port, refusal_reason(error), _error_text(error))
        return HandshakeRefused(host, None, refusal_reason(error), _error_text(error))

    def clear(self) -> None:
        """The broker restarted: no handshake is under way."""
        self._pending.clear()
        self._errors = []
