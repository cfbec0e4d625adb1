"""``fleetgate bench revoke``: how fast a revocation and a quarantine take hold on a live fleet.

``devices`` sensors enroll and hold their operational sessions. Then, one device at a time:

- revoke (``Gateway.revoke``, what the CLI's running gateway and the admin API call): the time
  from the call to the moment the device sees its session cut, and to the moment a reconnect
  with the same certificate is refused (TLS, CONNACK, or a session without any right);
- quarantine (``Gateway.quarantine``): the time the call takes to return, which it does once
  the broker enforces the change; then the device itself checks that it lost its rights (a
  subscription to its command topic is refused).

Stamps are ``time.monotonic()`` in the gateway (call) and in the simulator (cut, refusal): one
clock for every process of the machine.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass
from typing import Any

from gateway.bench.fleet import BenchFleet, FleetSetup
from gateway.bench.machine import describe_machine, versions
from gateway.bench.stats import summarize_ms
from simulators.device import SensorEventKind
from simulators.fleet import device_ids

__all__ = ["RevokeBenchOptions", "run_revoke_bench"]


@dataclass(frozen=True)
class RevokeBenchOptions:
    setup: FleetSetup
    revocations: int = 100  # devices revoked, one at a time
    quarantines: int = 100  # other devices quarantined, one at a time
    wait: float = 10.0  # seconds to wait for one device's cut or refusal
    timeout: float = 900.0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.revocations < 0 or self.quarantines < 0:
            raise ValueError("revocations and quarantines must be >= 0")
        if self.revocations + self.quarantines > self.setup.devices:
            raise ValueError("revocations + quarantines must not exceed devices")
        if self.wait <= 0 or self.timeout <= 0:
            raise ValueError("wait and timeout must be positive")


async def _revoke_one(
    fleet: BenchFleet, device: str, wait: float
) -> tuple[float | None, float | None, float]:
    """(call -> cut, call -> refused reconnect, call duration), seconds; None when not seen."""
    tracker = fleet.tracker
    cut = tracker.expect(device, SensorEventKind.CUT)
    refused = tracker.expect(device, SensorEventKind.REFUSED)
    t0, t1 = await fleet.gateway.act("revoke", device)
    cut_at: float | None = None
    refused_at: float | None = None
    try:
        cut_at = (await asyncio.wait_for(cut, wait)).at - t0
        refused_at = (await asyncio.wait_for(refused, wait)).at - t0
    except TimeoutError:
        pass
    finally:
        fleet.owner[device].drop(device)  # a revoked device has nothing left to try
    return cut_at, refused_at, t1 - t0


async def run_revoke_bench(options: RevokeBenchOptions) -> dict[str, Any]:
    setup = options.setup
    started_at = dt.datetime.now(dt.UTC)
    ids = device_ids("revoke", setup.devices)
    victims = ids[: options.revocations]
    quarantined = ids[options.revocations : options.revocations + options.quarantines]
    cuts: list[float] = []
    refusals: list[float] = []
    revoke_calls: list[float] = []
    missed_cut = missed_refusal = 0
    quarantine_calls: list[float] = []
    verified = 0
    async with BenchFleet(setup) as fleet:
        swarms = await fleet.launch(ids, workers=setup.workers, concurrency=setup.concurrency)
        go = fleet.go(swarms)
        end = await fleet.wait_operational(ids, options.timeout, progress=options.progress)
        onboarded = len(fleet.tracker.operational)
        for index, device in enumerate(victims):
            cut, refused, call = await _revoke_one(fleet, device, options.wait)
            revoke_calls.append(call)
            if cut is None:
                missed_cut += 1
            else:
                cuts.append(cut)
            if refused is None:
                missed_refusal += 1
            else:
                refusals.append(refused)
            if options.progress and (index + 1) % 50 == 0:
                print(f"  revoked {index + 1}/{len(victims)}", flush=True)
        for device in quarantined:
            t0, t1 = await fleet.gateway.act("quarantine", device)
            quarantine_calls.append(t1 - t0)
            if not await fleet.owner[device].probe(device):
                verified += 1
        metrics = await fleet.gateway.metrics()
        await fleet.stop_swarms(swarms)
    return {
        "bench": "revoke",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "parameters": {
            **setup.parameters(),
            "revocations": options.revocations,
            "quarantines": options.quarantines,
        },
        "devices": setup.devices,
        "onboarded": onboarded,
        "onboard_seconds": round(end - go, 2),
        "revoked": len(victims),
        "cut_seen": len(cuts),
        "refusal_seen": len(refusals),
        "missed_cut": missed_cut,
        "missed_refusal": missed_refusal,
        **summarize_ms(cuts, "revoke_cut_"),
        **summarize_ms(refusals, "revoke_refused_"),
        **summarize_ms(revoke_calls, "revoke_call_"),
        "quarantined": len(quarantined),
        "quarantine_verified": verified,
        **summarize_ms(quarantine_calls, "quarantine_"),
        "gateway_metrics": metrics,
    }
