"""normal: the fleet of ``simulators.fleet`` as it is."""

from __future__ import annotations

import asyncio

from pki.factory import FactoryCA
from simulators.fleet import FleetOptions, run_fleet
from simulators.modes.common import (
    ModeOptions,
    ModeSummary,
)


async def run_normal(options: ModeOptions, factory: FactoryCA, stop: asyncio.Event) -> ModeSummary:
    summary = ModeSummary(devices=options.devices)
    fleet = await run_fleet(
        FleetOptions(
            devices=options.devices,
            host=options.host,
            enrollment_port=options.enrollment_port,
            operational_port=options.operational_port,
            ca_pem=options.ca_pem,
            duration=options.duration,
            cert_lifetime=options.cert_lifetime,
            telemetry_interval=options.telemetry_interval,
            progress=options.progress,
            batch=options.batch,
        ),
        factory,
        stop,
        summary=summary,
    )
    summary.details = {"fleet_seconds": round(fleet.seconds, 2)}
    return summary
