"""Several gateways, one fleet, measured: enrollments per second and gateway CPU per enrollment
with 1, 2 and 3 gateway processes, in one run (the CLI: ``fleetgate bench enroll --gateways
1,2,3 --broker mosquitto --database postgresql://...``).

Each round starts from nothing, so rounds compare: a new database on the given PostgreSQL
server (its user must be allowed to create databases; the round drops it after), a new home,
the shared broker under its keeper (``python -m gateway.cluster``) and N ``fleetgate run
--cluster`` processes. Then ``devices`` simulated sensors, in this process, enroll with
``concurrency`` enrollments in flight; the clock runs from the first connect to the last
certificate. CPU is read from /proc for the gateway processes (all their threads) and, apart,
for the two Mosquitto instances; what the simulators spend is never counted.

On a machine with fewer cores than processes the wall-clock figure cannot grow with the number
of gateways: the gateways, the broker, PostgreSQL and the simulated fleet share the same cores.
The figure that must hold is CPU per enrollment, which adding gateways should not raise by more
than the work each gateway repeats (its polling, its broker connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.bench.home import make_bench_home
from gateway.bench.machine import describe_machine
from gateway.bench.procstat import sample
from gateway.config import DATABASE_ENV

__all__ = ["ScaleoutOptions", "render_scaleout", "run_scaleout_bench"]

_READY_SECONDS = 90.0


@dataclass(frozen=True)
class ScaleoutOptions:
    database_url: str  # a PostgreSQL server; a database per round is created there
    gateways: tuple[int, ...] = (1, 2, 3)
    devices: int = 500
    concurrency: int = 96
    timeout: float = 600.0  # per round
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.database_url.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("the scale-out benchmark needs a postgresql:// server URL")
        if not self.gateways or any(
            isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 8
            for n in self.gateways
        ):
            raise ValueError("gateways must be counts between 1 and 8")
        if len(set(self.gateways)) != len(self.gateways):
            raise ValueError("each gateway count once")
        if self.devices < 1 or self.concurrency < 1:
            raise ValueError("devices and concurrency must be at least 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")


class _Database:
    """A database of its own for one round, on the options' server."""

    def __init__(self, server_url: str) -> None:
        base, _, _ = server_url.replace("postgresql+psycopg://", "postgresql://").rpartition("/")
        self._server = server_url.replace("postgresql+psycopg://", "postgresql://")
        self.name = f"fg_bench_{secrets.token_hex(5)}"
        self.url = f"{base}/{self.name}"

    def __enter__(self) -> _Database:
        import psycopg

        with psycopg.connect(self._server, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {self.name}")
        return self

    def __exit__(self, *_exc: object) -> None:
        import psycopg

        with psycopg.connect(self._server, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


class _Children:
    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self._folder = folder
        self._env = env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self._folder / f"{name}.log", "wb")  # noqa: SIM115  the child owns it
        try:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self._env)
        finally:
            log.close()
        self.started[name] = process
        return process

    def output(self, name: str) -> str:
        return (self._folder / f"{name}.log").read_text(errors="replace")

    async def wait_for(self, name: str, text: str) -> None:
        end = time.monotonic() + _READY_SECONDS
        while text not in self.output(name):
            if self.started[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.output(name)[-2000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"{name} not ready in {_READY_SECONDS} s")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            total += sample(pid).cpu_seconds
    return total


async def _enroll_fleet(settings: Any, shared: Any, options: ScaleoutOptions) -> float:
    """Seconds from the first connect until every sensor holds a certificate."""
    from simulators.device import SensorOptions, SimulatedSensor
    from simulators.factory import MODEL, trust_factory
    from simulators.fleet import device_ids

    factory = trust_factory(settings)
    ca_pem = (settings.ca_dir / "root.crt").read_bytes()
    gate = asyncio.Semaphore(options.concurrency)
    credentials = [
        factory.mint(device_id, MODEL)
        for device_id in device_ids(secrets.token_hex(3), options.devices)
    ]
    sensors = [
        SimulatedSensor(
            credential,
            SensorOptions(
                host=shared.host, enrollment_port=shared.enrollment_port,
                operational_port=shared.operational_port, ca_pem=ca_pem,
                telemetry_interval=0, seed=index,
            ),
            gate,
        )
        for index, credential in enumerate(credentials)
    ]
    stop = asyncio.Event()
    started = time.monotonic()
    runs = [asyncio.create_task(sensor.run(stop)) for sensor in sensors]
    try:
        end = started + options.timeout
        while sum(s.outcome.enrolled for s in sensors) < options.devices:
            if time.monotonic() > end:
                raise TimeoutError(f"the fleet did not enroll within {options.timeout} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - started
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)


async def _round(count: int, options: ScaleoutOptions, folder: Path) -> dict[str, Any]:
    from gateway.cluster import load_shared_broker

    folder.mkdir(parents=True)
    with _Database(options.database_url) as database:
        env = {**os.environ, DATABASE_ENV: database.url, "PYTHONUNBUFFERED": "1",
               "COLUMNS": "200"}
        previous = os.environ.get(DATABASE_ENV)
        os.environ[DATABASE_ENV] = database.url  # this process reads the same registry
        children = _Children(folder, env)
        try:
            settings = make_bench_home(folder / "home", broker="mosquitto")
            home = str(settings.home)
            keeper = children.start(
                "keeper", [sys.executable, "-m", "gateway.cluster", "--home", home]
            )
            await children.wait_for("keeper", "broker running")
            shared = load_shared_broker(settings.home)
            names = [f"gw-{n}" for n in range(1, count + 1)]
            for name in names:
                children.start(
                    name,
                    [sys.executable, "-m", "gateway.cli", "run", "--home", home, "--cluster",
                     "--node", name],
                )
            for name in names:
                await children.wait_for(name, "Fleetgate running")
            gateway_pids = [children.started[name].pid for name in names]
            broker_pids = _children_of(keeper.pid)
            await asyncio.sleep(1.0)  # past the start-up work
            gateway_cpu, broker_cpu = _cpu(gateway_pids), _cpu(broker_pids)
            seconds = await _enroll_fleet(settings, shared, options)
            gateway_cpu = _cpu(gateway_pids) - gateway_cpu
            broker_cpu = _cpu(broker_pids) - broker_cpu
        finally:
            children.stop()
            if previous is None:
                os.environ.pop(DATABASE_ENV, None)
            else:
                os.environ[DATABASE_ENV] = previous
    return {
        "gateways": count,
        "devices": options.devices,
        "seconds": round(seconds, 2),
        "enrollments_per_s": round(options.devices / seconds, 1),
        "gateway_cpu_ms_per_enrollment": round(gateway_cpu * 1000 / options.devices, 2),
        "broker_cpu_ms_per_enrollment": round(broker_cpu * 1000 / options.devices, 2),
    }


async def run_scaleout_bench(options: ScaleoutOptions) -> dict[str, Any]:
    """One round per gateway count, in the order given; see the module docstring."""
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="fleetgate-scaleout-"))
    rounds = []
    for count in options.gateways:
        rounds.append(await _round(count, options, work / f"{count}-gateways"))
    base = next((r for r in rounds if r["gateways"] == 1), rounds[0])
    for entry in rounds:
        entry["cpu_per_enrollment_vs_first"] = round(
            entry["gateway_cpu_ms_per_enrollment"] / base["gateway_cpu_ms_per_enrollment"], 3
        )
    return {
        "benchmark": "scaleout-enroll",
        "machine": describe_machine(),
        "concurrency": options.concurrency,
        "rounds": rounds,
        "work_dir": str(work),
    }


def render_scaleout(result: dict[str, Any]) -> str:
    lines = [
        f"{'gateways':>8}  {'devices':>7}  {'seconds':>8}  {'enroll/s':>8}  "
        f"{'gw CPU ms/enr':>13}  {'broker CPU ms/enr':>17}  {'CPU vs 1':>8}"
    ]
    for r in result["rounds"]:
        lines.append(
            f"{r['gateways']:>8}  {r['devices']:>7}  {r['seconds']:>8.2f}  "
            f"{r['enrollments_per_s']:>8.1f}  {r['gateway_cpu_ms_per_enrollment']:>13.2f}  "
            f"{r['broker_cpu_ms_per_enrollment']:>17.2f}  "
            f"{r['cpu_per_enrollment_vs_first']:>8.3f}"
        )
    return "\n".join(lines)
