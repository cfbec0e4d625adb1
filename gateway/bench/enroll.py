"""``fleetgate bench enroll``: a fleet from first connect to operational mutual-TLS sessions.

One run, in order:

1. a fresh home and the gateway in its own process (``server``);
2. idle latency: ``idle_samples`` devices one after another on the otherwise idle gateway;
3. the floor (``floor``): in-process enrollment CPU, and the server CPU of bare TLS handshakes on
   both listeners of this very gateway;
4. the fleet: ``devices`` sensors in ``workers`` processes, ``concurrency`` enrollments in
   flight; the clock runs from the go signal to the last device's operational session. Server
   CPU (gateway + broker processes) is read at both ends; memory once every device holds its
   session.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.bench.fleet import BenchFleet, FleetSetup, cores
from gateway.bench.floor import Floor, enrollment_cpu_ms, handshake_cpu_ms, idle_cpu_rate
from gateway.bench.machine import describe_machine, versions
from gateway.bench.stats import percentile, summarize_ms
from simulators.conversation import enroll_once
from simulators.device import SensorOptions
from simulators.factory import MODEL, load_or_create_factory
from simulators.fleet import device_ids
from simulators.tls import mutual_context, shared_server_auth_context

__all__ = ["EnrollBenchOptions", "run_enroll_bench", "timeline"]

_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class EnrollBenchOptions:
    setup: FleetSetup
    idle_samples: int = 20
    floor_samples: int = 200
    handshake_samples: int = 300
    timeout: float = 900.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.idle_samples < 1 or self.floor_samples < 1 or self.handshake_samples < 1:
            raise ValueError("sample counts must be at least 1")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")


def timeline(
    starts: dict[str, float], operational: dict[str, float], origin: float, step: float = 1.0
) -> list[dict[str, float]]:
    """Onboarded devices per ``step`` seconds and the latency (first connect to operational
    session) of those onboarded in each step: what the plot shows."""
    bins: dict[int, list[float]] = {}
    for device, at in operational.items():
        began = starts.get(device)
        if began is None:
            continue
        bins.setdefault(int((at - origin) // step), []).append(at - began)
    rows = []
    for index in range(min(bins, default=0), max(bins, default=-1) + 1):
        latencies = bins.get(index, [])
        rows.append(
            {
                "t": round(index * step, 3),
                "onboarded_per_s": round(len(latencies) / step, 1),
                "p50_ms": round(percentile(latencies, 0.5) * 1000, 1) if latencies else 0.0,
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else 0.0,
            }
        )
    return rows


async def _idle_latency(fleet: BenchFleet, count: int) -> dict[str, Any]:
    """Devices one at a time on the idle gateway: the latency a lone device sees."""
    ids = [f"idle-{n:04d}" for n in range(count)]
    swarms = await fleet.launch(ids, workers=1, concurrency=1)
    # One device at a time: each starts when the previous one is operational.
    fleet.go(swarms, delay=0.1)
    await fleet.wait_operational(ids, timeout=60.0 + 10.0 * count)
    rows = await fleet.stop_swarms(swarms)
    latencies = [
        r["operational_at"] - r["started_at"]
        for r in rows
        if r["operational_at"] is not None and r["started_at"] is not None
    ]
    return summarize_ms(latencies, "idle_")


async def _floor(fleet: BenchFleet, options: EnrollBenchOptions) -> Floor:
    server = fleet.gateway
    ca = server.ca_pem.encode()
    factory = load_or_create_factory(fleet.settings.home / "factory")
    probe = SensorOptions(
        host="127.0.0.1",
        enrollment_port=server.ports["enrollment"],
        operational_port=server.ports["operational"],
        ca_pem=ca,
    )
    conversation = await enroll_once(factory.mint("floor-probe", MODEL), probe)
    enrolled = conversation.enrolled
    assert enrolled is not None
    pids = server.server_pids
    idle = await idle_cpu_rate(pids)
    enroll_hs = await handshake_cpu_ms(
        pids,
        "127.0.0.1",
        server.ports["enrollment"],
        shared_server_auth_context(ca),
        count=options.handshake_samples,
        idle_rate=idle,
    )
    mutual = mutual_context(ca, enrolled.key, enrolled.certificate, enrolled.chain[:-1])
    operational_hs = await handshake_cpu_ms(
        pids,
        "127.0.0.1",
        server.ports["operational"],
        mutual,
        count=options.handshake_samples,
        idle_rate=idle,
    )
    loop = asyncio.get_running_loop()
    enrollment = await loop.run_in_executor(
        None, enrollment_cpu_ms, options.floor_samples, fleet.folder / "floor"
    )
    return Floor(enrollment, enroll_hs, operational_hs)


# The fleet's load has settled this long after it starts; the floor's enrollment is measured
# again then, in the same conditions as the gateway (the same two cores, as busy).
_LOADED_AFTER_SECONDS = 3.0
_LOADED_SAMPLES = 100


async def _enrollment_under_load(folder: Path, samples: int) -> tuple[float, float]:
    """The floor's in-process enrollment measured while the fleet onboards; with the moment
    the measurement ended (monotonic), to tell whether the fleet was still running."""
    await asyncio.sleep(_LOADED_AFTER_SECONDS)
    loop = asyncio.get_running_loop()
    cost = await loop.run_in_executor(None, enrollment_cpu_ms, samples, folder)
    return cost, time.monotonic()


async def _measured_in_time(
    measuring: asyncio.Task[tuple[float, float]], end: float
) -> float | None:
    """The figure if it was measured while the fleet still ran; None otherwise (a small
    fleet done first: a figure from an unloaded machine would mislead)."""
    if not measuring.done():
        measuring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await measuring
        return None
    cost, measured_at = measuring.result()
    return cost if measured_at <= end else None


async def run_enroll_bench(options: EnrollBenchOptions) -> dict[str, Any]:
    setup = options.setup
    started_at = dt.datetime.now(dt.UTC)
    async with BenchFleet(setup) as fleet:
        idle = await _idle_latency(fleet, options.idle_samples)
        floor = await _floor(fleet, options)
        ids = device_ids("bench", setup.devices)
        swarms = await fleet.launch(ids, workers=setup.workers, concurrency=setup.concurrency)
        before = fleet.usage_by_process()
        go = fleet.go(swarms)
        loaded = asyncio.create_task(
            _enrollment_under_load(
                fleet.folder / "floor-loaded", min(_LOADED_SAMPLES, options.floor_samples)
            )
        )
        try:
            end = await fleet.wait_operational(ids, options.timeout, progress=options.progress)
        except BaseException:
            loaded.cancel()
            raise
        after = fleet.usage_by_process()
        floor = floor.under_load(await _measured_in_time(loaded, end))
        await asyncio.sleep(_SETTLE_SECONDS)
        settled = fleet.usage_by_process()
        metrics = await fleet.gateway.metrics()
        rows = await fleet.stop_swarms(swarms)
    # Processes present at both ends (a broker restarted meanwhile would be counted from 0).
    names = [n for n in before if n in after and n in settled]
    usage = _Usage(
        cpu_seconds={n: after[n].cpu_seconds - before[n].cpu_seconds for n in names},
        rss_growth_kb={n: settled[n].rss_kb - before[n].rss_kb for n in names},
        peak_rss_kb=sum(s.peak_rss_kb for s in settled.values()),
    )
    return _result(options, started_at, idle, floor, rows, go, end, usage, metrics)


@dataclass(frozen=True)
class _Usage:
    """Server resources over the fleet's onboarding, by process (gateway, broker)."""

    cpu_seconds: dict[str, float]
    rss_growth_kb: dict[str, int]
    peak_rss_kb: int


def _result(
    options: EnrollBenchOptions,
    started_at: dt.datetime,
    idle: dict[str, Any],
    floor: Floor,
    rows: list[dict[str, Any]],
    go: float,
    end: float,
    usage: _Usage,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    onboarded = [r for r in rows if r["operational_at"] is not None]
    latencies = [r["operational_at"] - r["started_at"] for r in onboarded]
    certificate = [
        r["enrolled_at"] - r["started_at"] for r in onboarded if r["enrolled_at"] is not None
    ]
    count = len(onboarded)
    seconds = max(end - go, 1e-9)
    cpu_seconds = sum(usage.cpu_seconds.values())
    rss_growth_kb = sum(usage.rss_growth_kb.values())
    server_ms = cpu_seconds * 1000 / count if count else None
    rejected: dict[str, int] = {}
    for row in rows:
        for reason, n in row["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    result: dict[str, Any] = {
        "bench": "enroll",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "parameters": options.setup.parameters(),
        "devices": options.setup.devices,
        "onboarded": count,
        "failed": sum(r["failed"] for r in rows),
        "rejected": rejected,
        "connection_errors": sum(r["refused"] + r["cut"] for r in rows),
        "seconds": round(seconds, 2),
        "enroll_per_s": round(count / seconds, 1),
        **summarize_ms(latencies),
        **summarize_ms(certificate, "certificate_"),
        **idle,
        "server_cpu_ms_per_device": round(server_ms, 3) if server_ms is not None else None,
        "server_cpu_ms_per_device_by_process": {
            name: round(seconds * 1000 / count, 3) if count else None
            for name, seconds in usage.cpu_seconds.items()
        },
        **floor.as_dict(),
        "cpu_vs_floor": round(server_ms / floor.per_device_ms, 2) if server_ms else None,
        "cpu_vs_floor_under_load": (
            round(server_ms / floor.loaded_per_device_ms, 2)
            if server_ms and floor.loaded_per_device_ms
            else None
        ),
        "ceiling_per_s": round(cores() * 1000 / floor.per_device_ms, 1),
        "peak_rss_kb": usage.peak_rss_kb,
        "rss_kb_per_device": round(rss_growth_kb / count, 1) if count else None,
        "rss_kb_per_device_by_process": {
            name: round(kb / count, 1) if count else None
            for name, kb in usage.rss_growth_kb.items()
        },
        "gateway_metrics": metrics,
        "timeline": timeline(
            {r["device"]: r["started_at"] for r in onboarded if r["started_at"] is not None},
            {r["device"]: r["operational_at"] for r in onboarded},
            go,
        ),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return result
