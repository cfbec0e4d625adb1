"""Percentiles and rates, the way the benchmark reports them."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentile", "summarize_ms"]


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in [0, 1]) of ``values``; NaN when empty.
    Nearest rank, not interpolation: every figure reported is one that was measured."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must lie in [0, 1]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def summarize_ms(seconds: Sequence[float], prefix: str = "") -> dict[str, float | None]:
    """p50/p95/p99/max of durations given in seconds, in milliseconds, rounded to 0.1 ms."""
    out: dict[str, float | None] = {}
    for name, fraction in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
        value = percentile(seconds, fraction)
        out[f"{prefix}{name}_ms"] = None if math.isnan(value) else round(value * 1000, 1)
    return out
