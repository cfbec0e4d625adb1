"""The commands a newcomer runs, as separate processes: run, sim, device list, audit, demo."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

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


def audit_verdict(home: Path) -> dict[str, Any]:
    verify = fleetgate("audit", "verify", "--home", str(home), "--json")
    verdict: dict[str, Any] = json.loads(verify.stdout)
    assert verify.returncode == 0 and verdict["ok"], verify.stdout + verify.stderr
    return verdict


# Ctrl-C in the gateway's terminal and a service manager's stop: both must shut down cleanly.
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_sim_list_and_audit_as_separate_processes(
    home: Path, stop_signal: signal.Signals
) -> None:
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
        # Fewer events than audit_checkpoint_every (100): the running gateway signed none yet.
        running = audit_verdict(home)
        assert (running["last_checkpoint_seq"] or 0) < running["checked"]
    finally:
        gateway.send_signal(stop_signal)
        try:
            out, errors = gateway.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.communicate()
            raise
    assert gateway.returncode == 0, errors
    assert "stopping" in out and "Traceback" not in errors + out
    # The gateway signed the chain head when it stopped: nothing is left unsigned.
    verdict = audit_verdict(home)
    assert verdict["checked"] >= running["checked"]
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
    # port 0 in fleetgate.toml: the system picked the ports, and the summary says which
    assert summary["enrollment_port"] > 0 and summary["operational_port"] > 0
    assert summary["telemetry"] > 0 and 5 <= summary["seconds"] < 30


PROGRESS = re.compile(
    r"sensors \S+ (\d+)/(\d+) enrolled · \d+ pending · \d+ failed · \d+ renewed · "
    r"\d+ readings \d+:\d\d:\d\d"
)
LISTENER = re.compile(r"(enrollment|operational) +mqtts://127\.0\.0\.1:(\d+)")


def test_demo_on_a_new_home_with_system_picked_ports_prints_what_the_readme_shows(
    tmp_path: Path,
) -> None:
    home = tmp_path / "fresh"
    env = {**os.environ, "COLUMNS": "120"}  # rich cuts lines at 80 columns without a terminal
    demo = subprocess.run(
        [*FLEETGATE, "demo", "--home", str(home), "--devices", "3", "--duration", "6",
         "--enrollment-port", "0", "--operational-port", "0"],
        capture_output=True, text=True, timeout=90, check=False, env=env,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    assert f"initialised a new gateway home in {home}" in demo.stdout
    ports = dict(LISTENER.findall(demo.stdout))
    assert set(ports) == {"enrollment", "operational"} and "0" not in ports.values()
    progress = PROGRESS.search(demo.stdout)
    assert progress is not None, demo.stdout
    assert progress.groups() == ("3", "3")
    # The README's quick start shows the same lines, for the default 25 sensors.
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "initialised a new gateway home in .fleetgate" in readme
    shown = PROGRESS.search(readme)
    assert shown is not None and shown.groups() == ("25", "25")
    assert {name for name, _ in LISTENER.findall(readme)} == {"enrollment", "operational"}
