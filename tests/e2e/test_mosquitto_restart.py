"""Mosquitto killed under load: the gateway's client is back within seconds, devices come back
with backoff and jitter, and no enrollment is lost."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time

import pytest

from gateway.store import CertificateStatus, IdentityState
from simulators.fleet import FleetOptions, run_fleet

pytestmark = [
    pytest.mark.broker,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("mosquitto") is None, reason="mosquitto is not installed"),
]

DEVICES = 40


async def test_mosquitto_killed_mid_enrollment_loses_nothing(start_gateway) -> None:
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
