"""Mosquitto killed under load: the gateway's client is back within seconds, devices come back
with backoff and jitter, and no enrollment is lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import pytest

from gateway.protocol.topics import Channel
from gateway.store import CertificateStatus, IdentityState
from simulators import device as sensor_module
from simulators.fleet import FleetOptions, run_fleet

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed"),
]

DEVICES = 40


@dataclass(frozen=True)
class Wait:
    """One wait a sensor chose before reconnecting: after ``in_a_row`` failed connections
    without a working session between them (1 for the first failure)."""

    device: str
    in_a_row: int
    seconds: float
    at: float  # time.monotonic()
    min_backoff: float  # the sensor's settings
    max_backoff: float

    @property
    def base(self) -> float:
        """Exponential backoff: the base doubles with every failure in a row, up to the cap."""
        return min(self.min_backoff * 2.0 ** (self.in_a_row - 1), self.max_backoff)


def watch_reconnect_waits(monkeypatch: pytest.MonkeyPatch) -> list[Wait]:
    """Record every reconnect wait of the simulated sensors, from outside ``simulators``: a
    failed session and the wait that follows run in the sensor's own task."""
    waits: list[Wait] = []
    in_a_row: dict[object, int] = {}
    sensor_of: dict[object, sensor_module.SimulatedSensor] = {}
    session = sensor_module.SimulatedSensor._session
    sleep = sensor_module._sleep_or_stop

    async def watched_session(
        self: sensor_module.SimulatedSensor, channel: Channel, stop: asyncio.Event
    ) -> None:
        task = asyncio.current_task()
        sensor_of[task] = self
        try:
            await session(self, channel, stop)
        except aiomqtt.MqttError:
            in_a_row[task] = in_a_row.get(task, 0) + 1
            raise
        in_a_row[task] = 0

    async def watched_sleep(stop: asyncio.Event, seconds: float) -> None:
        task = asyncio.current_task()
        sensor = sensor_of[task]
        waits.append(
            Wait(
                sensor.device_id,
                in_a_row[task],
                seconds,
                time.monotonic(),
                sensor.options.min_backoff,
                sensor.options.max_backoff,
            )
        )
        await sleep(stop, seconds)

    monkeypatch.setattr(sensor_module.SimulatedSensor, "_session", watched_session)
    monkeypatch.setattr(sensor_module, "_sleep_or_stop", watched_sleep)
    return waits


def check_backoff_and_jitter(waits: list[Wait], killed_at: float) -> None:
    """Each wait is drawn around a base that doubles with every failure in a row (capped), and
    the fleet does not come back in lock-step."""
    assert waits, "no sensor lost its connection: the kill did not reach the fleet"
    for wait in waits:
        assert 0.5 * wait.base - 1e-9 <= wait.seconds <= 1.5 * wait.base + 1e-9, wait
    # The broker comes back after the supervisor's own 0.5 s wait: sensors that retried sooner
    # failed again and waited longer.
    assert any(wait.in_a_row >= 2 for wait in waits), waits
    first = [w for w in waits if w.in_a_row == 1 and w.at >= killed_at]
    assert len(first) >= 5, waits
    seconds = sorted(w.seconds for w in first)
    assert len(set(seconds)) == len(seconds), f"sensors waited the same time: {seconds}"
    assert seconds[-1] - seconds[0] > 0.1 * first[0].base, f"waits bunched: {seconds}"


async def test_mosquitto_killed_mid_enrollment_loses_nothing(
    start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = watch_reconnect_waits(monkeypatch)
    gateway, factory = await start_gateway(broker_kind="mosquitto")
    process = gateway.broker.process
    assert process is not None and process.pid is not None
    first_pid = process.pid
    stop = asyncio.Event()
    options = FleetOptions(
        devices=DEVICES,
        host="127.0.0.1",
        enrollment_port=gateway.ports.enrollment,
        operational_port=gateway.ports.operational,
        ca_pem=gateway.ca_chain_pem(),
        telemetry_interval=1.0,
        concurrency=8,
        progress=False,
    )
    fleet = asyncio.create_task(run_fleet(options, factory, stop))

    def enrolled() -> int:
        return len(gateway.store.list_identities(state=IdentityState.ACTIVE))

    # Kill the broker while the fleet is partway through enrolling.
    deadline = time.monotonic() + 60
    while enrolled() < DEVICES // 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert 0 < enrolled() < DEVICES, "the kill must land mid-enrollment"
    transport = gateway.transport
    assert transport is not None
    connections = transport.connections
    os.kill(first_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    # The supervisor restarts it and the gateway's own client reconnects within 5 s.
    while time.monotonic() - killed_at < 5 and transport.connections == connections:
        await asyncio.sleep(0.05)
    reconnected_after = time.monotonic() - killed_at
    assert process.pid not in (None, first_pid), "mosquitto was not restarted"
    assert transport.connections > connections, "the gateway did not reconnect within 5 s"

    # Every device ends enrolled, each with exactly one active certificate.
    deadline = time.monotonic() + 90
    while enrolled() < DEVICES and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    stop.set()
    summary = await fleet
    assert enrolled() == DEVICES, summary.as_dict()
    assert summary.failed == 0
    for identity in gateway.store.list_identities():
        active = [
            c for c in gateway.store.certificates_for(identity.id)
            if c.status is CertificateStatus.ACTIVE
        ]
        assert len(active) == 1, identity.id
    assert reconnected_after < 5
    # Devices came back with exponential backoff and jitter, not as one wave.
    check_backoff_and_jitter(waits, killed_at)
