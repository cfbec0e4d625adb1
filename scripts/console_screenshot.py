"""Regenerate docs/console.png from a real run, nothing staged.

A gateway on the embedded broker in a temporary home (its own free ports on loopback); a
simulated fleet of TH-200 sensors sending telemetry every second; three CO2-8 sensors, a model
the home does not approve by itself, waiting for an operator; one cloned TH-200 (the same
certificate from 127.0.0.1 and 127.0.0.2, which the gateway quarantines). An admin operator,
through the admin API, approves one CO2-8, quarantines two sensors and revokes one (whose
attempts to come back show as refused connections). Then `fleetgate console --screenshot`
takes the picture, offscreen, in a configuration folder of its own.

    .venv/bin/python scripts/console_screenshot.py [--out docs/console.png]

Takes about three minutes: the telemetry chart of the device in the detail pane counts
messages per minute, and a picture of an empty chart would show nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import tomli_w

from gateway.admin.client import AdminClient, AdminError
from gateway.admin.profile import load_profile
from gateway.config import CONFIG_NAME, PASSPHRASE_ENV, load_settings
from gateway.mosquitto import free_port
from pki.factory import FactoryCA
from simulators.device import SensorOptions, SimulatedSensor
from simulators.factory import MANUFACTURER, MODEL, place_factory_root
from simulators.fleet import FleetOptions, device_ids, run_fleet
from simulators.modes import Mode, ModeOptions, run_mode

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPOSITORY / "docs" / "console.png"
OPERATOR = "alice"
# A model the home does not approve by itself: its sensors wait in "Pending approval".
WAITING_MODEL = "CO2-8"
WAITING_DEVICES = 3
START_TIMEOUT_S = 60.0


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def fleetgate(*args: str, env: dict[str, str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """One `fleetgate` command, with this interpreter (the checkout's, not an installed one)."""
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env,
        cwd=REPOSITORY,
        check=True,
        text=True,
        capture_output=True,
        **kwargs,
    )


def make_home(home: Path, passphrase_file: Path, env: dict[str, str]) -> None:
    fleetgate("init", "--home", str(home), "--passphrase-file", str(passphrase_file), env=env)
    path = home / CONFIG_NAME
    config = tomllib.loads(path.read_text())
    config["broker"]["enrollment_port"] = free_port()
    config["broker"]["operational_port"] = free_port()
    config["policy"]["auto_approve"] = [{"manufacturer": MANUFACTURER, "model": MODEL}]
    path.write_text(tomli_w.dumps(config))


def wait_for_gateway(client: AdminClient, gateway: subprocess.Popen[bytes], log: Path) -> None:
    """Until the operator is served. The admin client keeps trying to connect by itself; a
    bare probe of a port would be recorded by the gateway as a refused connection."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if gateway.poll() is not None:
            raise SystemExit(f"the gateway exited ({gateway.returncode}); see {log}")
        try:
            client.request("whoami", timeout=2)
            return
        except AdminError:
            if time.monotonic() > deadline:
                raise


class SimulationThread:
    """An asyncio loop in a daemon thread running the simulated devices until ``close``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.stop = self.run(self._new_event())
        self._tasks: list[Future[Any]] = []

    @staticmethod
    async def _new_event() -> asyncio.Event:
        return asyncio.Event()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.append(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        for task in self._tasks:
            with contextlib.suppress(Exception):
                task.result(5)
            task.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


async def waiting_sensors(
    factory: FactoryCA, ids: list[str], options: SensorOptions, stop: asyncio.Event
) -> None:
    gate = asyncio.Semaphore(len(ids))
    sensors = [
        SimulatedSensor(factory.mint(device_id, WAITING_MODEL), options, gate)
        for device_id in ids
    ]
    await asyncio.gather(*(sensor.run(stop) for sensor in sensors))


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout:.0f} s")
        time.sleep(1)


def act(client: AdminClient, op: str, ids: list[str], reason: str) -> None:
    result = client.request(op, {"ids": ids, "reason": reason}, timeout=30)
    failed = [r for r in result["results"] if not r["ok"]]
    if failed:
        raise SystemExit(f"{op} failed: {failed}")
    step(f"{op} {', '.join(ids)}: {reason}")


def operate(client: AdminClient, fleet: list[str], waiting: list[str], clone: str) -> None:
    """What an operator did this morning, through the admin API."""

    def rows() -> dict[str, dict[str, Any]]:
        answer = client.request("list_identities", {"kind": "device"}, timeout=60)
        return {row["id"]: row for row in answer["identities"]}

    def settled() -> bool:
        now = rows()
        online = all(now.get(d, {}).get("connected") for d in fleet)
        asking = all(now.get(d, {}).get("state") == "pending" for d in waiting)
        cloned = now.get(clone, {}).get("state") == "quarantined"
        return online and asking and cloned

    wait_until("the fleet online, the CO2-8 sensors waiting, the clone quarantined", settled, 120)
    step(f"{len(fleet)} sensors online, {len(waiting)} waiting for approval, clone quarantined")
    act(client, "approve", waiting[:1], "installed by the field team")
    act(client, "quarantine", [fleet[3], fleet[7]], "telemetry bursts, under investigation")
    act(client, "revoke", [fleet[11]], "returned to vendor")


def screenshot(profile: Path, passphrase_file: Path, out: Path, env: dict[str, str]) -> None:
    shot_env = {**env, "QT_QPA_PLATFORM": "offscreen"}
    fleetgate(
        "console",
        "--profile",
        str(profile),
        "--passphrase-file",
        str(passphrase_file),
        "--screenshot",
        str(out),
        env=shot_env,
        timeout=180,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write")
    parser.add_argument("--devices", type=int, default=24, help="TH-200 sensors (at least 12)")
    parser.add_argument(
        "--settle", type=float, default=150.0, help="seconds of telemetry before the picture"
    )
    parser.add_argument("--keep-home", action="store_true", help="keep the temporary home")
    args = parser.parse_args()
    if args.devices < 12:
        parser.error("--devices must be at least 12 (four of them are acted on)")

    work = Path(tempfile.mkdtemp(prefix="fleetgate-screenshot-"))
    home = work / "home"
    passphrase_file = work / "passphrase"
    passphrase_file.write_text("screenshot-only-passphrase\n")
    passphrase_file.chmod(0o600)
    # Everything the run writes stays in the temporary folder: the console's layout too.
    env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
    env.update(XDG_CONFIG_HOME=str(work / "config"), PYTHONPATH=str(REPOSITORY))

    gateway: subprocess.Popen[bytes] | None = None
    simulation: SimulationThread | None = None
    client: AdminClient | None = None
    try:
        step(f"gateway home {home}")
        make_home(home, passphrase_file, env)
        settings = load_settings(home)
        factory, _ = place_factory_root(settings)
        ports = settings.broker
        log = work / "gateway.log"
        with log.open("wb") as log_stream:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run", "--home", str(home)],
                env=env,
                cwd=REPOSITORY,
                stdout=log_stream,
                stderr=subprocess.STDOUT,
            )
        profile = work / f"{OPERATOR}.profile.json"
        fleetgate(
            "operator", "add", OPERATOR, "--role", "admin", "--home", str(home),
            "--out", str(profile), "--passphrase-file", str(passphrase_file),
            "--host", "127.0.0.1", "--port", str(ports.operational_port),
            env=env,
        )
        client = AdminClient(load_profile(profile), passphrase_file.read_bytes().strip())
        client.start()
        wait_for_gateway(client, gateway, log)
        step(f"gateway up: ports {ports.enrollment_port} and {ports.operational_port}")

        ca_pem = (settings.ca_dir / "root.crt").read_bytes()
        batch = os.urandom(3).hex()
        fleet_options = FleetOptions(
            devices=args.devices,
            host="127.0.0.1",
            enrollment_port=ports.enrollment_port,
            operational_port=ports.operational_port,
            ca_pem=ca_pem,
            telemetry_interval=1.0,
            progress=False,
            batch=batch,
        )
        waiting = [
            f"{WAITING_MODEL.lower()}-{batch}-{n:05d}" for n in range(1, WAITING_DEVICES + 1)
        ]
        clone_options = ModeOptions(
            mode=Mode.CLONE,
            devices=1,
            host="127.0.0.1",
            enrollment_port=ports.enrollment_port,
            operational_port=ports.operational_port,
            ca_pem=ca_pem,
            clone_address="127.0.0.2",
            batch=batch,
        )
        sensor_options = SensorOptions(
            host="127.0.0.1",
            enrollment_port=ports.enrollment_port,
            operational_port=ports.operational_port,
            ca_pem=ca_pem,
            telemetry_interval=1.0,
        )
        simulation = SimulationThread()
        stop = simulation.stop
        simulation.start(run_fleet(fleet_options, factory, stop))
        simulation.start(waiting_sensors(factory, waiting, sensor_options, stop))
        simulation.start(run_mode(clone_options, factory, stop))
        step("fleet, waiting sensors and a clone started")

        [clone] = clone_options.ids("clone")
        operate(client, device_ids(batch, args.devices), waiting, clone)
        client.stop()
        client = None

        step(f"{args.settle:.0f} s of telemetry before the picture")
        time.sleep(args.settle)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        screenshot(profile, passphrase_file, args.out.resolve(), env)
        step(f"wrote {args.out}")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{' '.join(exc.cmd[2:4])} failed:\n{exc.stdout}{exc.stderr}") from None
    except AdminError as exc:
        raise SystemExit(f"admin API: {exc}") from None
    finally:
        if client is not None:
            client.stop()
        if simulation is not None:
            simulation.close()
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(20)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        if args.keep_home:
            step(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
