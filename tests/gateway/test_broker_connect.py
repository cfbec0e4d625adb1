"""The CONNECT the broker reads before amqtt sees it, and the stream it hands on."""

from __future__ import annotations

import asyncio
import struct

import pytest

from gateway.broker.connect import (
    ConnackCode,
    ConnectRequest,
    MalformedConnect,
    ReplayReader,
    connack,
    parse_connect,
    read_connect,
)


def s(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def body(
    flags: int = 0x02,
    payload: bytes = s("dev-a"),
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    keep_alive: int = 60,
) -> bytes:
    return s(name) + bytes((level, flags)) + struct.pack("!H", keep_alive) + payload


def packet(data: bytes) -> bytes:
    length, encoded = len(data), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes((0x10,)) + bytes(encoded) + data


def stream(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def test_parses_every_field() -> None:
    flags = 0x02 | 0x04 | (1 << 3) | 0x20 | 0x40 | 0x80
    payload = s("dev-a") + s("fg/v1/dev/dev-a/state") + s(b"offline") + s("user") + s(b"\xffpw")
    request = parse_connect(body(flags, payload, keep_alive=30))
    assert request == ConnectRequest(
        client_id="dev-a",
        clean_session=True,
        keep_alive=30,
        username="user",
        password=b"\xffpw",
        will_topic="fg/v1/dev/dev-a/state",
        will_message=b"offline",
        will_qos=1,
        will_retain=True,
    )
    assert request.has_will


def test_minimal_connect_has_no_will_and_no_credentials() -> None:
    request = parse_connect(body(0x00, s("")))
    assert (request.client_id, request.clean_session, request.has_will) == ("", False, False)
    assert request.username is None and request.password is None


@pytest.mark.parametrize(
    ("data", "unsupported"),
    [
        (body(name=b"MQIsdp", level=3), True),  # MQTT 3.1
        (body(level=5), True),  # MQTT 5
        (body(name=b"HTTP"), False),
        (body(0x03), False),  # reserved flag
        (body(0x02 | 0x04 | (3 << 3), s("x") + s("t") + s(b"m")), False),  # will QoS 3
        (body(0x02 | (1 << 3)), False),  # will QoS without a will
        (body(0x02 | 0x20), False),  # will retain without a will
        (body(0x02 | 0x40, s("x") + s(b"pw")), False),  # password without user name
        (body(payload=s(b"\xff\xfe")), False),  # client id not UTF-8
        (body(payload=s("a\x00b")), False),  # NUL in client id
        (body(payload=s("dev-a") + b"extra"), False),  # trailing bytes
        (body(payload=b"\x00\x05dev"), False),  # truncated client id
        (body(0x82, s("dev-a")), False),  # user name flag without user name
        (b"\x00", False),
        (b"", False),
    ],
)
def test_malformed_connects_are_refused(data: bytes, unsupported: bool) -> None:
    with pytest.raises(MalformedConnect) as caught:
        parse_connect(data)
    assert caught.value.unsupported_protocol is unsupported
    assert caught.value.detail


async def test_read_connect_returns_the_exact_bytes_to_replay() -> None:
    raw = packet(body())
    reader = stream(raw + b"\xc0\x00", eof=False)  # a PINGREQ follows
    replay, request = await read_connect(reader)
    assert replay == raw and request.client_id == "dev-a"
    assert await reader.readexactly(2) == b"\xc0\x00"  # nothing beyond the CONNECT consumed


async def test_read_connect_handles_multi_byte_lengths() -> None:
    payload = s("dev-a") + s("user") + s(b"p" * 300)
    raw = packet(body(0x02 | 0x80 | 0x40, payload))
    replay, request = await read_connect(stream(raw))
    assert replay == raw and request.password == b"p" * 300


@pytest.mark.parametrize(
    "data",
    [
        b"\x30\x02ab",  # a PUBLISH first
        b"\x11\x00",  # CONNECT with reserved fixed-header flags
        b"GET / HTTP/1.1\r\n",
        b"\x10\xff\xff\xff\xff\x01",  # remaining length of five bytes
    ],
)
async def test_read_connect_refuses_other_first_packets(data: bytes) -> None:
    with pytest.raises(MalformedConnect):
        await read_connect(stream(data))


async def test_read_connect_refuses_an_oversized_connect_before_reading_it() -> None:
    reader = stream(b"\x10\xff\xff\x03", eof=False)  # announces ~64 KiB, sends nothing more
    with pytest.raises(MalformedConnect, match="exceeds"):
        await read_connect(reader, max_bytes=1024)


async def test_read_connect_reports_a_peer_that_leaves_midway() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        await read_connect(stream(packet(body())[:-3]))


async def test_replay_reader_serves_the_replay_then_the_stream() -> None:
    reader = ReplayReader(b"abc", stream(b"defgh"))
    assert await reader.read(2) == b"ab"
    assert await reader.read(3) == b"cde"  # straddles replay and stream
    assert await reader.read(-1) == b"fgh"
    assert await reader.read(-1) == b""


async def test_replay_reader_stops_at_an_oversized_read_and_reports_the_end() -> None:
    ended: list[bool] = []
    reader = ReplayReader(b"", stream(b"x" * 100), max_read=10, on_end=lambda: ended.append(True))
    assert await reader.read(5) == b"xxxxx"
    assert await reader.read(50) == b""  # refused, and the stream reads as closed from now on
    assert await reader.read(1) == b""
    assert ended == [True]


async def test_replay_reader_reports_the_end_of_the_stream_once() -> None:
    ended: list[bool] = []
    reader = ReplayReader(b"", stream(b"ab"), on_end=lambda: ended.append(True))
    before = reader.last_activity
    await asyncio.sleep(0.01)
    assert await reader.read(2) == b"ab"
    assert reader.last_activity > before
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(1)
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(1)
    assert ended == [True]


def test_connack_bytes() -> None:
    assert connack(ConnackCode.NOT_AUTHORIZED) == b"\x20\x02\x00\x05"
    assert connack(ConnackCode.IDENTIFIER_REJECTED) == b"\x20\x02\x00\x02"
