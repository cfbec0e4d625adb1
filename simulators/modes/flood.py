"""flood: one client's storm of requests while other devices enroll."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections import Counter

from cryptography.hazmat.primitives.serialization import Encoding

from pki.factory import BirthCredential, FactoryCA
from simulators.device import (
    DeviceOutcome,
    SensorEvent,
    SimulatedSensor,
)
from simulators.factory import MODEL
from simulators.modes.common import (
    ANSWER_TYPES,
    ModeOptions,
    ModeSummary,
)
from simulators.storm import StormProcess, StormSpec


async def _enroll_latencies(
    options: ModeOptions, factory: FactoryCA, ids: list[str]
) -> tuple[list[float], list[DeviceOutcome]]:
    """Enroll ``ids``, ``flood_concurrency`` at a time; each device's seconds from its first
    connect to its certificate."""
    credentials = [factory.mint(d, MODEL) for d in ids]
    enrolled: dict[str, float] = {}
    done = asyncio.Event()

    def on_event(event: SensorEvent) -> None:
        if event.kind == "enrolled":
            enrolled.setdefault(event.device_id, event.at)
        if event.kind in ("enrolled", "failed") and len(enrolled) >= len(ids):
            done.set()

    gate = asyncio.Semaphore(min(len(ids), options.flood_concurrency))
    sensors = [
        SimulatedSensor(c, options.sensor(i, telemetry_interval=0), gate, on_event=on_event)
        for i, c in enumerate(credentials)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in sensors]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 4 * options.response_timeout + 30)
    stop.set()
    outcomes = await asyncio.gather(*tasks)
    latencies = [
        o.enrolled_at - o.started_at
        for o in outcomes
        if o.enrolled_at is not None and o.started_at is not None
    ]
    return latencies, outcomes


def median_ms(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2] * 1000, 1)


def _storm_spec(options: ModeOptions, flooder: BirthCredential) -> StormSpec:
    return StormSpec(
        host=options.host,
        port=options.enrollment_port,
        ca_pem=options.ca_pem.decode(),
        device_id=flooder.serial_number,
        chain=tuple(
            base64.b64encode(c.public_bytes(Encoding.DER)).decode()
            for c in flooder.presented_chain
        ),
        parallel=options.flood_parallel,
        timeout=options.response_timeout,
    )


async def run_flood(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    """Rounds of ``devices`` devices enrolling on a calm gateway, then as many others during a
    storm from one client (in a process of its own); compare their median enrollment latency.
    Calm and storm rounds alternate, so a shared machine's drifting load weighs on both."""
    summary = ModeSummary(devices=2 * options.devices * options.flood_rounds + 1)
    flooder = factory.mint(options.ids("flooder", 1)[0], MODEL)
    baseline: list[float] = []
    flooded: list[float] = []
    counts: Counter[str] = Counter()
    for round_ in range(options.flood_rounds):
        if stop.is_set():
            break
        latencies, outcomes = await _enroll_latencies(
            options, factory, options.ids(f"calm{round_}")
        )
        baseline += latencies
        for outcome in outcomes:
            summary.add(outcome)
        storm = StormProcess()
        await storm.start(_storm_spec(options, flooder))
        await asyncio.sleep(1.0)  # let the storm build up before the others come
        try:
            latencies, outcomes = await _enroll_latencies(
                options, factory, options.ids(f"storm{round_}")
            )
        finally:
            counts.update(await storm.stop())
        flooded += latencies
        for outcome in outcomes:
            summary.add(outcome)
    calm_ms, storm_ms = median_ms(baseline), median_ms(flooded)
    sent = counts.pop("sent", 0)
    summary.details = {
        "rounds": options.flood_rounds,
        "flood_sent": sent,
        "flood_answers": dict(counts),
        "flood_unanswered": max(sent - sum(counts.values()), 0),
        "baseline_p50_ms": calm_ms,
        "flood_p50_ms": storm_ms,
        "slowdown_pct": (
            round((storm_ms / calm_ms - 1) * 100, 1) if calm_ms and storm_ms else None
        ),
    }
    summary.rejected.update({k: v for k, v in counts.items() if k not in ANSWER_TYPES})
    return summary
