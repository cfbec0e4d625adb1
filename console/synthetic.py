"""Synthetic fleets for benchmarks, tests and screenshots: deterministic for a given seed."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from console.rows import DeviceRow

MODELS = ("TH-200", "TH-300", "GW-10", "PM-2.5", "CO2-8")
FIRMWARE = ("1.4.2", "1.5.0", "2.0.1", "2.1.0-rc1")
STATE_WEIGHTS = (("active", 88), ("pending", 5), ("quarantined", 5), ("revoked", 2))


def synthetic_rows(count: int, now: datetime, *, seed: int = 7) -> list[DeviceRow]:
    """``count`` device rows: mostly active and online, some pending, quarantined, revoked;
    certificates expiring over the next hours, a few already expired."""
    rng = random.Random(seed)
    states = [s for s, _ in STATE_WEIGHTS]
    weights = [w for _, w in STATE_WEIGHTS]
    rows = []
    for n in range(count):
        model = MODELS[n % len(MODELS)]
        state = rng.choices(states, weights)[0]
        connected = state in ("active", "quarantined") and rng.random() < 0.8
        rows.append(
            DeviceRow(
                id=f"{model.lower().replace('.', '')}-{n:06d}",
                kind="device",
                state=state,
                connected=connected,
                model=model,
                manufacturer="Acme Sensors",
                firmware_version=rng.choice(FIRMWARE),
                cert_not_after=(
                    None
                    if state == "pending"
                    else now + timedelta(seconds=rng.randint(-600, 6 * 3600))
                ),
                last_seen_at=(
                    None if state == "pending" else now - timedelta(seconds=rng.randint(0, 7200))
                ),
            )
        )
    return rows
