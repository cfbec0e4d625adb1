"""Replay synthetic, labelled device streams through the anomaly engine on a fake clock.

Normal devices of a few models (periodic like the simulators, or Poisson), joining over time,
renewing, reconnecting now and then; hostile devices that behave normally until a moment ``t0``
and then turn into one of the hostile modes. The report gives false alerts per 1,000 normal
device-hours, and per hostile mode the recall and the time from ``t0`` to the first verdict of
an expected kind. Pure and deterministic for a seed; ``fleetgate bench`` can reuse it.

    from gateway.anomaly.evaluate import ReplaySpec, replay, format_report
    print(format_report(replay(ReplaySpec(devices=200, hours=10))))
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from gateway.acl import Action as AclAction
from gateway.anomaly.context import IdentityContext
from gateway.anomaly.detect import DetectionKind
from gateway.anomaly.engine import AnomalyEngine, Verdict
from gateway.anomaly.settings import AnomalySettings
from gateway.observe import (
    CertificateIssued,
    Connected,
    Denied,
    Disconnected,
    Observation,
    Published,
)
from gateway.store import IdentityState
from pki.clock import DEFAULT_FAKE_START, FakeClock
from pki.profile import IdentityKind

__all__ = [
    "DEFAULT_MODELS",
    "EXPECTED",
    "ModelProfile",
    "ReplayReport",
    "ReplaySpec",
    "Scenario",
    "ScenarioResult",
    "format_report",
    "replay",
]

FIRMWARE_VERSION = "1.4.2"
FIRMWARE_DIGEST = "a" * 64
TAMPERED_DIGEST = "b" * 64


@dataclass(frozen=True)
class ModelProfile:
    """How the devices of one model behave when nothing is wrong."""

    name: str
    interval_seconds: float  # mean time between telemetry messages
    poisson: bool  # exponential gaps (True) or periodic with +-10% jitter, like the simulators
    payload_bytes: int
    payload_jitter: int  # +- bytes of JSON digits
    state_every_seconds: float | None = None  # an occasional, larger state message
    reconnect_after_renewal: bool = False
    burst: int = 1  # messages per send, 0.2 s apart (a camera's frames, a batch of readings)
    diurnal: float = 0.0  # rate swings by +-this fraction over 24 hours


DEFAULT_MODELS = (
    ModelProfile(
        "th-sensor",
        5.0,
        poisson=False,
        payload_bytes=82,
        payload_jitter=3,
        reconnect_after_renewal=True,
    ),
    ModelProfile(
        "meter",
        12.0,
        poisson=True,
        payload_bytes=140,
        payload_jitter=12,
        state_every_seconds=1800.0,
    ),
    ModelProfile("tracker", 60.0, poisson=True, payload_bytes=300, payload_jitter=60),
    ModelProfile(
        "gateway-bridge",
        30.0,
        poisson=True,
        payload_bytes=400,
        payload_jitter=200,
        burst=4,
        diurnal=0.5,
    ),
)


class Scenario(StrEnum):
    FLOOD = "flood"  # telemetry at 20 msg/s on top of its usual, for 3 minutes
    EXFIL = "exfil"  # payloads grow linearly: twice the size 10 minutes after t0, and on
    EXFIL_RATE = "exfil_rate"  # message rate grows linearly: twice the rate after 10 minutes
    PROBER = "prober"  # other devices' topics: 7 subscriptions and 4 publishes, denied
    CLONE = "clone"  # the broker reports a second live session from another host
    TAMPER = "tamper"  # renews reporting another firmware digest, without attestation
    SILENCE = "silence"  # stays connected, stops publishing
    NEW_TOPIC = "new_topic"  # starts publishing to a topic none of its model uses
    STORM = "storm"  # reconnects every 10 s
    NEW_SOURCE = "new_source"  # reconnects from a host it never used
    COLD_FLOOD = "cold_flood"  # a new device of a warm model, 3 msg/s from its first minute
    ENROLL_FLOOD = "enroll_flood"  # an identity the registry does not hold, 50 requests/s


EXPECTED: dict[Scenario, frozenset[DetectionKind]] = {
    Scenario.FLOOD: frozenset({DetectionKind.RATE_SPIKE}),
    Scenario.EXFIL: frozenset({DetectionKind.VOLUME_DRIFT, DetectionKind.RATE_SPIKE}),
    Scenario.EXFIL_RATE: frozenset({DetectionKind.VOLUME_DRIFT, DetectionKind.RATE_SPIKE}),
    Scenario.PROBER: frozenset({DetectionKind.PROBING}),
    Scenario.CLONE: frozenset({DetectionKind.CLONE}),
    Scenario.TAMPER: frozenset({DetectionKind.FIRMWARE_CHANGE}),
    Scenario.SILENCE: frozenset({DetectionKind.SILENCE}),
    Scenario.NEW_TOPIC: frozenset({DetectionKind.NEW_TOPIC}),
    Scenario.STORM: frozenset({DetectionKind.RECONNECT_STORM}),
    Scenario.NEW_SOURCE: frozenset({DetectionKind.NEW_SOURCE}),
    Scenario.COLD_FLOOD: frozenset({DetectionKind.RATE_SPIKE}),
    Scenario.ENROLL_FLOOD: frozenset({DetectionKind.RATE_SPIKE}),
}
# What the prober mode of the simulators tries on another device (dev-00000), in order.
_VICTIM = "fg/v1/dev/dev-00000"
PROBES: tuple[tuple[AclAction, str], ...] = (
    (AclAction.SUBSCRIBE, f"{_VICTIM}/telemetry"),
    (AclAction.SUBSCRIBE, f"{_VICTIM}/cmd/#"),
    (AclAction.SUBSCRIBE, f"{_VICTIM}/renew/resp"),
    (AclAction.SUBSCRIBE, "fg/v1/enroll/dev-00000/resp"),
    (AclAction.SUBSCRIBE, "fg/v1/dev/+/telemetry"),
    (AclAction.SUBSCRIBE, "fg/v1/#"),
    (AclAction.SUBSCRIBE, "#"),
    (AclAction.PUBLISH, f"{_VICTIM}/cmd/reboot"),
    (AclAction.PUBLISH, f"{_VICTIM}/renew/resp"),
    (AclAction.PUBLISH, f"{_VICTIM}/renew/req"),
    (AclAction.PUBLISH, "fg/v1/pki/crl"),
)
# A hostile mode lasts this long (a flood longer would only cost replay time).
HOSTILE_SECONDS = 1800.0
FLOOD_SECONDS = 180.0


@dataclass(frozen=True)
class ReplaySpec:
    devices: int = 100  # normal devices
    hours: float = 10.0
    hostile_per_scenario: int = 0
    scenarios: tuple[Scenario, ...] = tuple(Scenario)
    models: tuple[ModelProfile, ...] = DEFAULT_MODELS
    seed: int = 1
    join_spread_minutes: float = 60.0  # normal devices join over this long
    evaluate_every_seconds: float = 5.0
    renew_every_seconds: float = 2400.0  # 2/3 of a one-hour certificate, +-5%
    blips_per_hour: float = 0.1  # network cuts: reconnect after 2-20 s, new source port
    settings: AnomalySettings = field(default_factory=AnomalySettings)

    def __post_init__(self) -> None:
        if self.devices < 0 or self.hostile_per_scenario < 0:
            raise ValueError("device counts must be >= 0")
        if self.hours <= 0 or self.evaluate_every_seconds <= 0:
            raise ValueError("hours and evaluate_every_seconds must be > 0")
        if self.hostile_per_scenario and self.hours < 1.5:
            raise ValueError("hostile devices need at least 1.5 hours (warm-up, then t0)")
        if not self.models:
            raise ValueError("at least one model")


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    devices: int
    detected: int  # a verdict of an expected kind after t0
    seconds_to_detect: tuple[float, ...]  # sorted
    kinds: dict[str, int]  # every verdict kind seen after t0
    by_model: dict[str, tuple[int, int]] = field(default_factory=dict)  # detected, devices

    @property
    def recall(self) -> float:
        return self.detected / self.devices if self.devices else 0.0

    @property
    def within_60s(self) -> float:
        if not self.devices:
            return 0.0
        return sum(1 for s in self.seconds_to_detect if s <= 60) / self.devices

    def percentile(self, fraction: float) -> float | None:
        values = self.seconds_to_detect
        if not values:
            return None
        return values[min(len(values) - 1, max(math.ceil(fraction * len(values)) - 1, 0))]


@dataclass(frozen=True)
class ReplayReport:
    normal_device_hours: float
    false_alerts: int
    false_by_kind: dict[str, int]
    false_examples: tuple[str, ...]
    scenarios: tuple[ScenarioResult, ...]
    observations: int
    evaluations: int
    observe_seconds: float  # engine time spent in observe()
    evaluate_seconds: float
    evaluate_max_seconds: float
    wall_seconds: float
    counters: dict[str, int]

    @property
    def false_per_1000_hours(self) -> float:
        if not self.normal_device_hours:
            return 0.0
        return self.false_alerts * 1000 / self.normal_device_hours

    @property
    def observe_microseconds(self) -> float:
        return self.observe_seconds / self.observations * 1e6 if self.observations else 0.0


class _Device:
    """One simulated device: timers in the replay's heap drive what it sends."""

    def __init__(
        self,
        identity: str,
        model: ModelProfile,
        rng: random.Random,
        joined: float,
        scenario: Scenario | None = None,
        t0: float = math.inf,
    ) -> None:
        self.identity = identity
        self.model = model
        self.rng = rng
        self.joined = joined
        self.scenario = scenario
        self.t0 = t0
        self.host = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        self.port = rng.randrange(20000, 60000)
        self.online = False
        self.registered = scenario is not Scenario.ENROLL_FLOOD
        self.telemetry = f"fg/v1/dev/{identity}/telemetry"
        self.state = f"fg/v1/dev/{identity}/state"

    @property
    def remote(self) -> str:
        return f"{self.host}:{self.port}"

    def hostile(self, now: float) -> bool:
        return self.t0 <= now < self.t0 + HOSTILE_SECONDS

    def gap(self, now: float) -> float:
        interval = self.model.interval_seconds
        if self.hostile(now):
            elapsed = now - self.t0
            if self.scenario is Scenario.COLD_FLOOD and elapsed < FLOOD_SECONDS:
                interval = 1 / 3
            elif self.scenario is Scenario.EXFIL_RATE:
                interval /= 1 + elapsed / 600
            elif self.scenario is Scenario.SILENCE:
                return HOSTILE_SECONDS - elapsed + interval
        if self.model.diurnal:
            interval /= 1 + self.model.diurnal * math.sin(2 * math.pi * now / 86400)
        if self.model.poisson:
            return self.rng.expovariate(1 / interval)
        return interval * self.rng.uniform(0.9, 1.1)

    def size(self, now: float) -> int:
        base = self.model.payload_bytes + self.rng.randint(
            -self.model.payload_jitter, self.model.payload_jitter
        )
        if self.scenario is Scenario.EXFIL and self.hostile(now):
            base = int(base * (1 + (now - self.t0) / 600))
        return max(base, 1)


def replay(spec: ReplaySpec, *, progress: Callable[[str], None] | None = None) -> ReplayReport:
    """Run ``spec``; deterministic for its seed (timings aside)."""
    rng = random.Random(spec.seed)
    start = DEFAULT_FAKE_START
    clock = FakeClock(start)
    end = spec.hours * 3600
    devices: list[_Device] = []
    for index in range(spec.devices):
        model = spec.models[index % len(spec.models)]
        joined = rng.uniform(0, spec.join_spread_minutes * 60)
        devices.append(_Device(f"dev-{index:05d}", model, random.Random(rng.random()), joined))
    for scenario in spec.scenarios:
        for index in range(spec.hostile_per_scenario):
            model = spec.models[0] if scenario is Scenario.NEW_TOPIC else rng.choice(spec.models)
            t0 = rng.uniform(max(spec.join_spread_minutes + 20, 60) * 60, end - 1800)
            joined = (
                t0
                if scenario in (Scenario.COLD_FLOOD, Scenario.ENROLL_FLOOD)
                else (rng.uniform(0, spec.join_spread_minutes * 60))
            )
            devices.append(
                _Device(
                    f"{scenario.value.replace('_', '-')}-{index:03d}",
                    model,
                    random.Random(rng.random()),
                    joined,
                    scenario,
                    t0,
                )
            )
    contexts = {
        d.identity: IdentityContext(
            kind=IdentityKind.DEVICE,
            state=IdentityState.ACTIVE,
            model=d.model.name,
            firmware_version=FIRMWARE_VERSION,
            firmware_digest=FIRMWARE_DIGEST,
            enrolled_at=start + timedelta(seconds=d.joined),
        )
        for d in devices
        if d.registered
    }
    engine = AnomalyEngine(clock, spec.settings, contexts.get)
    by_id = {d.identity: d for d in devices}
    heap: list[tuple[float, int, int, str]] = []
    sequence = 0

    def schedule(at: float, index: int, timer: str) -> None:
        nonlocal sequence
        if at < end:
            sequence += 1
            heapq.heappush(heap, (at, sequence, index, timer))

    for index, device in enumerate(devices):
        schedule(device.joined, index, "join")
        if device.scenario is not None and device.scenario not in (
            Scenario.COLD_FLOOD,
            Scenario.ENROLL_FLOOD,
        ):
            schedule(device.t0, index, "turn")

    observations = 0
    observe_seconds = 0.0
    evaluate_seconds = 0.0
    evaluate_max = 0.0
    evaluations = 0
    verdicts: list[tuple[float, Verdict]] = []
    wall = time.perf_counter()

    def at(seconds: float) -> datetime:
        return start + timedelta(seconds=seconds)

    def send(observation: Observation) -> None:
        nonlocal observations, observe_seconds
        began = time.perf_counter()
        engine.observe(observation)
        observe_seconds += time.perf_counter() - began
        observations += 1

    next_evaluation = spec.evaluate_every_seconds
    hour_mark = 3600.0
    while heap:
        now, _, index, timer = heapq.heappop(heap)
        while next_evaluation <= now:
            clock.set(at(next_evaluation))
            began = time.perf_counter()
            found = engine.evaluate()
            spent = time.perf_counter() - began
            evaluate_seconds += spent
            evaluate_max = max(evaluate_max, spent)
            evaluations += 1
            verdicts.extend((next_evaluation, v) for v in found)
            next_evaluation += spec.evaluate_every_seconds
            if progress is not None and next_evaluation >= hour_mark:
                progress(f"{hour_mark / 3600:.0f} h replayed, {observations:,} observations")
                hour_mark += 3600
        clock.set(at(now))
        device = devices[index]
        rng_d = device.rng
        if timer == "join":
            if device.scenario is Scenario.ENROLL_FLOOD:
                schedule(now, index, "enroll")
                continue
            device.online = True
            send(Connected(device.identity, device.remote))
            schedule(now + rng_d.uniform(0.5, 3), index, "telemetry")
            schedule(now + spec.renew_every_seconds * rng_d.uniform(0.95, 1.05), index, "renew")
            if device.model.state_every_seconds:
                schedule(now + rng_d.uniform(0, device.model.state_every_seconds), index, "state")
            if spec.blips_per_hour > 0:
                schedule(now + rng_d.expovariate(spec.blips_per_hour / 3600), index, "blip")
        elif timer == "telemetry":
            if device.online:
                send(Published(device.identity, device.telemetry, device.size(now)))
                for extra in range(1, device.model.burst):
                    schedule(now + 0.2 * extra, index, "burst")
            schedule(now + device.gap(now), index, "telemetry")
        elif timer == "burst":
            if device.online:
                send(Published(device.identity, device.telemetry, device.size(now)))
        elif timer == "state":
            if device.online:
                send(Published(device.identity, device.state, 2 * device.model.payload_bytes))
            assert device.model.state_every_seconds is not None
            schedule(
                now + device.model.state_every_seconds * rng_d.uniform(0.9, 1.1), index, "state"
            )
        elif timer == "renew":
            tampered = device.scenario is Scenario.TAMPER and now >= device.t0
            if device.online:
                send(Published(device.identity, f"fg/v1/dev/{device.identity}/renew/req", 1100))
            send(
                CertificateIssued(
                    device.identity,
                    attested=False,
                    firmware_version="1.4.3" if tampered else FIRMWARE_VERSION,
                    firmware_digest=TAMPERED_DIGEST if tampered else FIRMWARE_DIGEST,
                )
            )
            if device.model.reconnect_after_renewal and device.online:
                send(Disconnected(device.identity))
                device.port += 1
                send(Connected(device.identity, device.remote))
            schedule(now + spec.renew_every_seconds * rng_d.uniform(0.95, 1.05), index, "renew")
        elif timer == "blip":
            if device.online and not device.hostile(now):
                device.online = False
                send(Disconnected(device.identity))
                schedule(now + rng_d.uniform(2, 20), index, "reconnect")
            schedule(now + rng_d.expovariate(spec.blips_per_hour / 3600), index, "blip")
        elif timer == "reconnect":
            device.online = True
            device.port += 1
            send(Connected(device.identity, device.remote))
        elif timer == "turn":
            _turn(device, now, index, send, schedule, engine)
        elif timer.startswith("probe:"):
            action, topic = PROBES[int(timer.partition(":")[2])]
            send(Denied(device.identity, action, topic))
        elif timer == "topic":
            if device.online and device.hostile(now):
                send(Published(device.identity, device.state, 120))
            if device.hostile(now):
                schedule(now + 30, index, "topic")
        elif timer == "storm":
            if device.hostile(now):
                send(Disconnected(device.identity))
                device.port += 1
                send(Connected(device.identity, device.remote))
                schedule(now + 10, index, "storm")
        elif timer == "flood" and now < device.t0 + FLOOD_SECONDS:
            if device.online:
                send(Published(device.identity, device.telemetry, device.size(now)))
            schedule(now + 0.05, index, "flood")
        elif timer == "enroll" and now < device.t0 + FLOOD_SECONDS:
            send(Published(device.identity, f"fg/v1/enroll/{device.identity}/req", 1400))
            schedule(now + 0.02, index, "enroll")
    wall = time.perf_counter() - wall
    return _report(
        spec,
        devices,
        by_id,
        verdicts,
        end,
        engine,
        {
            "observations": observations,
            "evaluations": evaluations,
            "observe_seconds": observe_seconds,
            "evaluate_seconds": evaluate_seconds,
            "evaluate_max": evaluate_max,
            "wall": wall,
        },
    )


def _turn(
    device: _Device,
    now: float,
    index: int,
    send: Callable[[Observation], None],
    schedule: Callable[[float, int, str], None],
    engine: AnomalyEngine,
) -> None:
    """The moment ``device`` turns hostile."""
    scenario = device.scenario
    if scenario is Scenario.PROBER:
        for step in range(len(PROBES)):
            schedule(now + 0.5 * step, index, f"probe:{step}")
    elif scenario is Scenario.CLONE:
        engine.clone_seen(device.identity, device.remote, f"192.0.2.{index % 250 + 1}:41000")
    elif scenario is Scenario.TAMPER:
        send(
            CertificateIssued(
                device.identity,
                attested=False,
                firmware_version="1.4.3",
                firmware_digest=TAMPERED_DIGEST,
            )
        )
    elif scenario is Scenario.FLOOD:
        schedule(now, index, "flood")
    elif scenario is Scenario.NEW_TOPIC:
        schedule(now, index, "topic")
    elif scenario is Scenario.STORM:
        schedule(now, index, "storm")
    elif scenario is Scenario.NEW_SOURCE:
        if device.online:
            send(Disconnected(device.identity))
        device.host = f"198.51.100.{index % 250 + 1}"
        device.online = True
        send(Connected(device.identity, device.remote))


def _report(
    spec: ReplaySpec,
    devices: list[_Device],
    by_id: dict[str, _Device],
    verdicts: list[tuple[float, Verdict]],
    end: float,
    engine: AnomalyEngine,
    timing: dict[str, float],
) -> ReplayReport:
    normal_seconds = 0.0
    for device in devices:
        if not device.registered:
            continue
        normal_until = min(device.t0, end)
        normal_seconds += max(normal_until - device.joined, 0.0)
    false_alerts: list[tuple[float, Verdict]] = []
    first: dict[str, float] = {}
    kinds: dict[str, Counter[str]] = {}
    for when, verdict in verdicts:
        found = by_id.get(verdict.detection.identity)
        if found is None:
            continue
        device = found
        if when < device.t0:
            false_alerts.append((when, verdict))
            continue
        kinds.setdefault(device.identity, Counter())[verdict.detection.kind.value] += 1
        assert device.scenario is not None
        if verdict.detection.kind in EXPECTED[device.scenario]:
            first.setdefault(device.identity, when - device.t0)
    results = []
    for scenario in spec.scenarios if spec.hostile_per_scenario else ():
        members = [d for d in devices if d.scenario is scenario]
        seen: Counter[str] = Counter()
        for d in members:
            seen.update(kinds.get(d.identity, Counter()))
        delays = sorted(first[d.identity] for d in members if d.identity in first)
        by_model: dict[str, tuple[int, int]] = {}
        for d in members:
            found_, total = by_model.get(d.model.name, (0, 0))
            by_model[d.model.name] = (found_ + (d.identity in first), total + 1)
        results.append(
            ScenarioResult(scenario, len(members), len(delays), tuple(delays), dict(seen), by_model)
        )
    return ReplayReport(
        normal_device_hours=normal_seconds / 3600,
        false_alerts=len(false_alerts),
        false_by_kind=dict(Counter(v.detection.kind.value for _, v in false_alerts)),
        false_examples=tuple(
            f"{v.detection.identity} at {w / 60:.1f} min: {v.detection.reason}"
            for w, v in false_alerts[:5]
        ),
        scenarios=tuple(results),
        observations=int(timing["observations"]),
        evaluations=int(timing["evaluations"]),
        observe_seconds=timing["observe_seconds"],
        evaluate_seconds=timing["evaluate_seconds"],
        evaluate_max_seconds=timing["evaluate_max"],
        wall_seconds=timing["wall"],
        counters=dict(engine.counters),
    )


def format_report(report: ReplayReport) -> str:
    lines = [
        f"normal device-hours: {report.normal_device_hours:,.0f}; false alerts: "
        f"{report.false_alerts} ({report.false_per_1000_hours:.2f} per 1,000 device-hours)"
        + (f" {report.false_by_kind}" if report.false_by_kind else ""),
        *(f"  false: {example}" for example in report.false_examples),
        f"{'mode':<13} {'devices':>7} {'recall':>7} {'<=60 s':>7} {'p50 s':>7} {'p95 s':>7} "
        f"{'max s':>7}  kinds after t0",
    ]
    for result in report.scenarios:

        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f}"

        lines.append(
            f"{result.scenario.value:<13} {result.devices:>7} {result.recall:>7.2f} "
            f"{result.within_60s:>7.2f} {fmt(result.percentile(0.5)):>7} "
            f"{fmt(result.percentile(0.95)):>7} {fmt(result.percentile(1.0)):>7}  "
            f"{', '.join(f'{k} {n}' for k, n in sorted(result.kinds.items()))}"
        )
        if result.detected < result.devices:
            lines.append(
                "  found by model: "
                + ", ".join(f"{m} {f}/{n}" for m, (f, n) in sorted(result.by_model.items()))
            )
    lines.append(
        f"{report.observations:,} observations, {report.observe_microseconds:.2f} us each in "
        f"observe(); {report.evaluations:,} evaluate() calls, mean "
        f"{report.evaluate_seconds / max(report.evaluations, 1) * 1000:.2f} ms, max "
        f"{report.evaluate_max_seconds * 1000:.1f} ms; replay {report.wall_seconds:.1f} s"
    )
    return "\n".join(lines)
