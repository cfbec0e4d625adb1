"""Three gateway processes, one Mosquitto (under its keeper), one PostgreSQL: a fleet of 1,000
simulated sensors enrolls while the leading gateway is killed with SIGKILL; every sensor ends
enrolled, no serial is issued twice, the audit chain verifies, and a revocation made after the
failover cuts the device.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from scaleout_kit import cluster_home, device, enroll, eventually, operational, refused
from sqlalchemy import create_engine, text

from gateway.cluster import load_shared_broker
from simulators.device import SensorOptions, SimulatedSensor
from simulators.factory import MODEL, trust_factory
from simulators.fleet import device_ids

pytestmark = [pytest.mark.slow, pytest.mark.broker]

FLEET = 1000
GATEWAYS = 3
KILL_AFTER = 350  # enrolled devices when the leader dies
CONCURRENCY = 96  # enrollment connections open at once
FLEET_SECONDS = 200.0
FLEETGATE = [sys.executable, "-m", "gateway.cli"]


class Processes:
    """Child processes with their output in files; stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115  the child owns it
        try:
            process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
            )
        finally:
            log.close()
        self.started[name] = process
        return process

    def output(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    children = Processes(tmp_path)
    yield children
    children.stop_all()


def _leader(processes: Processes) -> str | None:
    """The gateway that logged taking the lead last (by the order its log says it)."""
    leaders = [
        name
        for name in processes.started
        if name.startswith("gw-") and "leading the cluster" in processes.output(name)
    ]
    alive = [n for n in leaders if processes.started[n].poll() is None]
    return alive[0] if len(alive) == 1 else None


@pytest.mark.timeout(300)
async def test_a_fleet_enrolls_through_three_gateways_while_the_leader_is_killed(
    tmp_path: Path, database_url: str, mosquitto: None, processes: Processes
) -> None:
    settings = cluster_home(tmp_path / "home", database_url)
    home = str(settings.home)
    keeper = processes.start("keeper", [sys.executable, "-m", "gateway.cluster", "--home", home])
    await eventually(
        lambda: "broker running" in processes.output("keeper") or keeper.poll() is not None,
        60, "the broker's keeper started",
    )
    assert keeper.poll() is None, processes.output("keeper")
    shared = load_shared_broker(settings.home)
    for index in range(1, GATEWAYS + 1):
        processes.start(
            f"gw-{index}", [*FLEETGATE, "run", "--home", home, "--cluster", "--node", f"gw-{index}"]
        )
    for index in range(1, GATEWAYS + 1):
        name = f"gw-{index}"
        await eventually(
            lambda n=name: "Fleetgate running" in processes.output(n)
            or processes.started[n].poll() is not None,
            90, f"{name} started",
        )
        assert processes.started[name].poll() is None, processes.output(name)
    first_leader = await eventually(lambda: _leader(processes), 10, "one gateway leads")

    engine = create_engine(database_url)
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    host = shared.host

    stop = asyncio.Event()
    killed_at: list[int] = []
    factory = trust_factory(settings)
    gate = asyncio.Semaphore(CONCURRENCY)
    sensors = [
        SimulatedSensor(
            factory.mint(device_id, MODEL),
            SensorOptions(
                host=host, enrollment_port=shared.enrollment_port,
                operational_port=shared.operational_port, ca_pem=ca_pem,
                telemetry_interval=0, seed=index,
            ),
            gate,
        )
        for index, device_id in enumerate(device_ids(secrets.token_hex(3), FLEET))
    ]

    async def kill_midway_then_stop_when_done() -> None:
        while True:
            enrolled = sum(sensor.outcome.enrolled for sensor in sensors)
            if not killed_at and enrolled >= KILL_AFTER:
                processes.started[first_leader].send_signal(signal.SIGKILL)
                killed_at.append(enrolled)
            if enrolled >= FLEET:
                stop.set()
                return
            await asyncio.sleep(0.1)

    runs = [asyncio.create_task(sensor.run(stop)) for sensor in sensors]
    try:
        await asyncio.wait_for(kill_midway_then_stop_when_done(), FLEET_SECONDS)
    finally:
        stop.set()
        outcomes = await asyncio.gather(*runs)

    # The leader died midway, another took over, and every sensor got its certificate.
    assert killed_at and killed_at[0] < FLEET
    assert processes.started[first_leader].poll() == -signal.SIGKILL
    new_leader = await eventually(lambda: _leader(processes), 10, "a new leader")
    assert new_leader != first_leader
    assert sum(o.enrolled for o in outcomes) == FLEET
    assert sum(o.failed for o in outcomes) == 0

    with engine.connect() as connection:
        duplicates = connection.execute(text(
            "SELECT serial FROM certificate GROUP BY serial HAVING count(*) > 1"
        )).all()
        two_active = connection.execute(text(
            "SELECT identity_id FROM certificate WHERE status = 'active' "
            "GROUP BY identity_id HAVING count(*) > 1"
        )).all()
        certified = connection.execute(text(
            "SELECT count(DISTINCT identity_id) FROM certificate"
        )).scalar_one()
        challenges = connection.execute(text("SELECT count(*) FROM nonce")).scalar_one()
    assert duplicates == [] and two_active == []
    assert certified == FLEET
    # One gateway answers each hello (one challenge each); every gateway answering would make
    # three. Devices whose exchange died with the killed gateway start again: a few more.
    assert FLEET <= challenges < FLEET * 1.3, challenges

    # A revocation after the failover: the new leader cuts the session and the broker refuses
    # the certificate from then on.
    client = device(trust_factory(settings), "th-revoked-0001")
    enrolled = await enroll(client, host, shared.enrollment_port, ca_pem)
    session = await operational(enrolled, client.device_id, host, shared.operational_port, ca_pem)
    revoke = await asyncio.create_subprocess_exec(
        *FLEETGATE, "device", "revoke", client.device_id, "--reason", "scale-out test",
        "--yes", "--home", home, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _, err = await revoke.communicate()
    assert revoke.returncode == 0, err.decode()
    await asyncio.wait_for(asyncio.shield(session.ended), 10)
    await session.close()
    await eventually(
        lambda: refused(enrolled, client.device_id, host, shared.operational_port, ca_pem),
        10, "the revoked certificate refused",
    )

    processes.stop_all()
    verify = subprocess.run(
        [*FLEETGATE, "audit", "verify", "--home", home, "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    verdict = json.loads(verify.stdout)
    assert verify.returncode == 0 and verdict["ok"], verify.stdout + verify.stderr
    assert verdict["checked"] >= FLEET + 2
    for name in processes.started:
        if name.startswith("gw-") and name != first_leader:
            assert not re.search(r"Traceback", processes.output(name)), processes.output(name)
    engine.dispose()
