"""The PNG in docs/benchmarks.md: onboarding rate and latency over time, one line per run.

matplotlib is a development dependency (``pip install -e '.[dev]'``), not a runtime one: only
this module imports it, and only when asked for a plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["PlotUnavailable", "plot_runs"]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot_runs(results: list[dict[str, Any]], path: Path) -> Path:
    """Draw each enroll result's timeline (rate, p50 and p99 latency per second) and each soak
    result's renewal rate into one PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("plots need matplotlib: pip install -e '.[dev]'") from exc
    enrolls = [r for r in results if r.get("bench") == "enroll" and r.get("timeline")]
    soaks = [r for r in results if r.get("bench") == "soak" and r.get("timeline")]
    if not enrolls and not soaks:
        raise ValueError("no enroll or soak result with a timeline to plot")
    panels = (2 if enrolls else 0) + (1 if soaks else 0)
    figure, axes = plt.subplots(panels, 1, figsize=(9, 3.2 * panels), squeeze=False)
    row = 0
    if enrolls:
        rate, latency = axes[0][0], axes[1][0]
        for result in enrolls:
            label = f"{result['parameters']['broker']}, {result['devices']:,} devices"
            timeline = result["timeline"]
            t = [p["t"] for p in timeline]
            rate.plot(t, [p["onboarded_per_s"] for p in timeline], label=label)
            line = latency.plot(t, [p["p50_ms"] / 1000 for p in timeline], label=f"{label}, p50")
            latency.plot(
                t,
                [p["p99_ms"] / 1000 for p in timeline],
                linestyle="--",
                color=line[0].get_color(),
                label=f"{label}, p99",
            )
        rate.set_ylabel("devices onboarded / s")
        rate.set_title("Onboarding: first connect to operational mutual-TLS session")
        latency.set_ylabel("latency (s)")
        latency.set_xlabel("seconds since the fleet powered on")
        for axis in (rate, latency):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
        row = 2
    if soaks:
        axis = axes[row][0]
        for result in soaks:
            label = (
                f"{result['parameters']['broker']}, {result['devices']:,} devices, "
                f"{result['parameters']['cert_lifetime']} s certificates"
            )
            timeline = result["timeline"]
            axis.plot([p["t"] for p in timeline], [p["renewals_per_s"] for p in timeline],
                      label=label)
        axis.set_ylabel("renewals / s")
        axis.set_xlabel("seconds into the soak")
        axis.set_title("Renewal soak")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
