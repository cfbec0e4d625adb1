"""Sensor readings that look like a real temperature/humidity sensor on a battery.

Each sensor has its own set point, drifts slowly (a bounded random walk), carries measurement
noise, and drains its battery a little with every reading. Deterministic for a given seed, so
a scenario can be replayed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field


@dataclass
class SensorModel:
    seed: int
    temperature_c: float = field(init=False)
    humidity_pct: float = field(init=False)
    battery_pct: float = field(init=False)
    sequence: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._temperature_set = self._random.uniform(18.0, 26.0)
        self._humidity_set = self._random.uniform(35.0, 60.0)
        self.temperature_c = self._temperature_set
        self.humidity_pct = self._humidity_set
        self.battery_pct = self._random.uniform(80.0, 100.0)

    def read(self) -> dict[str, float | int]:
        r = self._random
        # Mean-reverting drift: wanders but stays near its set point, like a room does.
        self.temperature_c += 0.05 * (self._temperature_set - self.temperature_c) + r.gauss(0, 0.08)
        self.humidity_pct += 0.05 * (self._humidity_set - self.humidity_pct) + r.gauss(0, 0.3)
        self.humidity_pct = min(100.0, max(0.0, self.humidity_pct))
        self.battery_pct = max(0.0, self.battery_pct - r.uniform(0.0005, 0.002))
        self.sequence += 1
        return {
            "seq": self.sequence,
            "temperature_c": round(self.temperature_c + r.gauss(0, 0.05), 2),
            "humidity_pct": round(self.humidity_pct + r.gauss(0, 0.2), 1),
            "battery_pct": round(self.battery_pct, 2),
        }

    def payload(self) -> bytes:
        return json.dumps(self.read(), separators=(",", ":")).encode()
