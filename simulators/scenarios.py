"""Labelled detection scenarios: a normal fleet with hostile devices of one mode among it.

One normal fleet (``NormalFleet``, the ``normal`` mode) runs in the background for a whole
evaluation: it starts ``FleetPlan.warmup`` seconds before the first scenario, so that baselines
of its devices and of their model exist when hostile devices show up, as in a deployment.
Scenarios then run one after another, each a window of ``seconds``: its hostile devices start
at the window's beginning (an exfil device behaves for its ramp's warm-up first) and whatever a
detector says is watched until the window ends. ``CONTROL`` is a window without hostile
devices.

The labels (``ScenarioLabels``) say which devices are hostile and when each one's behaviour
started, in ``time.monotonic()`` (one clock for every process of a machine): the moment a mode
recorded (``details["behaviour_started"]``, as exfil does), otherwise the moment the hostile
mode was started, which is no later than its behaviour. A scenario's own devices have ids
starting with its prefix, so an alert about them belongs to it whenever it arrives; the
devices a hostile mode brings along (a prober's victims, the devices enrolling beside a flood)
are labelled normal. The fleet's devices are normal throughout; an alert about one belongs to
the scenario whose window it falls in.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pki.factory import FactoryCA
from simulators.factory import MODEL
from simulators.fleet import device_ids
from simulators.modes import (
    BEHAVIOUR_STARTED,
    ExfilRamp,
    Mode,
    ModeOptions,
    ModeSummary,
    run_exfil,
    run_mode,
)
from simulators.modes.exfil import EXFIL

__all__ = [
    "CONTROL",
    "HOSTILE_MODES",
    "FleetPlan",
    "NormalFleet",
    "Scenario",
    "ScenarioLabels",
    "ScenarioRun",
    "Target",
    "hostile_ids",
    "label_scenario",
    "quick_scenarios",
    "run_scenario",
    "short_plan",
    "standard_scenarios",
]

HOSTILE_MODES = ("prober", "flood", "clone", "tamper", EXFIL)
CONTROL = "normal"  # a window without hostile devices: only false alerts can happen there
# flood: devices enrolling beside the one flooding client, in one calm and one storm round.
FLOOD_ENROLLEES = 4
# exfil devices behave this long before their ramp: a baseline of their own by then, like a
# device compromised after months of service (see FleetPlan.warmup).
STANDARD_EXFIL_WARMUP = 420.0


def _check_numbers(owner: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name} must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite")


@dataclass(frozen=True)
class FleetPlan:
    """The normal fleet every scenario runs beside."""

    devices: int = 20
    # Seconds the fleet runs before the first scenario: long enough for a detector to trust
    # the devices' own baselines (the gateway's anomaly.warmup_minutes is 5 by default, of
    # whole minutes connected throughout: the first, partial minute does not count).
    warmup: float = 420.0
    telemetry_interval: float = 2.0  # every device's normal reading interval, hostile included

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int):
            raise TypeError("devices must be an int")
        if self.devices < 1:
            raise ValueError("the fleet needs at least one device")
        _check_numbers(self, ("warmup", "telemetry_interval"))
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.telemetry_interval <= 0:
            raise ValueError("telemetry_interval must be positive")


@dataclass(frozen=True)
class Scenario:
    """``mode``: one of ``HOSTILE_MODES``, or ``CONTROL``. ``hostile_devices``: exfil, clone
    and tamper devices, or probers (each with a victim); a flood has one flooding client."""

    mode: str
    hostile_devices: int = 2
    seconds: float = 90.0  # the window: hostile devices start at its beginning
    # exfil only: how its devices raise their volume, after behaving for the ramp's warm-up
    ramp: ExfilRamp = field(default_factory=lambda: ExfilRamp(warmup=STANDARD_EXFIL_WARMUP))

    def __post_init__(self) -> None:
        if self.mode not in (*HOSTILE_MODES, CONTROL):
            raise ValueError(
                f"mode must be one of {', '.join((*HOSTILE_MODES, CONTROL))}, not {self.mode!r}"
            )
        if isinstance(self.hostile_devices, bool) or not isinstance(self.hostile_devices, int):
            raise TypeError("hostile_devices must be an int")
        if self.mode == CONTROL and self.hostile_devices != 0:
            raise ValueError("the control scenario has no hostile devices (hostile_devices=0)")
        if self.mode == "flood" and self.hostile_devices != 1:
            raise ValueError("a flood comes from one client (hostile_devices=1)")
        if self.mode in HOSTILE_MODES and self.hostile_devices < 1:
            raise ValueError(f"{self.mode} needs at least one hostile device")
        _check_numbers(self, ("seconds",))
        if self.seconds <= 0:
            raise ValueError("seconds must be positive")
        if not isinstance(self.ramp, ExfilRamp):
            raise TypeError("ramp must be an ExfilRamp")
        if self.mode == EXFIL and self.seconds <= self.ramp.warmup:
            raise ValueError("an exfil window must outlast the ramp's warm-up")


@dataclass(frozen=True)
class Target:
    """The gateway the devices talk to."""

    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: bytes
    response_timeout: float = 10.0
    cert_lifetime: int | None = None


@dataclass(frozen=True)
class ScenarioLabels:
    """Who is hostile in one scenario run, and since when.

    ``hostile`` maps each hostile device to the ``time.monotonic()`` its behaviour started, or
    None when it never started (an exfil device stopped during its warm-up): nothing to detect
    there, and any alert about it is a false one. Every other device with the ``prefix`` is
    normal, and so is every device of the ``fleet`` (during the window ``began``..``ended``).
    """

    mode: str
    prefix: str
    hostile: Mapping[str, float | None]
    fleet: frozenset[str]
    began: float  # the window, time.monotonic()
    ended: float

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("prefix must not be empty")
        object.__setattr__(self, "fleet", frozenset(self.fleet))
        object.__setattr__(self, "hostile", MappingProxyType(dict(self.hostile)))
        strays = [d for d in self.hostile if not d.startswith(self.prefix)]
        if strays:
            raise ValueError(f"{strays[0]!r} does not start with the prefix {self.prefix!r}")
        mixed = [d for d in self.fleet if d.startswith(self.prefix)]
        if mixed:
            raise ValueError(f"the fleet's {mixed[0]!r} has the scenario's prefix")
        if self.ended < self.began:
            raise ValueError("ended must not come before began")

    def own(self, device_id: str | None) -> bool:
        """True for the scenario's own devices (hostile ones and those they brought along)."""
        return device_id is not None and device_id.startswith(self.prefix)

    def started(self, device_id: str) -> float | None:
        """When ``device_id``'s hostile behaviour started (None: normal, or never started)."""
        return self.hostile.get(device_id)

    @property
    def seconds(self) -> float:
        return self.ended - self.began

    @property
    def normal_device_hours(self) -> float:
        """The fleet's device-hours in this window."""
        return len(self.fleet) * self.seconds / 3600.0


@dataclass
class ScenarioRun:
    scenario: Scenario
    labels: ScenarioLabels
    summary: ModeSummary | None  # the hostile mode's (None for the control, or on error)
    error: str | None = None  # the hostile mode failed (its devices count as not detected)

    @property
    def devices(self) -> int:
        """Every device in the window: the fleet and the mode's own."""
        return len(self.labels.fleet) + (self.summary.devices if self.summary else 0)


def hostile_ids(mode: str, options: ModeOptions) -> list[str]:
    """The ids of the hostile devices ``mode`` creates under ``options`` (its other devices,
    such as a prober's victims, are not hostile). The names follow each mode's runner."""
    if mode == "prober":
        pairs = max(options.devices // 2, 1)
        return options.ids("probe", 2 * pairs)[0::2]  # probers; the victims are odd
    if mode == "flood":
        return options.ids("flooder", 1)
    if mode in ("clone", "tamper", EXFIL):
        return options.ids(mode)
    raise ValueError(f"no hostile devices in mode {mode!r}")


def label_scenario(
    mode: str,
    prefix: str,
    hostile: list[str],
    recorded: Mapping[str, float],
    hostile_began: float | None,
    fleet: frozenset[str],
    began: float,
    ended: float,
) -> ScenarioLabels:
    """Labels from what a run did: the behaviour start a mode ``recorded`` for a device, else
    ``hostile_began`` (when the mode was started). exfil records every start it makes, so an
    exfil device it did not record never misbehaved."""
    starts: dict[str, float | None] = {}
    for device_id in hostile:
        if device_id in recorded:
            starts[device_id] = float(recorded[device_id])
        elif mode == EXFIL:
            starts[device_id] = None
        else:
            starts[device_id] = hostile_began
    return ScenarioLabels(mode, prefix, starts, fleet, began, ended)


def _recorded_starts(summary: ModeSummary | None) -> dict[str, float]:
    """The behaviour starts a mode recorded, ignoring entries that are not id -> number."""
    if summary is None:
        return {}
    recorded = summary.details.get(BEHAVIOUR_STARTED)
    if not isinstance(recorded, Mapping):
        return {}
    return {
        str(k): float(v)
        for k, v in recorded.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _options(
    target: Target,
    mode: Mode,
    devices: int,
    batch: str,
    telemetry_interval: float,
    *,
    duration: float | None = None,
    flood_rounds: int = 1,
) -> ModeOptions:
    return ModeOptions(
        mode=mode,
        devices=devices,
        host=target.host,
        enrollment_port=target.enrollment_port,
        operational_port=target.operational_port,
        ca_pem=target.ca_pem,
        duration=duration,
        cert_lifetime=target.cert_lifetime,
        telemetry_interval=telemetry_interval,
        flood_rounds=flood_rounds,
        response_timeout=target.response_timeout,
        batch=batch,
    )


def _hostile_options(
    scenario: Scenario, target: Target, batch: str, telemetry_interval: float
) -> ModeOptions:
    mode, count, seconds = scenario.mode, scenario.hostile_devices, scenario.seconds
    if mode == EXFIL:
        # Mode has no exfil member; run_exfil reads every field but mode.
        return _options(target, Mode.NORMAL, count, batch, telemetry_interval, duration=seconds)
    if mode == "prober":
        return _options(target, Mode.PROBER, 2 * count, batch, telemetry_interval)
    if mode == "flood":
        return _options(target, Mode.FLOOD, FLOOD_ENROLLEES, batch, telemetry_interval)
    # clone; tamper gives up on its devices after ``duration`` at the latest
    return _options(target, Mode(mode), count, batch, telemetry_interval, duration=seconds)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))


async def _stop_after(seconds: float, stop: asyncio.Event) -> None:
    await asyncio.sleep(seconds)
    stop.set()


async def _forward(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class NormalFleet:
    """``plan.devices`` well-behaved sensors running in the background until ``stop()``."""

    def __init__(
        self, plan: FleetPlan, target: Target, factory: FactoryCA, *, key: str | None = None
    ) -> None:
        self.plan = plan
        self.batch = f"{key or secrets.token_hex(3)}-fleet"
        self.ids = frozenset(device_ids(self.batch, plan.devices))
        self.began: float | None = None
        self.ended: float | None = None
        self._options = _options(
            target, Mode.NORMAL, plan.devices, self.batch, plan.telemetry_interval
        )
        self._factory = factory
        self._stop = asyncio.Event()
        self._task: asyncio.Task[ModeSummary] | None = None

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("the fleet runs already")
        self.began = time.monotonic()
        self._task = asyncio.create_task(run_mode(self._options, self._factory, self._stop))

    async def stop(self) -> ModeSummary:
        """Stop every sensor; returns the fleet's summary."""
        if self._task is None:
            raise RuntimeError("the fleet was not started")
        self._stop.set()
        summary = await self._task
        self.ended = time.monotonic()
        return summary

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()


async def run_scenario(
    scenario: Scenario,
    target: Target,
    factory: FactoryCA,
    fleet: frozenset[str],
    *,
    telemetry_interval: float,
    stop: asyncio.Event | None = None,
    key: str | None = None,
) -> ScenarioRun:
    """Run one window of ``scenario`` beside the running ``fleet`` (its device ids) and label
    what happened. ``key`` makes the scenario's device ids (``th-200-<key>-...``); a fresh one
    by default, so runs never share a device. ``stop`` ends the window early."""
    key = key or secrets.token_hex(3)
    prefix = f"{MODEL.lower()}-{key}-"
    # The window's own stop: its time running out ends the hostile mode, and must not set the
    # caller's, which may serve further scenarios.
    window = asyncio.Event()
    helpers = [asyncio.ensure_future(_stop_after(scenario.seconds, window))]
    if stop is not None:
        helpers.append(asyncio.ensure_future(_forward(stop, window)))
    began = time.monotonic()
    summary: ModeSummary | None = None
    hostile: list[str] = []
    hostile_began: float | None = None
    error: str | None = None
    try:
        if scenario.mode != CONTROL:
            options = _hostile_options(scenario, target, key, telemetry_interval)
            hostile = hostile_ids(scenario.mode, options)
            hostile_began = time.monotonic()
            try:
                if scenario.mode == EXFIL:
                    summary = await run_exfil(options, factory, window, scenario.ramp)
                else:
                    summary = await run_mode(options, factory, window)
            except Exception as exc:  # one failed mode must not end the other scenarios
                error = f"{type(exc).__name__}: {exc}"
        await window.wait()  # detections are watched until the window closes
    finally:
        for helper in helpers:
            helper.cancel()
    ended = time.monotonic()
    labels = label_scenario(
        scenario.mode,
        prefix,
        hostile,
        _recorded_starts(summary),
        hostile_began,
        fleet,
        began,
        ended,
    )
    return ScenarioRun(scenario, labels, summary, error)


def standard_scenarios(hostile_devices: int = 2, seconds: float = 90.0) -> tuple[Scenario, ...]:
    """One window per hostile mode, then a control: the benchmark's default set. The exfil
    window is its ramp's warm-up longer."""
    scenarios = []
    for mode in HOSTILE_MODES:
        ramp = ExfilRamp(warmup=STANDARD_EXFIL_WARMUP)
        scenarios.append(
            Scenario(
                mode,
                hostile_devices=1 if mode == "flood" else hostile_devices,
                seconds=seconds + (ramp.warmup if mode == EXFIL else 0.0),
                ramp=ramp,
            )
        )
    scenarios.append(Scenario(CONTROL, hostile_devices=0, seconds=seconds))
    return tuple(scenarios)


def quick_scenarios(
    hostile_devices: int = 2, seconds: float = 30.0, exfil_warmup: float = 130.0
) -> tuple[Scenario, ...]:
    """The standard set in a few minutes: short windows, and exfil devices that behave for
    ``exfil_warmup`` seconds only (two clean minutes: enough for a detector whose
    ``warmup_minutes`` is 1, not for one that needs 5)."""
    scenarios = []
    for mode in HOSTILE_MODES:
        ramp = ExfilRamp(warmup=exfil_warmup)
        scenarios.append(
            Scenario(
                mode,
                hostile_devices=1 if mode == "flood" else hostile_devices,
                seconds=seconds + (ramp.warmup + seconds if mode == EXFIL else 0.0),
                ramp=ramp,
            )
        )
    scenarios.append(Scenario(CONTROL, hostile_devices=0, seconds=seconds))
    return tuple(scenarios)


def short_plan(
    modes: tuple[str, ...] = (*HOSTILE_MODES, CONTROL),
) -> tuple[FleetPlan, tuple[Scenario, ...]]:
    """A small, quick fleet and windows (seconds each) for tests; a detector needs settings to
    match (short warm-up and buckets) to find anything in them."""
    plan = FleetPlan(devices=3, warmup=5.0, telemetry_interval=0.5)
    ramp = ExfilRamp(warmup=3.0, step_seconds=1.0, step_pct=50.0)
    return plan, tuple(
        Scenario(mode, hostile_devices=0 if mode == CONTROL else 1, seconds=12.0, ramp=ramp)
        for mode in modes
    )
