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


def _windows(
    timeline: list[dict[str, float]], key: str, seconds: float, *, skip_empty: bool = False
) -> tuple[list[float], list[float]]:
    """``key`` averaged over consecutive windows of ``seconds`` (per-second figures from a
    shared machine are too jumpy to read); ``skip_empty`` leaves out seconds in which no device
    finished (they have no latency)."""
    xs: list[float] = []
    ys: list[float] = []
    window: list[float] = []
    start = timeline[0]["t"] if timeline else 0.0
    for point in timeline:
        if point["t"] - start >= seconds:
            if window:
                xs.append(start + seconds / 2)
                ys.append(sum(window) / len(window))
            start, window = point["t"], []
        if not (skip_empty and point.get("onboarded_per_s", 1) == 0):
            window.append(point[key])
    if window:
        xs.append(start + seconds / 2)
        ys.append(sum(window) / len(window))
    return xs, ys


def plot_runs(results: list[dict[str, Any]], path: Path, window: float = 10.0) -> Path:
    """Draw each enroll result's timeline (onboarding rate, p50 and p99 latency, averaged over
    ``window`` seconds) and each soak result's renewal rate into one PNG at ``path``."""
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
            rate.plot(*_windows(timeline, "onboarded_per_s", window), label=label)
            t50, p50 = _windows(timeline, "p50_ms", window, skip_empty=True)
            t99, p99 = _windows(timeline, "p99_ms", window, skip_empty=True)
            line = latency.plot(t50, [v / 1000 for v in p50], label=f"{label}, p50")
            latency.plot(
                t99,
                [v / 1000 for v in p99],
                linestyle="--",
                color=line[0].get_color(),
                label=f"{label}, p99",
            )
        rate.set_ylabel(f"devices onboarded / s\n({window:.0f} s average)")
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
