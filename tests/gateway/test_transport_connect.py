"""The gateway's MQTT client gets to a working session even when the broker drops its first
connection before acknowledging it (Mosquitto does that to a session whose account another
gateway of the cluster is setting up at that moment): the attempt is abandoned after
``connect_timeout`` and made again, well within the gateway's start-up wait."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest

from gateway.mosquitto.process import find_mosquitto
from gateway.transport import BrokerAddress, MqttTransport, Route

pytestmark = [pytest.mark.broker]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def broker_port(tmp_path: Path) -> Iterator[int]:
    try:
        binary = find_mosquitto()
    except Exception as exc:  # not installed here
        pytest.skip(f"mosquitto: {exc}")
    port = _free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    process = subprocess.Popen(
        [str(binary), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "mosquitto did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(5)


@pytest.fixture
async def dropping_first(broker_port: int) -> AsyncIterator[tuple[int, list[str]]]:
    """A proxy in front of the broker that reads the first connection's CONNECT and closes it
    unanswered; later connections pass through."""
    seen: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not seen:
            seen.append("dropped")
            await reader.read(1024)  # the CONNECT
            writer.transport.abort()  # a reset, no CONNACK
            return
        seen.append("passed")
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", broker_port)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, seen


def _nothing(topic: str, payload: bytes) -> list[object]:
    return []


async def test_a_connection_dropped_before_its_acknowledgement_is_made_again(
    dropping_first: tuple[int, list[str]],
) -> None:
    port, seen = dropping_first
    transport = MqttTransport(
        BrokerAddress("127.0.0.1", port, client_id="gw-under-test"),
        [Route("fg/v1/test/#", _nothing)],
        max_backoff=0.2,
        connect_timeout=0.5,
    )
    started = time.monotonic()
    try:
        await transport.start(timeout=5)
    finally:
        await transport.stop()
    assert seen[:2] == ["dropped", "passed"]
    assert transport.connections == 1
    assert time.monotonic() - started < 5


def test_the_connect_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MqttTransport(BrokerAddress("127.0.0.1", 1), [], connect_timeout=0)


def _collecting(into: list[str]) -> Callable[[str, bytes], list[object]]:
    """An inline handler that keeps each payload it is given."""

    def take(topic: str, payload: bytes) -> list[object]:
        into.append(payload.decode())
        return []

    return take


async def _reading(device: aiomqtt.Client, device_id: str, text: str) -> None:
    """A device's telemetry reading, and a moment for it to arrive."""
    await device.publish(f"fg/v1/dev/{device_id}/telemetry", text.encode(), qos=1)
    await asyncio.sleep(0.2)


async def test_a_standby_route_receives_only_while_active(broker_port: int) -> None:
    taken: list[str] = []
    take = _collecting(taken)
    transport = MqttTransport(
        BrokerAddress("127.0.0.1", broker_port, client_id="gw-standby"),
        [Route("fg/v1/dev/+/telemetry", take, inline=True, standby=True)],
    )
    await transport.start(timeout=5)
    try:
        async with aiomqtt.Client("127.0.0.1", broker_port, identifier="dev-1") as device:
            await _reading(device, "dev-1", "before")
            await transport.activate("fg/v1/dev/+/telemetry", True)
            await _reading(device, "dev-1", "while active")
            await transport.activate("fg/v1/dev/+/telemetry", False)
            await _reading(device, "dev-1", "after")
        assert taken == ["while active"]
        assert transport.received["fg/v1/dev/+/telemetry"] == 1  # sent only while subscribed
        with pytest.raises(ValueError):
            await transport.activate("fg/v1/other/#", True)  # no such standby route
    finally:
        await transport.stop()


async def test_routes_sharing_a_filter_each_take_the_message(broker_port: int) -> None:
    """The behaviour watch (standby in a cluster) and the admin API's telemetry counter (always
    on) listen to the same filter: leaving the standby one keeps the other's subscription."""
    watched: list[str] = []
    counted: list[str] = []
    watch, count = _collecting(watched), _collecting(counted)
    telemetry = "fg/v1/dev/+/telemetry"
    transport = MqttTransport(
        BrokerAddress("127.0.0.1", broker_port, client_id="gw-shared-filter"),
        [Route(telemetry, watch, inline=True, standby=True), Route(telemetry, count, inline=True)],
    )
    await transport.start(timeout=5)
    try:
        async with aiomqtt.Client("127.0.0.1", broker_port, identifier="dev-2") as device:
            await _reading(device, "dev-2", "one")
            await transport.activate(telemetry, True)
            await _reading(device, "dev-2", "two")
            await transport.activate(telemetry, False)
            await _reading(device, "dev-2", "three")
        assert watched == ["two"]
        assert counted == ["one", "two", "three"]  # never unsubscribed under the counter
        assert transport.received[telemetry] == 3  # each message once
    finally:
        await transport.stop()
