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

That repeated work is measured apart: before its fleet, each round reads the gateways' CPU for
``idle_seconds`` with nothing to do (the leader's audit-head poll, the leader-lock checks,
keep-alives). ``gateway_cpu_ms_per_enrollment_less_idle`` takes that rate times the round's
duration out of the total, so what is left is the CPU the enrollments themselves cost; at a
few tens of enrollments per second a gateway's idle cost is a visible share of the total.

The machine's own speed drifts between rounds (``gateway.bench.speed``): each round also times
a fixed workload just before its fleet, and ``speed_adjusted_vs_first`` compares the rounds'
CPU per enrollment in units of that probe, beside the raw ratios.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from gateway.bench.home import make_bench_home
from gateway.bench.machine import describe_machine
from gateway.bench.procstat import context_switches, main_thread_cpu, sample
from gateway.bench.speed import speed_probe
from gateway.config import DATABASE_ENV

__all__ = [
    "ScaleoutError",
    "ScaleoutOptions",
    "ScaleoutReason",
    "render_scaleout",
    "run_scaleout_bench",
    "summarize",
]

_READY_SECONDS = 90.0
_LEADING = "leading the cluster as"  # what the leader logs once it took over


class ScaleoutReason(StrEnum):
    DATABASE = "database_unavailable"  # the server refused a connection or a CREATE DATABASE
    PROCESS_EXITED = "process_exited"  # the keeper or a gateway stopped during its start
    NOT_READY = "process_not_ready"  # ... or did not say it was running in time
    FLEET_TIMEOUT = "fleet_timeout"  # not every device enrolled within the round's timeout


class ScaleoutError(Exception):
    """A round that could not run or finish; ``reason`` is stable, ``detail`` for people."""

    def __init__(self, reason: ScaleoutReason, detail: str) -> None:
        self.reason = ScaleoutReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")


@dataclass(frozen=True)
class ScaleoutOptions:
    database_url: str  # a PostgreSQL server; a database per round is created there
    gateways: tuple[int, ...] = (1, 2, 3)
    devices: int = 500
    concurrency: int = 96
    timeout: float = 600.0  # per round
    idle_seconds: float = 10.0  # the gateways' CPU with nothing to do, read before each fleet
    # Passes over the counts, every other one in reverse order (1,2,3,3,2,1): the machine's
    # speed drifts over minutes, and a drift then weighs on every count alike.
    repeats: int = 1
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
        if not 1 <= self.idle_seconds <= 60:
            raise ValueError("idle_seconds must be between 1 and 60")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or not (
            1 <= self.repeats <= 5
        ):
            raise ValueError("repeats must be between 1 and 5")

    def order(self) -> list[tuple[int, int]]:
        """(pass, gateway count) of every round, in the order they run."""
        return [
            (index + 1, count)
            for index in range(self.repeats)
            for count in (self.gateways if index % 2 == 0 else self.gateways[::-1])
        ]


class _Database:
    """A database of its own for one round, on the options' server."""

    def __init__(self, server_url: str) -> None:
        base, _, _ = server_url.replace("postgresql+psycopg://", "postgresql://").rpartition("/")
        self._server = server_url.replace("postgresql+psycopg://", "postgresql://")
        self.name = f"fg_bench_{secrets.token_hex(5)}"
        self.url = f"{base}/{self.name}"

    def __enter__(self) -> _Database:
        import psycopg

        try:
            with psycopg.connect(self._server, autocommit=True, connect_timeout=10) as connection:
                connection.execute(f"CREATE DATABASE {self.name}")
        except psycopg.Error as exc:
            raise ScaleoutError(ScaleoutReason.DATABASE, f"{self._safe_server()}: {exc}") from None
        return self

    def _safe_server(self) -> str:
        """The server URL without its password, for messages."""
        from sqlalchemy.engine import make_url

        return make_url(self._server).render_as_string(hide_password=True)

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
                raise ScaleoutError(
                    ScaleoutReason.PROCESS_EXITED, f"{name} exited:\n{self.output(name)[-2000:]}"
                )
            if time.monotonic() > end:
                raise ScaleoutError(
                    ScaleoutReason.NOT_READY, f"{name} not ready in {_READY_SECONDS} s"
                )
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


async def _enroll_fleet(
    settings: Any, shared: Any, options: ScaleoutOptions
) -> tuple[float, dict[str, int]]:
    """Seconds from the first connect until every sensor holds a certificate, and what the
    sensors met on the way (refusals by reason, connection errors): each is a request or a
    connection the gateways served again, so CPU per enrollment grows with them."""
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
                enrolled = sum(s.outcome.enrolled for s in sensors)
                raise ScaleoutError(
                    ScaleoutReason.FLEET_TIMEOUT,
                    f"{enrolled} of {options.devices} devices enrolled within {options.timeout} s",
                )
            await asyncio.sleep(0.05)
        seconds = time.monotonic() - started
        met: Counter[str] = Counter()
        for sensor in sensors:
            met.update(sensor.outcome.rejected)
            met["connection_errors"] += sensor.outcome.connection_errors
        return seconds, dict(sorted(met.items()))
    finally:
        stop.set()
        await asyncio.gather(*runs, return_exceptions=True)


def _cpu_each(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each gateway, 0.0 for one gone: unlike ``_read_each``, every name stays,
    for the sums over every gateway that follow."""
    return {name: _cpu([pid]) for name, pid in pids.items()}


T = TypeVar("T")


def _read_each(pids: dict[str, int], read: Callable[[int], T]) -> dict[str, T]:
    """``read(pid)`` of each gateway still running."""
    found = {}
    for name, pid in pids.items():
        with contextlib.suppress(ProcessLookupError):
            found[name] = read(pid)
    return found


async def _round(
    count: int, options: ScaleoutOptions, folder: Path, progress: Callable[[str], None]
) -> dict[str, Any]:
    from gateway.cluster import load_shared_broker

    folder.mkdir(parents=True)
    load_before = os.getloadavg()[0]
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
            gateway_pids = {name: children.started[name].pid for name in names}
            broker_pids = _children_of(keeper.pid)
            await asyncio.sleep(1.0)  # past the start-up work
            progress(f"{count} gateway(s): {options.idle_seconds:.0f} s idle, then the fleet")
            idle_start = _cpu_each(gateway_pids)
            await asyncio.sleep(options.idle_seconds)
            idle_end = _cpu_each(gateway_pids)
            probe_ms = speed_probe()  # how fast the machine is now (the fleet waits for it)
            broker_cpu = _cpu(broker_pids)
            switches_start = _read_each(gateway_pids, context_switches)
            loop_start = _read_each(gateway_pids, main_thread_cpu)
            busy_start = _cpu_each(gateway_pids)
            seconds, met = await _enroll_fleet(settings, shared, options)
            busy_end = _cpu_each(gateway_pids)
            loop_end = _read_each(gateway_pids, main_thread_cpu)
            switches_end = _read_each(gateway_pids, context_switches)
            broker_cpu = _cpu(broker_pids) - broker_cpu
            leaders = [name for name in names if _LEADING in children.output(name)]
        finally:
            children.stop()
            if previous is None:
                os.environ.pop(DATABASE_ENV, None)
            else:
                os.environ[DATABASE_ENV] = previous
    idle_rate = {n: (idle_end[n] - idle_start[n]) / options.idle_seconds for n in names}
    busy = {n: busy_end[n] - idle_end[n] for n in names}
    gateway_cpu = sum(busy.values())
    idle_total = sum(idle_rate.values())
    less_idle = max(gateway_cpu - idle_total * seconds, 0.0)
    per_ms = 1000 / options.devices
    # the event loop (MQTT client, broker control, timers) apart from the worker threads
    # (enrollment core, registry): which of the two grows with the count
    loop = {n: loop_end[n] - loop_start[n] for n in names if n in loop_start and n in loop_end}
    threads = {n: (busy_end[n] - busy_start[n]) - loop[n] for n in loop}
    switched = {
        n: tuple(b - a for a, b in zip(switches_start[n], switches_end[n], strict=True))
        for n in names
        if n in switches_start and n in switches_end
    }
    return {
        "gateways": count,
        "devices": options.devices,
        "seconds": round(seconds, 2),
        "enrollments_per_s": round(options.devices / seconds, 1),
        "gateway_cpu_ms_per_enrollment": round(gateway_cpu * per_ms, 2),
        "gateway_idle_cpu_ms_per_s": round(idle_total * 1000, 1),
        "gateway_cpu_ms_per_enrollment_less_idle": round(less_idle * per_ms, 2),
        "broker_cpu_ms_per_enrollment": round(broker_cpu * per_ms, 2),
        # how often the gateways' threads slept and were woken (voluntary) or were preempted
        "gateway_wakeups_per_enrollment": round(
            sum(v for v, _ in switched.values()) / options.devices, 2
        ),
        "gateway_preemptions_per_enrollment": round(
            sum(i for _, i in switched.values()) / options.devices, 2
        ),
        "speed_probe_ms": round(probe_ms, 2),
        "per_gateway": [
            {
                "node": n,
                "leader": n in leaders,
                "idle_cpu_ms_per_s": round(idle_rate[n] * 1000, 1),
                "cpu_ms_per_enrollment": round(busy[n] * per_ms, 2),
                "wakeups_per_enrollment": round(switched.get(n, (0, 0))[0] / options.devices, 2),
                "loop_cpu_ms_per_enrollment": round(loop.get(n, 0.0) * per_ms, 2),
                "threads_cpu_ms_per_enrollment": round(threads.get(n, 0.0) * per_ms, 2),
            }
            for n in names
        ],
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "devices_met": met,
        "device_retries": sum(met.values()),
    }


def _ratio(value: float, base: float) -> float:
    return round(value / base, 3) if base > 0 else 0.0


_SUMMED = (
    "enrollments_per_s",
    "gateway_cpu_ms_per_enrollment",
    "gateway_idle_cpu_ms_per_s",
    "gateway_cpu_ms_per_enrollment_less_idle",
    "broker_cpu_ms_per_enrollment",
    "speed_probe_ms",
    "device_retries",
)
# read from the kernel's scheduler counts, absent where /proc has none
_DIAGNOSTIC = ("gateway_wakeups_per_enrollment", "gateway_preemptions_per_enrollment")


def _in_probe_units(entry: dict[str, Any]) -> float:
    """Gateway CPU per enrollment in units of the speed probe (``gateway.bench.speed``)."""
    probe = entry.get("speed_probe_ms", 0.0)
    return entry["gateway_cpu_ms_per_enrollment"] / probe if probe > 0 else 0.0


def summarize(gateways: tuple[int, ...], rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per gateway count: the mean of its rounds, and the ratios to the count of one (or the
    first count given)."""
    summary = []
    for count in gateways:
        mine = [r for r in rounds if r["gateways"] == count]
        entry: dict[str, Any] = {"gateways": count, "rounds": len(mine)}
        for key in _SUMMED:
            entry[key] = round(statistics.fmean(r[key] for r in mine), 2)
        for key in _DIAGNOSTIC:
            if all(key in r for r in mine):
                entry[key] = round(statistics.fmean(r[key] for r in mine), 2)
        cpu = [r["gateway_cpu_ms_per_enrollment"] for r in mine]
        entry["gateway_cpu_ms_per_enrollment_range"] = [min(cpu), max(cpu)]
        summary.append(entry)
    base = next((e for e in summary if e["gateways"] == 1), summary[0])
    for entry in summary:
        entry["cpu_per_enrollment_vs_first"] = _ratio(
            entry["gateway_cpu_ms_per_enrollment"], base["gateway_cpu_ms_per_enrollment"]
        )
        entry["cpu_less_idle_vs_first"] = _ratio(
            entry["gateway_cpu_ms_per_enrollment_less_idle"],
            base["gateway_cpu_ms_per_enrollment_less_idle"],
        )
    for entry in rounds:
        entry["cpu_in_probe_units"] = round(_in_probe_units(entry), 4)
    for entry in summary:
        # the mean of the rounds' own figures: each round is read against its own probe
        mine = [r for r in rounds if r["gateways"] == entry["gateways"]]
        entry["cpu_in_probe_units"] = round(
            statistics.fmean(r["cpu_in_probe_units"] for r in mine), 4
        )
    for entry in summary:
        entry["speed_adjusted_vs_first"] = _ratio(
            entry["cpu_in_probe_units"], base["cpu_in_probe_units"]
        )
    for entry in rounds:  # each round against the same base
        entry["speed_adjusted_vs_first"] = _ratio(
            entry["cpu_in_probe_units"], base["cpu_in_probe_units"]
        )
        entry["cpu_per_enrollment_vs_first"] = _ratio(
            entry["gateway_cpu_ms_per_enrollment"], base["gateway_cpu_ms_per_enrollment"]
        )
        entry["cpu_less_idle_vs_first"] = _ratio(
            entry["gateway_cpu_ms_per_enrollment_less_idle"],
            base["gateway_cpu_ms_per_enrollment_less_idle"],
        )
    return summary


async def run_scaleout_bench(
    options: ScaleoutOptions, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """One round per gateway count and pass (``ScaleoutOptions.order``); see the module
    docstring. Raises ``ScaleoutError``. ``progress`` hears a line as each round starts and
    ends."""
    say = progress or (lambda _line: None)
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="fleetgate-scaleout-"))
    rounds = []
    for number, count in options.order():
        folder = work / f"pass{number}-{count}-gateways"
        entry = {"pass": number, **await _round(count, options, folder, say)}
        say(
            f"{count} gateway(s): {entry['enrollments_per_s']}/s, "
            f"{entry['gateway_cpu_ms_per_enrollment']} ms gateway CPU per enrollment"
        )
        rounds.append(entry)
    summary = summarize(options.gateways, rounds)
    return {
        "benchmark": "scaleout-enroll",
        "machine": describe_machine(),
        "concurrency": options.concurrency,
        "idle_seconds": options.idle_seconds,
        "repeats": options.repeats,
        "rounds": rounds,
        "summary": summary,
        "work_dir": str(work),
    }


def render_scaleout(result: dict[str, Any]) -> str:
    """Every round, then the mean per gateway count; "vs 1" compares with one gateway (or the
    first count given)."""
    head = (
        f"{'gateways':>8}  {'pass':>4}  {'seconds':>8}  {'enroll/s':>8}  {'gw CPU ms/enr':>13}  "
        f"{'gw idle ms/s':>12}  {'less idle':>9}  {'broker ms/enr':>13}  {'retries':>7}  "
        f"{'CPU vs 1':>8}  {'less idle vs 1':>14}  {'probe ms':>8}  {'speed-adj. vs 1':>15}"
    )

    def row(r: dict[str, Any], label: str, seconds: str) -> str:
        return (
            f"{r['gateways']:>8}  {label:>4}  {seconds:>8}  {r['enrollments_per_s']:>8.1f}  "
            f"{r['gateway_cpu_ms_per_enrollment']:>13.2f}  "
            f"{r['gateway_idle_cpu_ms_per_s']:>12.1f}  "
            f"{r['gateway_cpu_ms_per_enrollment_less_idle']:>9.2f}  "
            f"{r['broker_cpu_ms_per_enrollment']:>13.2f}  {r['device_retries']:>7g}  "
            f"{r['cpu_per_enrollment_vs_first']:>8.3f}  {r['cpu_less_idle_vs_first']:>14.3f}  "
            f"{r.get('speed_probe_ms', 0.0):>8.1f}  {r.get('speed_adjusted_vs_first', 0.0):>15.3f}"
        )

    lines = [head]
    lines += [row(r, str(r.get("pass", 1)), f"{r['seconds']:.2f}") for r in result["rounds"]]
    if result.get("repeats", 1) > 1:
        lines.append("mean of the passes:")
        lines += [row(e, "all", "") for e in result["summary"]]
    machine = result.get("machine", {})
    devices = result["rounds"][0]["devices"] if result["rounds"] else 0
    lines.append(
        f"{devices} devices per round, concurrency {result['concurrency']}; "
        f"{machine.get('cores', '?')} cores, load average {machine.get('load_average', '?')}; "
        f"logs in {result['work_dir']}"
    )
    return "\n".join(lines)
