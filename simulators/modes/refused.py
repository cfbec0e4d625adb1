"""rogue and tamper: devices the gateway must refuse for good."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

from gateway.protocol.messages import Firmware
from pki.clock import SystemClock
from pki.factory import BirthCredential, FactoryCA
from simulators.device import (
    SensorEvent,
    SensorOptions,
    SimulatedSensor,
)
from simulators.factory import FIRMWARE_VERSION, MODEL
from simulators.modes.common import (
    ModeOptions,
    ModeSummary,
)

ROGUE_MANUFACTURER = "Rogue Devices Inc"
# The simulated image with something added: same version string, another digest.
TAMPERED_FIRMWARE = Firmware(
    version=FIRMWARE_VERSION,
    digest=hashlib.sha256(b"acme-th200-firmware-1.4.2+implant").hexdigest(),
)


async def _refused_fleet(
    options: ModeOptions,
    credentials: list[BirthCredential],
    stop: asyncio.Event,
    sensor_options: Callable[[int], SensorOptions],
) -> ModeSummary:
    """Run sensors until each is told to give up (or ``stop``, or its patience runs out)."""
    summary = ModeSummary(devices=len(credentials))
    gate = asyncio.Semaphore(64)
    failed = asyncio.Event()
    remaining = len(credentials)

    def on_event(event: SensorEvent) -> None:
        nonlocal remaining
        if event.kind == "failed":
            remaining -= 1
            if remaining == 0:
                failed.set()
        elif event.kind == "refused":
            summary.refused["connection"] += 1

    sensors = [
        SimulatedSensor(c, sensor_options(i), gate, on_event=on_event)
        for i, c in enumerate(credentials)
    ]
    local_stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(local_stop)) for s in sensors]
    waiters = [asyncio.ensure_future(failed.wait()), asyncio.ensure_future(stop.wait())]
    patience = options.duration or 4 * options.response_timeout + 10.0
    await asyncio.wait(waiters, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    local_stop.set()
    for outcome in await asyncio.gather(*tasks):
        summary.add(outcome)
    return summary


async def run_rogue(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    rogue = FactoryCA.create(ROGUE_MANUFACTURER, SystemClock())
    credentials = [rogue.mint(d, MODEL) for d in options.ids("rogue")]
    summary = await _refused_fleet(options, credentials, stop, lambda i: options.sensor(i))
    summary.details = {"manufacturer": ROGUE_MANUFACTURER}
    return summary


async def run_tamper(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    credentials = [factory.mint(d, MODEL) for d in options.ids("tamper")]
    summary = await _refused_fleet(
        options,
        credentials,
        stop,
        lambda i: options.sensor(i, firmware=TAMPERED_FIRMWARE),
    )
    summary.details = {"model": MODEL, "reported_digest": TAMPERED_FIRMWARE.digest}
    return summary
