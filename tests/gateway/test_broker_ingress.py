"""The per-connection ingress limit: the budget arithmetic, MQTT packet counting across any
split of the stream, and a flooding client slowed on the real broker while another device is
not."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

import pytest
from test_broker_embedded import (  # the broker test kit: PKI, clients, spy
    Pki,
    connect_packet,
    make_env,
    pki_env,
    spying,
)

from gateway.broker.connect import ReplayReader
from gateway.broker.ingress import IngressLimit, IngressMeter, TokenBucket
from gateway.store import IdentityState

__all__ = ["pki_env"]  # a fixture, imported for the tests below


def publish_packet(topic: str, payload: bytes, packet_id: int | None = None) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode()
    flags = 0x30
    if packet_id is not None:
        flags |= 0x02
        body += struct.pack("!H", packet_id)
    body += payload
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes((flags,)) + bytes(encoded) + body


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        IngressLimit(packets_per_second=0)
    with pytest.raises(TypeError):
        IngressLimit(packet_burst=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        IngressLimit(bytes_per_second=True)


def test_a_bucket_lets_a_burst_through_then_asks_to_wait() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert [bucket.take(1, 100.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1, 100.0) == pytest.approx(0.1)
    assert bucket.take(1, 100.0) == pytest.approx(0.2)
    # refilled by waiting; never above the burst
    assert bucket.take(1, 100.31) == 0.0
    assert bucket.take(10, 1000.0) == pytest.approx(0.5)  # a big take is paid afterwards


def test_packets_are_counted_however_the_stream_is_split() -> None:
    stream = b"".join(
        [
            publish_packet("fg/v1/enroll/d1/req", b"x" * 300, packet_id=1),  # 2-byte length
            bytes((0x40, 0x02, 0x00, 0x01)),  # PUBACK
            bytes((0xC0, 0x00)),  # PINGREQ, empty body
            publish_packet("t", b""),
            publish_packet("fg/v1/dev/d1/telemetry", b"y" * 20_000),  # 3-byte length
        ]
    )
    limit = IngressLimit(packets_per_second=1, packet_burst=1000, byte_burst=10**6)
    for size in (1, 2, 3, 7, 64, len(stream)):
        meter = IngressMeter(limit, 0.0)
        for at in range(0, len(stream), size):
            meter.charge(stream[at : at + size], 0.0)
        # 5 packets taken from a burst of 1000: 995 left, 996 more would cost 1 s
        assert meter.charge(bytes((0xC0, 0x00)) * 996, 0.0) == pytest.approx(1.0), size


def test_a_meter_asks_to_wait_for_whichever_budget_ran_out() -> None:
    limit = IngressLimit(
        packets_per_second=5, packet_burst=2, bytes_per_second=1000, byte_burst=100
    )
    meter = IngressMeter(limit, 0.0)
    assert meter.charge(bytes((0xC0, 0x00)) * 2, 0.0) == 0.0
    assert meter.charge(bytes((0xC0, 0x00)), 0.0) == pytest.approx(0.2)  # packets
    meter = IngressMeter(limit, 0.0)
    assert meter.charge(publish_packet("t", b"z" * 294), 0.0) == pytest.approx(0.2)  # 300 bytes


async def test_an_over_budget_reader_waits_before_its_next_read_and_loses_nothing() -> None:
    stream = asyncio.StreamReader()
    packets = [bytes((0xC0, 0x00))] * 6
    for packet in packets:
        stream.feed_data(packet)
    waits: list[float] = []
    limit = IngressLimit(packets_per_second=20, packet_burst=2)
    reader = ReplayReader(
        b"",
        stream,
        ingress=IngressMeter(limit, time.monotonic()),
        on_throttled=waits.append,
    )
    started = time.monotonic()
    got = [await reader.read(2) for _ in packets]
    elapsed = time.monotonic() - started
    assert got == packets
    # the burst of 2 went through; each packet beyond it makes the *next* read wait 1/20 s
    assert len(waits) == 3
    assert elapsed >= 0.12

    # cancelled while waiting (amqtt's read timeout): no byte is lost, the wait is still owed
    stream.feed_data(packets[0])
    pending = asyncio.ensure_future(reader.read(2))
    await asyncio.sleep(0)
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    assert await reader.read(2) == packets[0]
    assert len(waits) == 5  # the cancelled wait, and the same debt again


@pytest.mark.broker
async def test_a_flooding_client_is_slowed_and_the_others_are_not(pki_env: Pki) -> None:
    env = make_env(
        pki_env, ingress_limit=IngressLimit(packets_per_second=10, packet_burst=10)
    )
    env.states["dev-a"] = IdentityState.ACTIVE
    await env.broker.start()
    try:
        async with spying(env, "fg/v1/#") as spy:
            ctx = env.pki.client_context()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", env.ports["enrollment"], ssl=ctx
            )
            writer.write(connect_packet("dev-flood"))
            assert (await reader.readexactly(4))[3] == 0
            flood = publish_packet("fg/v1/enroll/dev-flood/req", b"hello")
            writer.write(flood * 200)  # QoS 0, all at once
            await writer.drain()
            await asyncio.sleep(0.5)
            # the device's own traffic meanwhile goes straight through
            async with env.device("dev-a") as device:
                await device.publish("fg/v1/dev/dev-a/telemetry", b"t", qos=1)
                await spy.wait_for("fg/v1/dev/dev-a/telemetry")
            flooded = spy.topics().count("fg/v1/enroll/dev-flood/req")
            writer.close()
    finally:
        await env.broker.stop()
    # 10 at once, then 10/s: 15-20 of the 200 in the first second or so (unlimited, amqtt
    # routes all 200 in a few ms); the device got through while the flood was held back
    assert 10 <= flooded < 100, flooded
    assert env.broker.metrics["ingress.throttled"] >= 5
    assert env.broker.metrics["ingress.throttled_ms"] > 0


@pytest.mark.broker
async def test_the_gateways_own_clients_are_not_limited(pki_env: Pki) -> None:
    env = make_env(pki_env, ingress_limit=IngressLimit(packets_per_second=1, packet_burst=1))
    await env.broker.start()
    try:
        async with spying(env, "fg/v1/#") as spy, env.internal("gateway") as gateway:
            for n in range(30):
                await gateway.publish(f"fg/v1/enroll/d{n}/resp", b"r", qos=1)
            await spy.wait_for("fg/v1/enroll/d29/resp", timeout=2)
    finally:
        await env.broker.stop()
    assert env.broker.metrics["ingress.throttled"] == 0


class RecordingSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux only")
async def test_a_read_about_to_wait_acknowledges_what_the_peer_sent() -> None:
    """A client without TCP_NODELAY holds its next packet until its last small one is
    acknowledged; the broker asks for that acknowledgement whenever it waits for the peer
    (not when the bytes it wants are already there)."""
    stream = asyncio.StreamReader()
    sock = RecordingSocket()
    reader = ReplayReader(b"", stream, sock=sock)  # type: ignore[arg-type]
    stream.feed_data(bytes((0xC0, 0x00)) * 2)
    assert await reader.read(2) == bytes((0xC0, 0x00))
    assert await reader.read(2) == bytes((0xC0, 0x00))
    assert sock.options == []  # the bytes were there: nothing to wait for
    pending = asyncio.ensure_future(reader.read(2))
    await asyncio.sleep(0)
    assert sock.options == [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)]
    stream.feed_data(bytes((0xE0, 0x00)))
    assert await pending == bytes((0xE0, 0x00))
