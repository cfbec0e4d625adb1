"""Reading an MQTT 3.1.1 CONNECT before the broker sees it, and handing the stream on.

The gateway decides who may connect before amqtt does, because amqtt 0.12.1 acts on a CONNECT
before authenticating it: a clean-session CONNECT deletes the existing session of that client
id (its subscriptions go) and a persistent one takes over the live connection. Admitting in
front of amqtt means an unauthenticated client can never touch another client's session.

The CONNECT is parsed here (strictly: UTF-8 without NUL, flags consistent, bounded size), the
bytes are kept, and ``ReplayReader`` gives amqtt the very same bytes followed by the rest of
the stream.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter

from gateway.broker.ingress import IngressMeter

__all__ = [
    "CONNECT_MAX_BYTES",
    "ConnackCode",
    "ConnectRequest",
    "MalformedConnect",
    "ReplayReader",
    "StreamWriter",
    "connack",
    "parse_connect",
    "read_connect",
]

# Big enough for credentials and a will message, small enough that an unauthenticated peer
# cannot make the broker buffer megabytes.
CONNECT_MAX_BYTES = 64 * 1024
_CONNECT = 1
_MQTT_311 = 4
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class ConnackCode(IntEnum):
    """CONNACK return codes, MQTT 3.1.1 section 3.2.2.3."""

    ACCEPTED = 0
    UNACCEPTABLE_PROTOCOL = 1
    IDENTIFIER_REJECTED = 2
    SERVER_UNAVAILABLE = 3
    BAD_USERNAME_OR_PASSWORD = 4
    NOT_AUTHORIZED = 5


class MalformedConnect(ValueError):
    """The first packet is not a well-formed MQTT CONNECT. ``unsupported_protocol`` is True when
    it is a CONNECT of another protocol version (answered with CONNACK 1, not silence)."""

    def __init__(self, detail: str, *, unsupported_protocol: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.unsupported_protocol = unsupported_protocol


@dataclass(frozen=True)
class ConnectRequest:
    client_id: str
    clean_session: bool
    keep_alive: int
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_message: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False

    @property
    def has_will(self) -> bool:
        return self.will_topic is not None


def connack(code: ConnackCode) -> bytes:
    """A CONNACK refusing (or accepting) without a session present."""
    return bytes((0x20, 0x02, 0x00, int(code)))


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, n: int, what: str) -> bytes:
        if self._at + n > len(self._data):
            raise MalformedConnect(f"CONNECT ends inside {what}")
        chunk = self._data[self._at : self._at + n]
        self._at += n
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(what), what)

    def text(self, what: str) -> str:
        raw = self.binary(what)
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedConnect(f"{what} is not UTF-8") from None
        if "\x00" in value:  # [MQTT-1.5.3-2]
            raise MalformedConnect(f"{what} contains U+0000")
        return value

    @property
    def remaining(self) -> int:
        return len(self._data) - self._at


def parse_connect(body: bytes) -> ConnectRequest:
    """Parse the variable header and payload of a CONNECT (everything after the fixed header)."""
    cursor = _Cursor(body)
    protocol = cursor.binary("protocol name")
    level = cursor.u8("protocol level")
    if protocol != b"MQTT":
        # MQTT 3.1 ("MQIsdp") and garbage alike: answer 1 only to something that says MQTT-ish
        raise MalformedConnect(
            f"protocol name {protocol[:16]!r} is not MQTT",
            unsupported_protocol=protocol == b"MQIsdp",
        )
    if level != _MQTT_311:
        raise MalformedConnect(
            f"protocol level {level} is not 4 (MQTT 3.1.1)", unsupported_protocol=True
        )
    flags = cursor.u8("connect flags")
    keep_alive = cursor.u16("keep alive")
    if flags & 0x01:
        raise MalformedConnect("reserved connect flag is set")  # [MQTT-3.1.2-3]
    clean_session = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    password_flag = bool(flags & 0x40)
    username_flag = bool(flags & 0x80)
    if will_qos == 3:
        raise MalformedConnect("will QoS 3 is not a QoS")
    if not will_flag and (will_qos or will_retain):
        raise MalformedConnect("will QoS or retain set without a will")  # [MQTT-3.1.2-13/15]
    if password_flag and not username_flag:
        raise MalformedConnect("password without user name")  # [MQTT-3.1.2-22]
    client_id = cursor.text("client id")
    will_topic = will_message = None
    if will_flag:
        will_topic = cursor.text("will topic")
        will_message = cursor.binary("will message")
    username = cursor.text("user name") if username_flag else None
    password = cursor.binary("password") if password_flag else None
    if cursor.remaining:
        raise MalformedConnect(f"{cursor.remaining} bytes after the CONNECT payload")
    return ConnectRequest(
        client_id=client_id,
        clean_session=clean_session,
        keep_alive=keep_alive,
        username=username,
        password=password,
        will_topic=will_topic,
        will_message=will_message,
        will_qos=will_qos,
        will_retain=will_retain,
    )


async def read_connect(
    reader: asyncio.StreamReader, max_bytes: int = CONNECT_MAX_BYTES
) -> tuple[bytes, ConnectRequest]:
    """Read exactly one CONNECT packet; returns its raw bytes (to replay) and its parse.

    Raises ``MalformedConnect`` for anything else and ``asyncio.IncompleteReadError`` when the
    peer goes away first.
    """
    first = await reader.readexactly(1)
    if first[0] >> 4 != _CONNECT or first[0] & 0x0F:
        raise MalformedConnect(f"first packet has type byte 0x{first[0]:02x}, not CONNECT")
    length = 0
    length_bytes = bytearray()
    for shift in range(0, 28, 7):
        byte = (await reader.readexactly(1))[0]
        length_bytes.append(byte)
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
    else:
        raise MalformedConnect("remaining length longer than 4 bytes")
    if length > max_bytes:
        raise MalformedConnect(f"CONNECT of {length} bytes exceeds {max_bytes}")
    body = await reader.readexactly(length)
    return first + bytes(length_bytes) + body, parse_connect(body)


class ReplayReader(ReaderAdapter):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    """amqtt's view of a connection: the CONNECT already read, then the live stream.

    Also a guard: a single read larger than ``max_read`` (amqtt reads a PUBLISH payload in one
    read of its announced size, up to 256 MB) ends the stream instead of buffering it; and
    ``on_end`` runs when the stream ends for any reason other than our own close, before amqtt
    decides whether to publish the client's will.

    With ``sock`` (the connection's TCP socket), a read about to wait for the peer first
    acknowledges what the peer sent so far (``TCP_QUICKACK``, Linux). A client without
    TCP_NODELAY (lwIP and many device stacks) holds a packet written right after a small one
    (a PUBACK, then the next request) until that small one is acknowledged, and a Linux
    receiver that has nothing to answer delays its acknowledgement by up to 40 ms: measured
    here, 43 ms of a 66 ms enrollment. Asking for the acknowledgement while waiting removes the
    stall at the cost of one system call per wait.

    With an ``ingress`` meter, the live stream's bytes are charged to the connection's budget
    (``gateway.broker.ingress``); a connection over budget waits before its next read (the
    wait comes before the read, so amqtt cancelling a read on its own timeout loses no byte)
    and ``on_throttled(seconds)`` is told. The replayed CONNECT is not charged.
    """

    def __init__(
        self,
        replay: bytes,
        reader: asyncio.StreamReader,
        *,
        max_read: int | None = None,
        on_end: Callable[[], None] | None = None,
        ingress: IngressMeter | None = None,
        on_throttled: Callable[[float], None] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._replay = replay
        self._reader = reader
        self._max_read = max_read
        self._on_end = on_end
        self._ingress = ingress
        self._on_throttled = on_throttled
        self._resume_at = 0.0  # monotonic time before which the next read waits
        self._sock = sock if _QUICKACK is not None else None
        self._ended = False
        self._refused_read = False
        # monotonic time of the last bytes from the peer (keep-alive enforcement)
        self.last_activity = time.monotonic()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            if self._on_end is not None:
                self._on_end()

    async def read(self, n: int = -1) -> bytes:
        if self._replay:
            if n < 0:
                chunk, self._replay = self._replay, b""
                return chunk
            chunk, self._replay = self._replay[:n], self._replay[n:]
            if len(chunk) == n:
                return chunk
            return chunk + await self.read(n - len(chunk))
        if self._refused_read:
            return b""
        if self._max_read is not None and n > self._max_read:
            # From here on the stream reads as closed: amqtt would otherwise carry on parsing
            # the oversized payload's bytes as packets.
            self._refused_read = True
            self._end()
            return b""
        if self._resume_at:
            await self._wait_for_budget()
        if self._sock is not None and not getattr(self._reader, "_buffer", True):
            self._acknowledge()
        try:
            data = await (self._reader.read(n) if n < 0 else self._reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            self._end()
            raise
        if data:
            self.last_activity = now = time.monotonic()
            if self._ingress is not None:
                wait = self._ingress.charge(data, now)
                if wait > 0:
                    self._resume_at = now + wait
        else:
            self._end()
        return data

    def _acknowledge(self) -> None:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[union-attr,arg-type]
        except OSError:
            self._sock = None  # not a TCP socket after all, or gone: stop asking

    async def _wait_for_budget(self) -> None:
        delay = self._resume_at - time.monotonic()
        if delay > 0:
            if self._on_throttled is not None:
                self._on_throttled(delay)
            await asyncio.sleep(delay)  # cancelled here (amqtt's timeout): still owed next time
        self._resume_at = 0.0

    def feed_eof(self) -> None:
        self._reader.feed_eof()


class StreamWriter(StreamWriterAdapter):  # type: ignore[misc]  # amqtt's classes are untyped for mypy here
    """amqtt's writer over our stream; ``abort`` cuts the connection at once (kick)."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._stream = writer

    def abort(self) -> None:
        self.is_closed = True
        transport = self._stream.transport
        if transport is not None:
            transport.abort()
