"""Full garbage collections that do not stop the gateway for longer as its fleet grows.

CPython's cyclic collector scans, at every full (generation 2) collection, every container
object that has survived so far. A gateway's long-lived objects grow with its fleet (each
embedded-broker session holds its TLS objects, its MQTT session and its routing entries), and
the collector runs a full collection each time the objects that survived since the last one
reach a quarter of the rest. Measured (``fleetgate bench enroll --tuning gc_log=1``, embedded
broker, 6,000 devices onboarding): 20 full collections, growing from 94 ms to 1.4 s each; the
event loop, the broker and the enrollment thread all stop meanwhile, about a tenth of the run.

``CollectorPolicy`` freezes what survives each full collection (``gc.freeze``: moved to a
generation the collector never scans), so the next full collection scans only what was
created since: its pause follows the rate of change, not the size of the fleet. Frozen objects
are still freed by reference counting; only garbage in reference cycles among them would
stay (a disconnected session's TLS and protocol objects, for instance), so the policy
unfreezes everything and lets the next full collection scan (and reclaim) the whole heap once
``rescan_seconds`` have passed, or sooner once the frozen objects have grown to ``growth``
times what the last rescan left: frozen garbage never exceeds about the live heap (with the
default of 2), however many devices come and go. During a fleet's onboarding that is one long
pause per doubling of the heap, against one every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["DEFAULT_GROWTH", "DEFAULT_RESCAN_SECONDS", "CollectorPolicy"]

DEFAULT_RESCAN_SECONDS = 600.0
DEFAULT_GROWTH = 2.0


class CollectorPolicy:
    """Install on the gateway's loop with ``install()``; ``uninstall()`` puts the collector
    back as it was (everything unfrozen). ``metrics`` counts ``full`` collections, ``frozen``
    (survivors frozen after one), ``rescans`` and ``rescans.growth`` (those the frozen
    objects' growth brought forward); ``longest_pause_ms`` is the longest full collection seen
    and ``frozen_objects`` how many objects were frozen at the last freeze."""

    def __init__(
        self,
        *,
        rescan_seconds: float = DEFAULT_RESCAN_SECONDS,
        growth: float = DEFAULT_GROWTH,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (("rescan_seconds", rescan_seconds), ("growth", growth)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number")
        if rescan_seconds <= 0:
            raise ValueError("rescan_seconds must be > 0")
        if growth <= 1:
            raise ValueError("growth must be > 1")
        self._rescan_seconds = float(rescan_seconds)
        self._growth = float(growth)
        self._baseline = 0  # objects frozen at the first freeze after the last rescan
        self.frozen_objects = 0
        self._monotonic = monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: float | None = None
        self._last_rescan = monotonic()
        self.metrics: Counter[str] = Counter()
        self.longest_pause_ms = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch full collections from now on; what exists now (modules, configuration, the
        gateway's start-up objects) is collected once and frozen."""
        if self._loop is not None:
            raise RuntimeError("already installed")
        self._loop = loop
        gc.collect()
        gc.freeze()
        self._last_rescan = self._monotonic()
        self._baseline = self.frozen_objects = gc.get_freeze_count()
        gc.callbacks.append(self._on_collection)

    def uninstall(self) -> None:
        if self._on_collection in gc.callbacks:
            gc.callbacks.remove(self._on_collection)
        self._loop = None
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # Runs inside the collector, on whichever thread triggered it: note the time, and
        # leave the freezing to the loop (no collector calls from within a collection).
        if info.get("generation") != 2:
            return
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        if self._started is not None:
            self.longest_pause_ms = max(self.longest_pause_ms, (now - self._started) * 1000)
            self._started = None
        self.metrics["full"] += 1
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the gateway is stopping
            loop.call_soon_threadsafe(self.after_full_collection)

    def after_full_collection(self) -> None:
        """Freeze the survivors of the full collection that just ended, or unfreeze everything
        so that the next one scans the whole heap (every ``rescan_seconds``, or once the frozen
        objects have grown ``growth`` times since the last rescan)."""
        if self._loop is None:  # uninstalled while this call was queued
            return
        now = self._monotonic()
        due = now - self._last_rescan >= self._rescan_seconds
        grown = self._baseline > 0 and gc.get_freeze_count() >= self._growth * self._baseline
        if due or grown:
            gc.unfreeze()
            self._last_rescan = now
            self._baseline = 0
            self.metrics["rescans"] += 1
            if grown and not due:
                self.metrics["rescans.growth"] += 1
            return
        gc.freeze()
        self.frozen_objects = gc.get_freeze_count()
        if self._baseline == 0:
            self._baseline = self.frozen_objects
        self.metrics["frozen"] += 1
