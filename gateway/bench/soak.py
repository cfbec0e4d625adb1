"""``fleetgate bench soak``: a fleet on short-lived certificates, renewing for minutes on end.

``devices`` sensors enroll asking for ``cert_lifetime``-second certificates, then renew at the
gateway's renew-after (about 2/3 of the lifetime, with jitter) over their operational session,
and present each renewed certificate at once on a new session. Counted: renewals, renewal
latency, refusals, and what the goal is about, disconnects caused by expiry (a certificate
that ran out before its renewal arrived, forcing the device back to re-attestation).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

from gateway.bench.fleet import BenchFleet, FleetSetup
from gateway.bench.machine import describe_machine, versions
from gateway.bench.stats import summarize_ms
from simulators.fleet import device_ids

__all__ = ["SoakBenchOptions", "run_soak_bench"]


@dataclass(frozen=True)
class SoakBenchOptions:
    setup: FleetSetup
    minutes: float = 10.0
    # The soak's clock starts once every device is operational, or after this many seconds
    # of onboarding: a gateway that cannot keep up with the renewals of the devices already
    # onboarded never onboards the rest, and that is a result too.
    onboard_timeout: float = 600.0
    progress: bool = False
    bin_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.setup.cert_lifetime is None:
            raise ValueError("a soak needs a certificate lifetime (cert_lifetime)")
        if self.minutes <= 0 or self.onboard_timeout <= 0 or self.bin_seconds <= 0:
            raise ValueError("minutes, onboard_timeout and bin_seconds must be positive")


def _renewal_timeline(
    renewals: list[tuple[float, float]], origin: float, step: float
) -> list[dict[str, float]]:
    bins: dict[int, int] = {}
    for at, _ in renewals:
        bins[int((at - origin) // step)] = bins.get(int((at - origin) // step), 0) + 1
    return [
        {"t": round(i * step, 1), "renewals_per_s": round(bins.get(i, 0) / step, 2)}
        for i in range(min(bins, default=0), max(bins, default=-1) + 1)
    ]


async def run_soak_bench(options: SoakBenchOptions) -> dict[str, Any]:
    setup = options.setup
    started_at = dt.datetime.now(dt.UTC)
    ids = device_ids("soak", setup.devices)
    async with BenchFleet(setup) as fleet:
        swarms = await fleet.launch(ids, workers=setup.workers, concurrency=setup.concurrency)
        go = fleet.go(swarms)
        try:
            end = await fleet.wait_operational(
                ids, options.onboard_timeout, progress=options.progress
            )
            complete = True
        except TimeoutError:
            end, complete = time.monotonic(), False
        cpu0, _, _ = fleet.usage()
        soak_start = time.monotonic()
        deadline = soak_start + options.minutes * 60
        while (now := time.monotonic()) < deadline:
            await asyncio.sleep(min(30.0, deadline - now))
            if options.progress:
                counts = fleet.tracker.counts
                print(
                    f"  {(time.monotonic() - soak_start) / 60:5.1f} min: "
                    f"{counts['renewed']} renewals, {counts['expired']} expired, "
                    f"{counts['cut']} cut, {counts['rejected']} rejected",
                    flush=True,
                )
        soak_seconds = time.monotonic() - soak_start
        cpu1, rss, peak = fleet.usage()
        metrics = await fleet.gateway.metrics()
        rows = await fleet.stop_swarms(swarms)
    counts = fleet.tracker.counts
    renewals = [(at, s) for at, s in fleet.tracker.renewals if at >= soak_start]
    renewed_total = sum(r["renewed"] for r in rows)
    return {
        "bench": "soak",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "parameters": {**setup.parameters(), "minutes": options.minutes},
        "devices": setup.devices,
        "onboarded": len(fleet.tracker.operational),
        "onboard_complete": complete,
        "onboard_seconds": round(end - go, 2),
        "soak_seconds": round(soak_seconds, 1),
        "renewals": renewed_total,
        "renewals_during_soak": len(renewals),
        "renewals_per_s": round(len(renewals) / soak_seconds, 2),
        **summarize_ms([s for _, s in renewals], "renewal_"),
        "failures": sum(fleet.tracker.rejected.values()) + len(fleet.tracker.failed),
        "rejected": dict(fleet.tracker.rejected),
        "expiry_disconnects": sum(r["expired"] for r in rows),
        "reattested": sum(r["reattested"] for r in rows),
        "cut": counts["cut"],
        "refused": counts["refused"],
        "server_cpu_ms_per_renewal": (
            round((cpu1 - cpu0) * 1000 / len(renewals), 3) if renewals else None
        ),
        "server_cpu_percent": round((cpu1 - cpu0) / soak_seconds * 100, 1),
        "rss_kb": rss,
        "peak_rss_kb": peak,
        "gateway_metrics": metrics,
        "timeline": _renewal_timeline(renewals, soak_start, options.bin_seconds),
    }
