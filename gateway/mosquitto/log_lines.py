"""What the two readers of Mosquitto's log lines (``sessions``, ``handshakes``) share: a line
without its timestamp, the notice of a new connection, and its peer written as the embedded
broker writes one."""

from __future__ import annotations

import re

from gateway.broker.refusals import peer_address

__all__ = ["MAX_PENDING", "NEW_CONNECTION", "log_text", "logged_peer"]

# "<epoch>: " unless log_timestamp_format was changed
_TIMESTAMP = re.compile(r"^\d+: ")
NEW_CONNECTION = re.compile(r"^New connection from (?P<address>\S+) on port (?P<port>\d+)\.$")
# Unanswered "New connection" lines (a failed handshake never gets a "connected" line, a silent
# client never ends its own) are kept only this many, so a flood of them cannot grow a table.
MAX_PENDING = 4096


def log_text(line: str) -> str:
    """One log line (with or without its timestamp and line end) as the notice alone;
    TypeError when ``line`` is no str."""
    if not isinstance(line, str):
        raise TypeError(f"line must be a str, not {type(line).__name__}")
    return _TIMESTAMP.sub("", line.rstrip("\r\n"), count=1)


def logged_peer(address: str) -> str:
    """A peer as Mosquitto logs it, "%s:%d" with an IPv6 host unbracketed ("::1:50106"),
    written as ``peer_address`` writes one ("[::1]:50106"), which ``remote_host`` reads
    unambiguously. Anything else (IPv4, bracketed already, no port) is returned as is."""
    host, sep, port = address.rpartition(":")
    if sep and ":" in host and not host.startswith("[") and port.isdigit():
        return peer_address(host, int(port))
    return address
