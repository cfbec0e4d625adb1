"""Ask the broker, as fast as the wire allows, whether it would admit a device right now.

An MQTT library tells a device that its certificate was refused late: with TLS 1.3 the client
finishes its handshake before the server has judged the client certificate, and aiomqtt then
waits for a CONNACK that never comes until its timeout (10 s by default). A revocation benchmark
needs the moment of refusal, so this speaks just enough MQTT 3.1.1 itself: TLS, CONNECT, and
one SUBSCRIBE to a topic the device needs (Mosquitto admits a client whose dynamic-security
entry was deleted, with no rights at all: for a device that is a refusal too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from enum import StrEnum

__all__ = ["Admission", "admission", "connect_packet", "subscribe_packet"]


class Admission(StrEnum):
    ADMITTED = "admitted"
    TLS_REFUSED = "tls_refused"  # handshake failed or the server closed during it
    CLOSED = "closed"  # the server closed the connection instead of answering CONNECT
    CONNACK_REFUSED = "connack_refused"
    SUBSCRIPTION_REFUSED = "subscription_refused"
    TIMEOUT = "timeout"

    @property
    def refused(self) -> bool:
        return self not in (Admission.ADMITTED, Admission.TIMEOUT)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 30) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, no credentials (the certificate is the credential)."""
    body = _string("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _string(client_id)
    return bytes([0x10]) + _remaining_length(len(body)) + body


def subscribe_packet(topic: str, packet_id: int = 1) -> bytes:
    body = struct.pack("!H", packet_id) + _string(topic) + bytes([1])
    return bytes([0x82]) + _remaining_length(len(body)) + body


async def _packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return first >> 4, await reader.readexactly(length)


async def admission(
    host: str,
    port: int,
    context: ssl.SSLContext,
    client_id: str,
    topic: str,
    *,
    timeout: float = 5.0,
) -> Admission:
    """Connect as ``client_id`` and subscribe to ``topic``; report how far it got."""
    try:
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_connection(host, port, ssl=context)
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                return Admission.TLS_REFUSED
            try:
                writer.write(connect_packet(client_id))
                kind, body = await _packet(reader)
                if kind != 2 or len(body) < 2 or body[1] != 0:
                    return Admission.CONNACK_REFUSED
                writer.write(subscribe_packet(topic))
                kind, body = await _packet(reader)
                if kind != 9 or len(body) < 3 or body[2] >= 0x80:
                    return Admission.SUBSCRIPTION_REFUSED
                writer.write(bytes([0xE0, 0]))  # DISCONNECT
                return Admission.ADMITTED
            except ssl.SSLError:
                return Admission.TLS_REFUSED
            except (ConnectionError, asyncio.IncompleteReadError):
                return Admission.CLOSED
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except TimeoutError:
        return Admission.TIMEOUT
