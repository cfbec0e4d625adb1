"""Run a fleet of simulated sensors against a gateway and count what happened to them."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pki.factory import FactoryCA
from simulators.device import DeviceOutcome, SensorOptions, SimulatedSensor
from simulators.factory import MODEL


@dataclass(frozen=True)
class FleetOptions:
    devices: int
    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: bytes
    duration: float | None = None
    cert_lifetime: int | None = None
    telemetry_interval: float = 5.0
    # Enrollment connections opened at once: a fleet powering on together is a storm; devices
    # in the field spread themselves with backoff, and so does this runner.
    concurrency: int = 64
    progress: bool = True
    batch: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ValueError("a fleet needs at least one device")
        if self.cert_lifetime is not None and self.cert_lifetime < 60:
            raise ValueError("certificate lifetime must be at least 60 s")


@dataclass
class FleetSummary:
    devices: int
    enrolled: int = 0
    pending: int = 0
    failed: int = 0
    renewed: int = 0
    reattested: int = 0
    telemetry: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, outcome: DeviceOutcome) -> None:
        self.enrolled += outcome.enrolled
        self.pending += outcome.pending
        self.failed += outcome.failed
        self.renewed += outcome.renewed
        self.reattested += outcome.reattested
        self.telemetry += outcome.telemetry
        self.rejected.update(outcome.rejected)

    def as_dict(self) -> dict[str, object]:
        return {
            "devices": self.devices,
            "enrolled": self.enrolled,
            "pending": self.pending,
            "failed": self.failed,
            "renewed": self.renewed,
            "reattested": self.reattested,
            "telemetry": self.telemetry,
            "rejected": dict(self.rejected),
            "seconds": round(self.seconds, 2),
        }


def device_ids(batch: str, count: int) -> list[str]:
    """Serial numbers of one production batch: unique per run, like a real factory lot."""
    return [f"{MODEL.lower()}-{batch}-{n:05d}" for n in range(1, count + 1)]


async def run_fleet(
    options: FleetOptions,
    factory: FactoryCA,
    stop: asyncio.Event | None = None,
    *,
    summary: FleetSummary | None = None,
) -> FleetSummary:
    """Mint a birth certificate per device, run them all until ``duration`` or ``stop``.
    The outcomes are added to ``summary`` when given (a subclass may count more)."""
    stop = stop or asyncio.Event()
    gate = asyncio.Semaphore(options.concurrency)
    sensors = [
        SimulatedSensor(
            factory.mint(device_id, MODEL),
            SensorOptions(
                host=options.host,
                enrollment_port=options.enrollment_port,
                operational_port=options.operational_port,
                ca_pem=options.ca_pem,
                cert_lifetime=options.cert_lifetime,
                telemetry_interval=options.telemetry_interval,
                seed=index,
            ),
            gate,
        )
        for index, device_id in enumerate(device_ids(options.batch, options.devices))
    ]
    started = time.monotonic()
    tasks = [asyncio.create_task(sensor.run(stop)) for sensor in sensors]
    progress_task = (
        asyncio.create_task(_show_progress(sensors, stop)) if options.progress else None
    )
    deadline_task = (
        asyncio.create_task(_stop_after(options.duration, stop))
        if options.duration is not None
        else None
    )
    try:
        outcomes = await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in (progress_task, deadline_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    summary = summary if summary is not None else FleetSummary(devices=options.devices)
    for outcome in outcomes:
        summary.add(outcome)
    summary.seconds = time.monotonic() - started
    return summary


async def _stop_after(seconds: float, stop: asyncio.Event) -> None:
    await asyncio.sleep(seconds)
    stop.set()


async def _show_progress(sensors: list[SimulatedSensor], stop: asyncio.Event) -> None:
    columns = (
        TextColumn("sensors"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("", total=len(sensors))
        while not stop.is_set():
            outcomes = [s.outcome for s in sensors]
            enrolled = sum(o.enrolled for o in outcomes)
            progress.update(
                task,
                completed=enrolled,
                description=(
                    f"enrolled · {sum(o.pending for o in outcomes)} pending · "
                    f"{sum(o.failed for o in outcomes)} failed · "
                    f"{sum(o.renewed for o in outcomes)} renewed · "
                    f"{sum(o.telemetry for o in outcomes)} readings"
                ),
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
