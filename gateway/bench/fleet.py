"""What every benchmark does: a fresh home, the gateway in its own process, a simulated fleet in
worker processes, and a record of what happened to each device as it happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.bench.home import make_bench_home
from gateway.bench.procstat import ProcessSample, sample_all
from gateway.bench.server import GatewayProcess
from simulators.device import SensorEvent, SensorEventKind
from simulators.swarm import SwarmProcess, SwarmSpec, split

__all__ = ["BenchFleet", "FleetSetup", "Tracker", "server_usage"]

BROKERS = ("embedded", "mosquitto")


@dataclass(frozen=True)
class FleetSetup:
    """Parameters every benchmark shares (all reported with its figures)."""

    devices: int
    broker: str = "embedded"
    workers: int = 2  # simulator processes
    concurrency: int = 32  # enrollments in flight across the whole fleet
    cert_lifetime: int | None = None  # seconds the devices ask for (None: the policy's)
    renew_fraction: float | None = None  # the home's certificates.renew_fraction
    reconnect_after_renewal: bool = False
    response_timeout: float = 10.0
    min_backoff: float = 0.5
    probe_reconnects: bool = False  # time refusals with a bare CONNECT (simulators.probe)
    tuning: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None  # keep the home and logs here (default: a temporary folder)

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int):
            raise TypeError("devices must be an int")
        if self.devices < 1:
            raise ValueError("devices must be at least 1")
        if self.broker not in BROKERS:
            raise ValueError(f"broker must be one of {BROKERS}, not {self.broker!r}")
        if not 1 <= self.workers <= 64:
            raise ValueError("workers must lie in 1..64")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.cert_lifetime is not None and self.cert_lifetime < 60:
            raise ValueError("cert_lifetime must be at least 60 s")

    def parameters(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "broker": self.broker,
            "workers": self.workers,
            "concurrency": self.concurrency,
            "cert_lifetime": self.cert_lifetime,
            "renew_fraction": self.renew_fraction,
            "tuning": dict(self.tuning),
        }


class Tracker:
    """Every SensorEvent of the fleet: counts, first operational time per device, and waits for
    one device's next event of a kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.operational: dict[str, float] = {}
        self.renewals: list[tuple[float, float]] = []  # (at, seconds)
        self.failed: set[str] = set()
        self._waiters: dict[tuple[str, str], list[asyncio.Future[SensorEvent]]] = defaultdict(
            list
        )
        self.changed = asyncio.Event()

    def __call__(self, event: SensorEvent) -> None:
        kind = str(event.kind)
        self.counts[kind] += 1
        if kind == SensorEventKind.OPERATIONAL:
            self.operational.setdefault(event.device_id, event.at)
        elif kind == SensorEventKind.RENEWED:
            self.renewals.append((event.at, float(event.detail or 0.0)))
        elif kind == SensorEventKind.REJECTED:
            self.rejected[event.detail] += 1
        elif kind == SensorEventKind.FAILED:
            self.failed.add(event.device_id)
        for future in self._waiters.pop((event.device_id, kind), []):
            if not future.done():
                future.set_result(event)
        self.changed.set()

    def expect(self, device_id: str, kind: SensorEventKind) -> asyncio.Future[SensorEvent]:
        """A future for ``device_id``'s next ``kind`` event (ask before causing it)."""
        future: asyncio.Future[SensorEvent] = asyncio.get_running_loop().create_future()
        self._waiters[(device_id, str(kind))].append(future)
        return future


def server_usage(samples: list[ProcessSample]) -> tuple[float, int, int]:
    """(CPU seconds, RSS kB, peak RSS kB) summed over the server's processes."""
    return (
        sum(s.cpu_seconds for s in samples),
        sum(s.rss_kb for s in samples),
        sum(s.peak_rss_kb for s in samples),
    )


class BenchFleet:
    """``async with BenchFleet(setup) as fleet:`` a gateway running on a fresh home."""

    def __init__(self, setup: FleetSetup) -> None:
        self.setup = setup
        self.tracker = Tracker()
        self.swarms: list[SwarmProcess] = []
        self.owner: dict[str, SwarmProcess] = {}
        self._own_dir = setup.work_dir is None
        self.folder = setup.work_dir or Path(tempfile.mkdtemp(prefix="fleetgate-bench-"))
        self.server: GatewayProcess | None = None
        self.go_at = 0.0

    async def __aenter__(self) -> BenchFleet:
        self.folder.mkdir(parents=True, exist_ok=True)
        home = self.folder / "home"
        self.settings = make_bench_home(
            home, broker=self.setup.broker, renew_fraction=self.setup.renew_fraction
        )
        self.server = GatewayProcess(
            home, self.setup.broker, tuning=self.setup.tuning, log_path=self.folder / "gateway.log"
        )
        try:
            await self.server.start()
        except BaseException:
            await self.server.kill()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for swarm in self.swarms:
            await swarm.kill()
        if self.server is not None:
            await self.server.stop()
        if self._own_dir:
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def gateway(self) -> GatewayProcess:
        assert self.server is not None, "not started"
        return self.server

    def usage(self) -> tuple[float, int, int]:
        return server_usage(sample_all(self.gateway.server_pids))

    def usage_by_process(self) -> dict[str, ProcessSample]:
        """The gateway's own figures, and each broker process's (named by its pid)."""
        samples = sample_all(self.gateway.server_pids)
        own = self.gateway.pid
        return {"gateway" if s.pid == own else f"broker-{s.pid}": s for s in samples}

    def spec(self, device_ids: tuple[str, ...], *, concurrency: int, seed: int) -> SwarmSpec:
        server = self.gateway
        return SwarmSpec(
            device_ids=device_ids,
            host="127.0.0.1",
            enrollment_port=server.ports["enrollment"],
            operational_port=server.ports["operational"],
            ca_pem=server.ca_pem,
            factory_dir=str(self.settings.home / "factory"),
            concurrency=concurrency,
            cert_lifetime=self.setup.cert_lifetime,
            reconnect_after_renewal=self.setup.reconnect_after_renewal,
            min_backoff=self.setup.min_backoff,
            probe_reconnects=self.setup.probe_reconnects,
            response_timeout=self.setup.response_timeout,
            seed=seed,
        )

    async def launch(
        self, device_ids: list[str], *, workers: int, concurrency: int
    ) -> list[SwarmProcess]:
        """Start worker processes for ``device_ids`` (minting their birth certificates) but do
        not let them go yet; returns them."""
        shares = split(device_ids, workers)
        per_worker = max(1, concurrency // len(shares))
        started = [
            SwarmProcess(
                self.spec(share, concurrency=per_worker, seed=1000 * i + len(self.swarms)),
                on_event=self.tracker,
            )
            for i, share in enumerate(shares)
        ]
        await asyncio.gather(
            *(
                s.start(stderr_path=self.folder / f"swarm-{len(self.swarms) + i}.log")
                for i, s in enumerate(started)
            )
        )
        for swarm in started:
            self.swarms.append(swarm)
            for device_id in swarm.spec.device_ids:
                self.owner[device_id] = swarm
        return started

    def go(self, swarms: list[SwarmProcess], delay: float = 0.3) -> float:
        at = time.monotonic() + delay
        for swarm in swarms:
            swarm.go(at)
        self.go_at = at
        return at

    async def wait_operational(
        self, device_ids: list[str], timeout: float, *, progress: bool = False
    ) -> float:
        """Wait until every device of ``device_ids`` is operational or has failed; returns the
        time.monotonic() of the last one's operational session (the end of onboarding)."""
        wanted = set(device_ids)
        deadline = time.monotonic() + timeout
        last_report = 0.0
        while True:
            done = [d for d in wanted if d in self.tracker.operational or d in self.tracker.failed]
            if len(done) == len(wanted):
                break
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(
                    f"{len(wanted) - len(done)} of {len(wanted)} devices not operational "
                    f"after {timeout:.0f} s"
                )
            if progress and now - last_report >= 5.0:
                last_report = now
                print(
                    f"  {now - self.go_at:6.1f} s: {len(done)}/{len(wanted)} operational",
                    flush=True,
                )
            self.tracker.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.tracker.changed.wait(), 1.0)
        times = [self.tracker.operational[d] for d in wanted if d in self.tracker.operational]
        return max(times) if times else time.monotonic()

    async def stop_swarms(self, swarms: list[SwarmProcess]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for result in await asyncio.gather(*(s.stop() for s in swarms)):
            rows.extend(result)
        for swarm in swarms:
            self.swarms.remove(swarm)
        return rows


def cores() -> int:
    return os.cpu_count() or 1
