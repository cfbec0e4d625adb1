"""``fleetgate bench detect``: how well anomaly detection finds hostile devices in a fleet.

Live part: a gateway in a process of its own, on a fresh home whose ``[anomaly]`` settings
``configure_detection`` writes (the one switch), and a normal fleet running beside it for the
whole run (``simulators.scenarios``): a warm-up first, so that baselines exist, then labelled
scenarios one after another, each a window in which hostile devices of one mode join the
fleet, each labelled with the moment its behaviour started. The benchmark listens on the admin
event stream as an operator of its own (role viewer) and stamps each event with
``time.monotonic()`` as it arrives: ``anomaly`` events are the detector's alerts, and so are
``clone`` events (the broker finds a second session itself and the gateway quarantines at
once, before the detector's next evaluation); ``state_changed`` to ``quarantined`` its (or
the broker's) quarantines.

Scoring (pure: ``score_scenario``, ``score_fleet``, ``summarize``). A scenario counts the alerts
about its own devices until ``grace`` after its window, and those about the fleet within it:

- a device is *flagged* when it has an alert; a hostile device is *detected* when it has one
  at or after its behaviour started;
- a *false alert* is an alert about a normal device, or about a hostile device before its
  behaviour started (``premature``); every false alert counts, not only the first;
- precision = detected / flagged devices (None when none was flagged); recall = detected /
  hostile devices whose behaviour started (None without any);
- time to detection: first alert minus behaviour start, per detected device (p50, max; the
  stamp is taken on arrival, so it includes the event's trip to the benchmark, milliseconds).

False alerts per 1,000 normal device-hours: every alert about the fleet over its whole run
(warm-up included) and the scenarios' false alerts about their own devices, over the fleet's
hours; the live run gives a few hours, so an offline replay adds many more: the anomaly
package's synthetic normal devices on a fake clock (``OFFLINE_MODULE``, the same ``[anomaly]``
settings). Without that module the figure rests on the live hours alone, and says so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import math
import secrets
import shutil
import tempfile
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from gateway.bench.home import make_bench_home, set_setting
from gateway.bench.machine import describe_machine, versions
from gateway.bench.server import GatewayProcess
from gateway.bench.stats import percentile
from gateway.config import CONFIG_NAME, Settings
from pki.factory import FactoryCA
from simulators.modes import ModeSummary
from simulators.scenarios import (
    FleetPlan,
    NormalFleet,
    Scenario,
    ScenarioLabels,
    ScenarioRun,
    Target,
    quick_scenarios,
    run_scenario,
    standard_scenarios,
)

__all__ = [
    "GOALS",
    "OFFLINE_MODULE",
    "Alert",
    "DetectBenchError",
    "DetectBenchOptions",
    "DetectReason",
    "EventLog",
    "FleetPlan",
    "FleetScore",
    "OfflineOutcome",
    "Quarantine",
    "Scenario",
    "ScenarioScore",
    "configure_detection",
    "load_offline_replay",
    "render_detect",
    "run_detect_bench",
    "score_fleet",
    "score_scenario",
    "short_options",
    "summarize",
    "with_table_keys",
]

# What the issue asks of detection.
GOALS: Mapping[str, float] = {
    "recall_min": 0.95,  # on every hostile mode
    "false_alerts_per_1000_device_hours_max": 1.0,
    "ttd_max_s": 60.0,
}
# The offline part: the anomaly package's replay of synthetic devices on a fake clock.
OFFLINE_MODULE = "gateway.anomaly.evaluate"
OFFLINE_DEVICES = 200  # normal devices replayed at most; the hours follow from the device-hours
OFFLINE_JOIN_MINUTES = 60.0  # ... and they join over this long, as a fleet rolled out
OPERATOR_NAME = "detect-bench"


class DetectReason(StrEnum):
    DETECTION_UNAVAILABLE = "detection_unavailable"
    OFFLINE_REPLAY_MISSING = "offline_replay_missing"
    OFFLINE_REPLAY_INVALID = "offline_replay_invalid"
    EVENT_STREAM_UNAVAILABLE = "event_stream_unavailable"
    FLEET_STOPPED = "fleet_stopped"


class DetectBenchError(RuntimeError):
    """The benchmark cannot measure what it was asked to; ``reason`` is a stable code."""

    def __init__(self, reason: DetectReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- what the event stream says ----------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One ``anomaly`` (or ``clone``) event, stamped ``time.monotonic()`` on arrival."""

    subject: str | None
    at: float
    detection: str = ""  # rate_spike, silence, new_topic, probing, ...
    action: str = ""  # alert, shorten_lifetime, reattest, quarantine
    rule: str = ""
    score: float | None = None


@dataclass(frozen=True)
class Quarantine:
    """A ``state_changed`` event to ``quarantined``, stamped on arrival."""

    subject: str
    at: float


class EventLog:
    """The admin event stream's callback (``AdminClient(on_event=...)``, called from the
    client's thread): keeps alerts and quarantines, counts what it could not read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._alerts: list[Alert] = []
        self._quarantines: list[Quarantine] = []
        self.counts: Counter[str] = Counter()

    def __call__(self, body: object) -> None:
        at = self._clock()
        if not isinstance(body, Mapping):
            self._malformed()
            return
        kind, subject, data = body.get("kind"), body.get("subject"), body.get("data", {})
        if (
            not isinstance(kind, str)
            or not (subject is None or isinstance(subject, str))
            or not isinstance(data, Mapping)
        ):
            self._malformed()
            return
        with self._lock:
            self.counts[kind] += 1
            if kind == "anomaly":
                self._alerts.append(
                    Alert(
                        subject,
                        at,
                        detection=str(data.get("detection", "")),
                        action=str(data.get("action", "")),
                        rule=str(data.get("rule", "")),
                        score=_number(data.get("score")),
                    )
                )
            elif kind == "clone":
                # The broker's own detection, quarantined by the gateway at once: the watch
                # finds it contained and raises no anomaly of its own.
                self._alerts.append(
                    Alert(subject, at, detection="clone", action="quarantine", rule="broker")
                )
            elif kind == "state_changed" and data.get("state") == "quarantined" and subject:
                self._quarantines.append(Quarantine(subject, at))

    def _malformed(self) -> None:
        with self._lock:
            self.counts["malformed"] += 1

    def alerts(self) -> list[Alert]:
        with self._lock:
            return list(self._alerts)

    def quarantines(self) -> list[Quarantine]:
        with self._lock:
            return list(self._quarantines)


def _number(value: object) -> float | None:
    try:
        number = float(str(value))
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# -- scoring (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioScore:
    mode: str
    devices: int  # the fleet and the mode's own devices
    normal_devices: int  # the fleet
    hostile: int  # hostile devices whose behaviour started (the recall's denominator)
    detected: int
    precision: float | None
    recall: float | None
    ttd_p50_s: float | None
    ttd_max_s: float | None
    false_alerts: int  # every alert about a normal device, or before a behaviour started
    fleet_false_alerts: int  # of which: about the fleet's devices during the window
    premature_alerts: int  # of which: about a hostile device before its behaviour started
    flagged_normal: int  # normal devices with at least one alert
    quarantined: int  # hostile devices quarantined after their behaviour started
    wrongly_quarantined: int  # normal devices quarantined (or hostile ones too early)
    normal_device_hours: float  # the fleet's, during the window
    late_alerts: int  # about the scenario's own devices, after the window (not scored)
    detections: Mapping[str, int] = field(default_factory=dict)  # true alerts by kind

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "devices": self.devices,
            "normal_devices": self.normal_devices,
            "hostile": self.hostile,
            "detected": self.detected,
            "precision": _rounded(self.precision, 3),
            "recall": _rounded(self.recall, 3),
            "ttd_p50_s": _rounded(self.ttd_p50_s, 2),
            "ttd_max_s": _rounded(self.ttd_max_s, 2),
            "false_alerts": self.false_alerts,
            "fleet_false_alerts": self.fleet_false_alerts,
            "premature_alerts": self.premature_alerts,
            "flagged_normal": self.flagged_normal,
            "quarantined": self.quarantined,
            "wrongly_quarantined": self.wrongly_quarantined,
            "normal_device_hours": round(self.normal_device_hours, 4),
            "late_alerts": self.late_alerts,
            "detections": dict(self.detections),
        }


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def score_scenario(
    labels: ScenarioLabels,
    alerts: Sequence[Alert],
    quarantines: Sequence[Quarantine] = (),
    *,
    devices: int | None = None,
    grace: float = 2.0,
) -> ScenarioScore:
    """Score one scenario's window from every alert and quarantine seen. Counted: those about
    its own devices until ``grace`` seconds after the window (events travel), and those about
    the fleet's devices within the window (the next window has the later ones).
    ``devices``: how many devices the window had (default: the fleet and the labelled ones)."""
    if grace < 0:
        raise ValueError("grace must be >= 0")
    closes = labels.ended + grace

    def counted(subject: str | None, at: float) -> bool:
        if labels.own(subject):
            return at <= closes
        return subject in labels.fleet and labels.began <= at < labels.ended

    first_true: dict[str, float] = {}
    flagged: set[str] = set()
    flagged_normal: set[str] = set()
    false_alerts = fleet_false = premature = 0
    late = sum(1 for a in alerts if labels.own(a.subject) and a.at > closes)
    kinds: Counter[str] = Counter()
    for alert in sorted(alerts, key=lambda a: a.at):
        subject = alert.subject
        if subject is None or not counted(subject, alert.at):
            continue
        flagged.add(subject)
        started = labels.started(subject)
        if started is not None and alert.at >= started:
            first_true.setdefault(subject, alert.at)
            kinds[alert.detection or "unnamed"] += 1
            continue
        false_alerts += 1
        if subject in labels.hostile:
            premature += 1
        else:
            flagged_normal.add(subject)
            fleet_false += subject in labels.fleet
    quarantined: set[str] = set()
    wrongly: set[str] = set()
    for event in quarantines:
        if not counted(event.subject, event.at):
            continue
        started = labels.started(event.subject)
        if started is not None and event.at >= started:
            quarantined.add(event.subject)
        else:
            wrongly.add(event.subject)
    started_hostile = {d: s for d, s in labels.hostile.items() if s is not None}
    delays = [first_true[d] - s for d, s in started_hostile.items() if d in first_true]
    detected = len(delays)
    return ScenarioScore(
        mode=labels.mode,
        devices=devices if devices is not None else len(labels.fleet) + len(labels.hostile),
        normal_devices=len(labels.fleet),
        hostile=len(started_hostile),
        detected=detected,
        precision=detected / len(flagged) if flagged else None,
        recall=detected / len(started_hostile) if started_hostile else None,
        ttd_p50_s=percentile(delays, 0.5) if delays else None,
        ttd_max_s=max(delays) if delays else None,
        false_alerts=false_alerts,
        fleet_false_alerts=fleet_false,
        premature_alerts=premature,
        flagged_normal=len(flagged_normal),
        quarantined=len(quarantined),
        wrongly_quarantined=len(wrongly),
        normal_device_hours=labels.normal_device_hours,
        late_alerts=late,
        detections=dict(kinds),
    )


@dataclass(frozen=True)
class FleetScore:
    """The normal fleet over its whole run (warm-up and every window)."""

    devices: int
    device_hours: float
    false_alerts: int
    flagged: int  # devices with at least one alert
    quarantined: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "devices": self.devices,
            "device_hours": round(self.device_hours, 4),
            "false_alerts": self.false_alerts,
            "flagged": self.flagged,
            "quarantined": self.quarantined,
        }


def score_fleet(
    fleet: frozenset[str],
    began: float,
    ended: float,
    alerts: Sequence[Alert],
    quarantines: Sequence[Quarantine] = (),
    *,
    grace: float = 2.0,
) -> FleetScore:
    """Every alert about the fleet while it ran (and ``grace`` after) is a false one."""
    if grace < 0:
        raise ValueError("grace must be >= 0")
    if ended < began:
        raise ValueError("ended must not come before began")

    def counted(subject: str | None, at: float) -> bool:
        return subject in fleet and began <= at <= ended + grace

    false = [a for a in alerts if counted(a.subject, a.at)]
    return FleetScore(
        devices=len(fleet),
        device_hours=len(fleet) * (ended - began) / 3600.0,
        false_alerts=len(false),
        flagged=len({a.subject for a in false}),
        quarantined=len({q.subject for q in quarantines if counted(q.subject, q.at)}),
    )


def per_1000_hours(count: int, hours: float) -> float | None:
    """``count`` per 1,000 device-hours (None without any hour to divide by)."""
    return 1000.0 * count / hours if hours > 0 else None


def summarize(
    scores: Sequence[ScenarioScore],
    fleet: FleetScore | None = None,
    offline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The figures over the whole run and the offline replay, and the goals they meet (None:
    nothing measured the goal). False alerts: the fleet's over its whole run, those about
    the scenarios' own normal devices and premature ones, and the replay's; hours: the
    fleet's and the replay's (the few minutes of a prober's victims are not counted)."""
    live_hours = fleet.device_hours if fleet is not None else 0.0
    live_false = (fleet.false_alerts if fleet is not None else 0) + sum(
        s.false_alerts - s.fleet_false_alerts for s in scores
    )
    offline_hours = float(offline["device_hours"]) if offline else 0.0
    offline_false = int(offline["false_alerts"]) if offline else 0
    hours = live_hours + offline_hours
    rate = per_1000_hours(live_false + offline_false, hours)
    hostile = [s.recall for s in scores if s.recall is not None]
    delays = [s.ttd_max_s for s in scores if s.ttd_max_s is not None]
    met: dict[str, bool | None] = {
        "recall": all(r >= GOALS["recall_min"] for r in hostile) if hostile else None,
        "false_alerts": (
            rate <= GOALS["false_alerts_per_1000_device_hours_max"] if rate is not None else None
        ),
        # a hostile device never detected has no delay: the recall goal covers it
        "time_to_detection": all(d <= GOALS["ttd_max_s"] for d in delays) if delays else None,
    }
    return {
        "fleet": fleet.as_dict() if fleet is not None else None,
        "live_normal_device_hours": round(live_hours, 4),
        "live_false_alerts": live_false,
        "normal_device_hours": round(hours, 4),
        "false_alerts": live_false + offline_false,
        "false_alerts_per_1000_device_hours": _rounded(rate, 3),
        "goals": dict(GOALS),
        "goals_met": met,
    }


# -- the offline part --------------------------------------------------------------------------


@dataclass(frozen=True)
class OfflineOutcome:
    """What the offline replay found: normal device-hours replayed and the alerts the
    detector raised on them (every one of them false)."""

    device_hours: float
    false_alerts: int
    false_by_kind: Mapping[str, int] = field(default_factory=dict)


# (device_hours, seed, the [anomaly] table as TOML gives it) -> OfflineOutcome. CPU-bound on a
# fake clock: run in a thread.
OfflineReplay = Callable[[float, int, Mapping[str, Any]], OfflineOutcome]


def load_offline_replay() -> OfflineReplay | None:
    """The replay of ``OFFLINE_MODULE`` (``replay(ReplaySpec(...)) -> ReplayReport``) over up
    to ``OFFLINE_DEVICES`` normal devices, for as many hours as the device-hours asked for;
    None when the module is not there. A module that is there with another shape is an error, not
    a silent skip. Imported by name: the benchmark runs whether or not the gateway has it."""
    try:
        module = importlib.import_module(OFFLINE_MODULE)
        settings_module = importlib.import_module("gateway.anomaly.settings")
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and OFFLINE_MODULE.startswith(missing):
            return None
        raise
    replay = getattr(module, "replay", None)
    spec = getattr(module, "ReplaySpec", None)
    settings = getattr(settings_module, "AnomalySettings", None)
    if not callable(replay) or not callable(spec) or settings is None:
        raise DetectBenchError(
            DetectReason.OFFLINE_REPLAY_INVALID,
            f"{OFFLINE_MODULE} has no replay() and ReplaySpec, or no AnomalySettings",
        )

    def normal_hours(device_hours: float, seed: int, table: Mapping[str, Any]) -> OfflineOutcome:
        # Each device runs at least two hours past joining; they join over the first
        # OFFLINE_JOIN_MINUTES (half of it lost on average), so the replay is that much longer.
        devices = min(OFFLINE_DEVICES, max(1, math.floor(device_hours / 2.0)))
        report = replay(
            spec(
                devices=devices,
                hours=device_hours / devices + OFFLINE_JOIN_MINUTES / 120.0,
                join_spread_minutes=OFFLINE_JOIN_MINUTES,
                hostile_per_scenario=0,
                seed=seed,
                settings=settings.from_table(dict(table)),
            )
        )
        return OfflineOutcome(
            report.normal_device_hours, report.false_alerts, dict(report.false_by_kind)
        )

    return normal_hours


async def run_offline(
    replay: OfflineReplay, device_hours: float, seed: int, table: Mapping[str, Any]
) -> dict[str, Any]:
    """Run ``replay`` in a thread and check what it returns."""
    started = time.monotonic()
    outcome = await asyncio.to_thread(replay, device_hours, seed, table)
    hours = getattr(outcome, "device_hours", None)
    false_alerts = getattr(outcome, "false_alerts", None)
    if (
        isinstance(hours, bool)
        or not isinstance(hours, int | float)
        or not math.isfinite(hours)
        or hours < 0
        or isinstance(false_alerts, bool)
        or not isinstance(false_alerts, int)
        or false_alerts < 0
    ):
        raise DetectBenchError(
            DetectReason.OFFLINE_REPLAY_INVALID,
            f"the replay returned device_hours={hours!r}, false_alerts={false_alerts!r}",
        )
    by_kind = getattr(outcome, "false_by_kind", {})
    return {
        "available": True,
        "device_hours": round(float(hours), 2),
        "false_alerts": false_alerts,
        "false_by_kind": dict(by_kind) if isinstance(by_kind, Mapping) else {},
        "per_1000_device_hours": _rounded(per_1000_hours(false_alerts, float(hours)), 3),
        "seconds": round(time.monotonic() - started, 2),
    }


def anomaly_table(settings: Mapping[str, str]) -> dict[str, Any]:
    """``detection_settings`` (TOML literals by key) as the ``[anomaly]`` table TOML gives:
    what the live gateway reads, handed to the replay too. Raises ValueError on a bad one."""
    text = "".join(f"{key} = {value}\n" for key, value in settings.items())
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"detection_settings are not TOML: {exc}") from None


# -- the live part -----------------------------------------------------------------------------


def with_table_keys(text: str, table: str, values: Mapping[str, str]) -> str:
    """``text`` (a fleetgate.toml) with each key of ``values`` set to its TOML literal in
    ``[table]``: replaced where it is (keeping its comment), else added under the table's
    header, else in a new table at the end."""
    for key, value in values.items():
        try:
            text = set_setting(text, table, key, value)
            continue
        except KeyError:
            pass
        lines = text.splitlines(keepends=True)
        header = next((i for i, line in enumerate(lines) if line.strip() == f"[{table}]"), None)
        if header is None:
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"\n[{table}]\n{key} = {value}\n"
        else:
            lines.insert(header + 1, f"{key} = {value}\n")
            text = "".join(lines)
    return text


def configure_detection(home: Path, enabled: bool, settings: Mapping[str, str]) -> None:
    """The one switch: ``[anomaly] enabled`` and any other ``[anomaly]`` ``settings`` (TOML
    literals by key, e.g. ``{"warmup_minutes": "1"}``) in the home's fleetgate.toml, before
    the gateway starts. The home must still load: a gateway whose settings know no
    ``[anomaly]`` has no detection to turn on (``DetectBenchError``) and, asked to run without
    one, is left as it was."""
    from gateway.config import ConfigError, load_settings

    path = home / CONFIG_NAME
    original = path.read_text()
    values = {"enabled": "true" if enabled else "false", **settings}
    path.write_text(with_table_keys(original, "anomaly", values))
    try:
        load_settings(home)
    except ConfigError as exc:
        path.write_text(original)
        if enabled or settings:
            raise DetectBenchError(
                DetectReason.DETECTION_UNAVAILABLE,
                f"the gateway refuses its [anomaly] settings: {exc}",
            ) from None


@dataclass(frozen=True)
class DetectBenchOptions:
    fleet: FleetPlan = field(default_factory=FleetPlan)
    scenarios: tuple[Scenario, ...] = field(default_factory=standard_scenarios)
    broker: str = "embedded"
    # False: detection off (the harness alone: scenarios, labels, the event stream; nothing
    # is detected unless something else raises anomaly events).
    detection: bool = True
    # More [anomaly] settings of the gateway, TOML literals by key ({"warmup_minutes": "1"}).
    detection_settings: Mapping[str, str] = field(default_factory=dict)
    live: bool = True  # False: the offline replay only
    offline_device_hours: float = 10_000.0  # 0: no offline replay
    seed: int = 0
    grace: float = 2.0  # seconds after a window its own devices' alerts still count
    settle: float = 5.0  # seconds the stream is still watched after the fleet stopped
    response_timeout: float = 10.0
    work_dir: Path | None = None  # keep the home and logs here (default: a temporary folder)
    progress: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "scenarios", tuple(self.scenarios))
        if not isinstance(self.detection_settings, Mapping):
            raise TypeError("detection_settings maps keys to TOML literals")
        object.__setattr__(self, "detection_settings", dict(self.detection_settings))
        if not isinstance(self.fleet, FleetPlan):
            raise TypeError("fleet must be a FleetPlan")
        if not all(isinstance(s, Scenario) for s in self.scenarios):
            raise TypeError("scenarios must be Scenario values")
        if self.live and not self.scenarios:
            raise ValueError("a live run needs at least one scenario")
        if self.broker not in ("embedded", "mosquitto"):
            raise ValueError(f"broker must be embedded or mosquitto, not {self.broker!r}")
        for key, value in self.detection_settings.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key or not value:
                raise TypeError("detection_settings maps keys to TOML literals (str to str)")
            if key == "enabled":
                raise ValueError("detection, not detection_settings, sets anomaly.enabled")
        anomaly_table(self.detection_settings)  # a bad literal fails here, not at the gateway
        for name in ("offline_device_hours", "grace", "settle"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.response_timeout <= 0:
            raise ValueError("response_timeout must be positive")
        if not self.live and self.offline_device_hours == 0:
            raise ValueError("nothing to measure: no live run and no offline replay")

    def parameters(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "detection": self.detection,
            "detection_settings": dict(self.detection_settings),
            "live": self.live,
            "fleet_devices": self.fleet.devices,
            "fleet_warmup": self.fleet.warmup,
            "telemetry_interval": self.fleet.telemetry_interval,
            "offline_device_hours": self.offline_device_hours,
            "seed": self.seed,
            "grace": self.grace,
            "scenarios": [
                {"mode": s.mode, "hostile_devices": s.hostile_devices, "seconds": s.seconds}
                for s in self.scenarios
            ],
        }


# ``--short``: the standard modes in ~7 minutes live (a 90 s warm-up, 30 s windows, exfil
# devices behaving for two minutes first), for a detector that trusts a baseline after one
# clean minute; the offline replay adds the normal hours a few live minutes cannot give.
SHORT_FLEET = FleetPlan(devices=10, warmup=90.0, telemetry_interval=2.0)
SHORT_DETECTION_SETTINGS: Mapping[str, str] = {"warmup_minutes": "1"}
SHORT_OFFLINE_DEVICE_HOURS = 2_000.0


def short_options(**changes: Any) -> DetectBenchOptions:
    """The ``--short`` preset; ``changes`` override any of its options."""
    preset: dict[str, Any] = {
        "fleet": SHORT_FLEET,
        "scenarios": quick_scenarios(),
        "detection_settings": SHORT_DETECTION_SETTINGS,
        "offline_device_hours": SHORT_OFFLINE_DEVICE_HOURS,
    }
    return DetectBenchOptions(**{**preset, **changes})


class EventWatch:
    """The benchmark as an operator (role viewer) on the admin event stream."""

    def __init__(self, settings: Settings, port: int, log: EventLog) -> None:
        self._settings = settings
        self._port = port
        self._log = log
        self._connected = threading.Event()
        self._client: Any = None

    async def start(self, timeout: float = 30.0) -> None:
        from gateway.admin import AdminClient, Role
        from gateway.cli.operator import add_operator
        from gateway.operations import open_store

        passphrase = secrets.token_urlsafe(18).encode()

        def add() -> Any:
            store = open_store(self._settings)
            try:
                return add_operator(
                    self._settings,
                    store,
                    OPERATOR_NAME,
                    Role.VIEWER,
                    passphrase,
                    lifetime=timedelta(hours=24),
                    host="127.0.0.1",
                    port=self._port,
                    actor="bench",
                )
            finally:
                close = getattr(store, "close", None)
                if close is not None:
                    close()

        added = await asyncio.to_thread(add)

        def on_connection(status: str) -> None:
            if status == "connected":
                self._connected.set()

        self._client = AdminClient(
            added.profile, passphrase, on_event=self._log, on_connection=on_connection
        )
        self._client.start()
        if not await asyncio.to_thread(self._connected.wait, timeout):
            await self.stop()
            raise DetectBenchError(
                DetectReason.EVENT_STREAM_UNAVAILABLE,
                f"the benchmark's operator was not connected after {timeout:.0f} s",
            )

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.stop)


@dataclass
class LiveRun:
    fleet: NormalFleet
    fleet_summary: ModeSummary
    runs: list[ScenarioRun]
    metrics: dict[str, Any]


def _say(options: DetectBenchOptions, text: str) -> None:
    if options.progress:
        print(f"  {text}", flush=True)


async def _run_scenarios(
    options: DetectBenchOptions, target: Target, factory: FactoryCA, fleet: NormalFleet
) -> list[ScenarioRun]:
    plan = options.fleet
    _say(options, f"fleet of {plan.devices}: warming up for {plan.warmup:.0f} s")
    await asyncio.sleep(plan.warmup)
    runs: list[ScenarioRun] = []
    for index, scenario in enumerate(options.scenarios):
        if not fleet.running:
            raise DetectBenchError(
                DetectReason.FLEET_STOPPED, "the normal fleet stopped before the scenarios ended"
            )
        _say(
            options,
            f"scenario {index + 1}/{len(options.scenarios)}: {scenario.mode}, "
            f"{scenario.seconds:.0f} s",
        )
        runs.append(
            await run_scenario(
                scenario, target, factory, fleet.ids, telemetry_interval=plan.telemetry_interval
            )
        )
    return runs


async def _run_live(options: DetectBenchOptions, folder: Path, log: EventLog) -> LiveRun:
    from simulators.factory import load_or_create_factory

    home = folder / "home"
    settings = make_bench_home(home, broker=options.broker)
    configure_detection(home, options.detection, options.detection_settings)
    server = GatewayProcess(home, options.broker, log_path=folder / "gateway.log")
    watch: EventWatch | None = None
    fleet: NormalFleet | None = None
    try:
        await server.start()
        watch = EventWatch(settings, server.ports["operational"], log)
        await watch.start()
        factory = load_or_create_factory(settings.home / "factory")
        target = Target(
            host="127.0.0.1",
            enrollment_port=server.ports["enrollment"],
            operational_port=server.ports["operational"],
            ca_pem=server.ca_pem.encode(),
            response_timeout=options.response_timeout,
        )
        fleet = NormalFleet(options.fleet, target, factory)
        fleet.start()
        runs = await _run_scenarios(options, target, factory, fleet)
        fleet_summary = await fleet.stop()
        await asyncio.sleep(options.settle)
        metrics = await server.metrics()
    finally:
        if fleet is not None and fleet.running:
            await fleet.stop()
        if watch is not None:
            await watch.stop()
        await server.stop()
    return LiveRun(fleet, fleet_summary, runs, metrics)


def _scenario_row(run: ScenarioRun, score: ScenarioScore) -> dict[str, Any]:
    return {
        **score.as_dict(),
        "seconds": round(run.labels.seconds, 1),
        "error": run.error,
        "simulation": run.summary.as_dict() if run.summary is not None else None,
    }


def _unattributed(alerts: Sequence[Alert], live: LiveRun | None) -> int:
    """Alerts about no device of the run (an operator, a leftover identity)."""
    if live is None:
        return len(alerts)
    return sum(
        1
        for a in alerts
        if a.subject not in live.fleet.ids and not any(r.labels.own(a.subject) for r in live.runs)
    )


async def run_detect_bench(
    options: DetectBenchOptions, *, offline_replay: OfflineReplay | None = None
) -> dict[str, Any]:
    """Run the live scenarios and the offline replay; returns the result (``render_detect``
    shows it). ``offline_replay``: default ``load_offline_replay()``."""
    started_at = dt.datetime.now(dt.UTC)
    replay = offline_replay if offline_replay is not None else load_offline_replay()
    if replay is None and not options.live:
        raise DetectBenchError(
            DetectReason.OFFLINE_REPLAY_MISSING,
            f"nothing to measure: no live run, and no {OFFLINE_MODULE} to replay normal hours",
        )
    log = EventLog()
    live: LiveRun | None = None
    if options.live:
        own_dir = options.work_dir is None
        folder = options.work_dir or Path(tempfile.mkdtemp(prefix="fleetgate-bench-detect-"))
        folder.mkdir(parents=True, exist_ok=True)
        try:
            live = await _run_live(options, folder, log)
        finally:
            if own_dir:
                shutil.rmtree(folder, ignore_errors=True)
    alerts, quarantines = log.alerts(), log.quarantines()
    runs = live.runs if live is not None else []
    scores = [
        score_scenario(run.labels, alerts, quarantines, devices=run.devices, grace=options.grace)
        for run in runs
    ]
    fleet: FleetScore | None = None
    if live is not None:
        began, ended = live.fleet.began, live.fleet.ended
        assert began is not None and ended is not None  # started and stopped by _run_live
        fleet = score_fleet(live.fleet.ids, began, ended, alerts, quarantines, grace=options.grace)
    offline: dict[str, Any] | None = None
    if replay is not None and options.offline_device_hours > 0:
        offline = await run_offline(
            replay,
            options.offline_device_hours,
            options.seed,
            anomaly_table(options.detection_settings),
        )
    return {
        "bench": "detect",
        "date": started_at.isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "versions": versions(),
        "parameters": options.parameters(),
        "scenarios": [_scenario_row(run, score) for run, score in zip(runs, scores, strict=True)],
        **summarize(scores, fleet, offline),
        "offline": offline if offline is not None else {"available": replay is not None},
        "unattributed_alerts": _unattributed(alerts, live),
        "events": dict(log.counts),
        "fleet_simulation": live.fleet_summary.as_dict() if live is not None else None,
        "gateway_metrics": live.metrics if live is not None else {},
    }


# -- for people --------------------------------------------------------------------------------


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        text = f"{value:.3g}" if abs(value) < 10 else f"{value:,.1f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


def render_detect(result: Mapping[str, Any]) -> Group:
    scenarios = Table(title="fleetgate bench detect: per scenario")
    scenarios.add_column("mode")
    for name in (
        "devices",
        "hostile",
        "detected",
        "precision",
        "recall",
        "ttd p50",
        "ttd max",
        "false alerts",
        "quarantined",
    ):
        scenarios.add_column(name, justify="right")
    for row in result.get("scenarios", []):
        scenarios.add_row(
            str(row["mode"]),
            _cell(row["devices"]),
            _cell(row["hostile"]),
            _cell(row["detected"]),
            _cell(row["precision"]),
            _cell(row["recall"]),
            _cell(row["ttd_p50_s"], "s"),
            _cell(row["ttd_max_s"], "s"),
            _cell(row["false_alerts"]),
            _cell(row["quarantined"]),
        )
    goals = result.get("goals", GOALS)
    met = result.get("goals_met", {})
    offline = result.get("offline") or {}
    fleet = result.get("fleet") or {}
    totals = Table(title="over the whole run", show_header=False)
    totals.add_column("figure")
    totals.add_column("value", justify="right")
    totals.add_row("normal fleet", f"{_cell(fleet.get('devices'))} devices")
    totals.add_row("normal device-hours, live", _cell(result.get("live_normal_device_hours")))
    totals.add_row(
        "normal device-hours, offline replay",
        _cell(offline.get("device_hours")) if "device_hours" in offline else "not available",
    )
    totals.add_row("false alerts, live", _cell(result.get("live_false_alerts")))
    totals.add_row("false alerts, offline replay", _cell(offline.get("false_alerts")))
    totals.add_row(
        "false alerts per 1,000 normal device-hours",
        _cell(result.get("false_alerts_per_1000_device_hours")),
    )
    totals.add_row("fleet devices quarantined", _cell(fleet.get("quarantined")))
    totals.add_row("alerts about no device of the run", _cell(result.get("unattributed_alerts")))
    for row in result.get("scenarios", []):
        if row.get("error"):
            totals.add_row(f"{row['mode']}: the hostile mode failed", str(row["error"])[:120])
    totals.add_row(
        f"goal: recall >= {goals['recall_min']:g} on every hostile mode",
        _verdict(met.get("recall")),
    )
    totals.add_row(
        f"goal: <= {goals['false_alerts_per_1000_device_hours_max']:g} false alert per 1,000 h",
        _verdict(met.get("false_alerts")),
    )
    totals.add_row(
        f"goal: detection within {goals['ttd_max_s']:g} s", _verdict(met.get("time_to_detection"))
    )
    context = Table(title="measured on", show_header=False)
    context.add_column("what")
    context.add_column("value")
    context.add_row("date", str(result.get("date", "")))
    for key, value in {**result.get("machine", {}), **result.get("versions", {})}.items():
        context.add_row(key, str(value))
    for key, value in result.get("parameters", {}).items():
        if key != "scenarios":
            context.add_row(f"--{key.replace('_', '-')}", str(value))
    return Group(scenarios, totals, context)

