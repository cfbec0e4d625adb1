"""The commands a newcomer runs, as separate processes: run, sim, device list, audit, demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FLEETGATE = [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fleetgate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FLEETGATE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for_port(port: int, process: subprocess.Popen[str], seconds: float = 20) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            errors = process.stderr.read() if process.stderr else ""
            raise AssertionError(f"gateway exited: {errors}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "gw"
    assert fleetgate("init", "--home", str(folder)).returncode == 0
    config = folder / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data["broker"]["enrollment_port"] = free_port()
    data["broker"]["operational_port"] = free_port()
    config.write_text(tomli_w.dumps(data))
    return folder


def test_run_sim_list_and_audit_as_separate_processes(home: Path) -> None:
    port = tomllib.loads((home / "fleetgate.toml").read_text())["broker"]["operational_port"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    gateway = subprocess.Popen(
        [*FLEETGATE, "run", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_for_port(port, gateway)
        sim = fleetgate(
            "sim", "--home", str(home), "--devices", "5", "--duration", "8",
            "--telemetry-interval", "1", "--json",
        )
        assert sim.returncode == 0, sim.stderr
        summary = json.loads(sim.stdout)
        assert summary["devices"] == 5 and summary["enrolled"] == 5 and summary["failed"] == 0
        assert summary["telemetry"] >= 5 and summary["rejected"] == {}
        listed = json.loads(fleetgate("device", "list", "--home", str(home), "--json").stdout)
        assert len(listed) == 5 and {d["state"] for d in listed} == {"active"}
        assert all(d["certificate_not_after"] for d in listed)
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            code = gateway.wait(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.kill()
            raise
    assert code == 0, gateway.stderr.read() if gateway.stderr else ""
    verify = fleetgate("audit", "verify", "--home", str(home), "--json")
    verdict = json.loads(verify.stdout)
    assert verify.returncode == 0 and verdict["ok"]
    # The gateway signed the chain head when it stopped: nothing is left unsigned.
    assert verdict["last_checkpoint_seq"] == verdict["checked"]


def test_demo_runs_a_fleet_and_stops_by_itself(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    assert fleetgate("init", "--home", str(home)).returncode == 0
    config = home / "fleetgate.toml"
    data = tomllib.loads(config.read_text())
    data["broker"]["enrollment_port"] = 0
    data["broker"]["operational_port"] = 0
    config.write_text(tomli_w.dumps(data))
    demo = fleetgate("demo", "--home", str(home), "--devices", "4", "--duration", "5", "--json")
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert summary["devices"] == 4 and summary["enrolled"] == 4 and summary["failed"] == 0
