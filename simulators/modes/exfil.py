"""exfil: an enrolled device that behaves for a while, then slowly raises its telemetry volume.

It publishes only on its own telemetry topic, which its ACL allows: nothing is refused, and
only its behaviour gives it away. After ``warmup`` seconds of ordinary readings the volume
grows by ``step_pct`` every ``step_seconds`` (bigger readings, more readings, or both), up to
``max_factor`` times the normal volume. The moment each device's first grown reading went out
is recorded in the summary (``details["behaviour_started"]``, ``time.monotonic()``, the clock
of ``SensorEvent``): the label a detector's time to detection is measured from.

The ramp (``ExfilRamp``) is pure: ``readings()`` yields when to publish and how big, and the
runner only keeps time and moves bytes. A device holds one operational session for its whole
run and does not renew (runs are minutes; certificates last an hour by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import aiomqtt

from gateway.protocol import topics
from pki.factory import BirthCredential, FactoryCA
from simulators.conversation import EnrollmentFailed, enroll_once
from simulators.factory import MODEL
from simulators.modes.common import Mode, ModeOptions, ModeSummary, Session, open_session
from simulators.telemetry import SensorModel

__all__ = [
    "BEHAVIOUR_STARTED",
    "EXFIL",
    "ExfilRamp",
    "Growth",
    "RampReading",
    "padded_reading",
    "run_exfil",
]

EXFIL = Mode.EXFIL.value
# The summary's ``details`` key of the labels: {device id: time.monotonic() the hostile
# behaviour started}. Any mode that records its start time uses this key.
BEHAVIOUR_STARTED = "behaviour_started"
# The filler added to a reading to make it bigger (JSON string of hex digits).
PAD_FIELD = "blob"


class Growth(StrEnum):
    """What grows when the volume grows."""

    BYTES = "bytes"  # bigger readings at the normal rate
    RATE = "rate"  # more readings of the normal size
    BOTH = "both"  # each by the square root of the factor: the volume by the whole factor


@dataclass(frozen=True)
class RampReading:
    """One reading of the plan."""

    at: float  # seconds after the operational session opened
    size_factor: float  # payload size, as a multiple of an ordinary reading's
    volume_factor: float  # bytes per minute, as a multiple of the normal volume
    started: bool  # the hostile behaviour has begun (at >= warmup)


@dataclass(frozen=True)
class ExfilRamp:
    warmup: float = 60.0  # seconds of ordinary readings first
    step_seconds: float = 10.0  # the volume grows at the start of each step...
    step_pct: float = 20.0  # ...by this much (compounded)
    growth: Growth = Growth.BOTH
    max_factor: float = 100.0  # the volume grows no further than this multiple of normal
    max_payload_bytes: int = 64 * 1024  # no reading bigger (the broker caps packets at 256 KiB)

    def __post_init__(self) -> None:
        object.__setattr__(self, "growth", Growth(self.growth))
        for name in ("warmup", "step_seconds", "step_pct", "max_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite")
        if isinstance(self.max_payload_bytes, bool) or not isinstance(self.max_payload_bytes, int):
            raise TypeError("max_payload_bytes must be an int")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.step_seconds <= 0:
            raise ValueError("step_seconds must be positive")
        if self.step_pct <= 0:
            raise ValueError("step_pct must be positive (the point is to grow)")
        if self.max_factor < 1:
            raise ValueError("max_factor must be >= 1")
        if self.max_payload_bytes < 256:
            raise ValueError("max_payload_bytes must be at least 256")

    def factor(self, since_start: float) -> float:
        """The volume multiple ``since_start`` seconds after the behaviour started: 1 before,
        then ``1 + step_pct/100`` at once, compounded at the start of every further step."""
        if since_start < 0:
            return 1.0
        steps = math.floor(since_start / self.step_seconds) + 1
        # In logarithms: a long ramp must reach the cap, not overflow on the way.
        log_factor = steps * math.log1p(self.step_pct / 100.0)
        return min(math.exp(min(log_factor, 700.0)), self.max_factor)

    def multiples(self, since_start: float) -> tuple[float, float]:
        """(size multiple, rate multiple) whose product is ``factor(since_start)``."""
        volume = self.factor(since_start)
        if self.growth is Growth.BYTES:
            return volume, 1.0
        if self.growth is Growth.RATE:
            return 1.0, volume
        root = math.sqrt(volume)
        return root, root

    def readings(self, base_interval: float) -> Iterator[RampReading]:
        """The plan, forever: a reading every ``base_interval`` seconds during the warm-up,
        then closer together and/or bigger as ``growth`` says."""
        if not base_interval > 0:
            raise ValueError("exfil needs telemetry: base_interval must be positive")
        at = 0.0
        while True:
            since = at - self.warmup
            size, rate = self.multiples(since)
            yield RampReading(at, size, self.factor(since), since >= 0)
            at += base_interval / rate


def padded_reading(
    reading: dict[str, float | int], size_factor: float, filler: random.Random, max_bytes: int
) -> bytes:
    """The reading as compact JSON, grown to ``size_factor`` times its own size (at most
    ``max_bytes``) with a field of random hex digits: data that compresses no better than
    what a device would smuggle out. A reading cannot grow by less than the empty field
    costs (10 bytes): below that (and at a factor of 1) it goes out as it is."""
    plain = json.dumps(reading, separators=(",", ":")).encode()
    target = min(round(len(plain) * size_factor), max_bytes)
    empty = json.dumps({**reading, PAD_FIELD: ""}, separators=(",", ":")).encode()
    room = target - len(empty)
    if room <= 0:
        return plain
    padded = {**reading, PAD_FIELD: f"{filler.getrandbits(4 * room):0{room}x}"}
    return json.dumps(padded, separators=(",", ":")).encode()


@dataclass
class _DeviceTally:
    messages: int = 0
    bytes: int = 0
    volume_factor: float = 1.0


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True when ``stop`` was set meanwhile."""
    if seconds > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def _publish_plan(
    session: Session,
    device_id: str,
    ramp: ExfilRamp,
    base_interval: float,
    seed: int,
    stop: asyncio.Event,
    until: float | None,
    started: dict[str, float],
    tally: _DeviceTally,
) -> None:
    """Publish the ramp's readings until ``until``, ``stop`` or a cut; counted in ``tally``
    as they go (a cut keeps what was sent before it)."""
    model = SensorModel(seed)
    filler = random.Random(seed)
    opened = time.monotonic()
    for reading in ramp.readings(base_interval):
        due = opened + reading.at
        if until is not None and due >= until:
            break
        if await _wait_or_stop(stop, due - time.monotonic()) or session.cut:
            break
        # A late publish (a busy machine) shifts the rest of the plan instead of sending the
        # readings it missed in a burst, which would look like an anomaly of its own.
        opened += max(0.0, time.monotonic() - due)
        if reading.started and device_id not in started:
            started[device_id] = time.monotonic()
        payload = padded_reading(
            model.read(), reading.size_factor, filler, ramp.max_payload_bytes
        )
        await session.client.publish(topics.telemetry(device_id), payload, qos=0)
        tally.messages += 1
        tally.bytes += len(payload)
        tally.volume_factor = reading.volume_factor


async def _exfiltrate(
    options: ModeOptions,
    ramp: ExfilRamp,
    credential: BirthCredential,
    seed: int,
    stop: asyncio.Event,
    until: float | None,
    summary: ModeSummary,
    started: dict[str, float],
) -> _DeviceTally:
    device_id = credential.serial_number
    try:
        conversation = await enroll_once(credential, options.sensor(seed))
    except EnrollmentFailed as exc:
        summary.failed += 1
        summary.rejected[exc.reason] += 1
        return _DeviceTally()
    except aiomqtt.MqttError:
        summary.refused["enrollment"] += 1
        return _DeviceTally()
    enrolled = conversation.enrolled
    assert enrolled is not None  # enroll_once returns only with a certificate
    summary.enrolled += 1
    try:
        session = await open_session(options, enrolled, device_id, "")
    except aiomqtt.MqttError:
        summary.refused["operational"] += 1
        return _DeviceTally()
    tally = _DeviceTally()
    try:
        # What an ordinary sensor subscribes to on its operational session.
        await session.client.subscribe(topics.renew_response(device_id), qos=1)
        await _publish_plan(
            session, device_id, ramp, options.telemetry_interval, seed, stop, until, started,
            tally,
        )
        # Quarantined: the session stays, but the device's rights shrink to the quarantine
        # outlet (its command topics are refused); its telemetry was dropped meanwhile.
        if await session.rights(device_id) is False:
            summary.quarantined += 1
    except aiomqtt.MqttError:
        session.cut = True
    finally:
        summary.cut += int(session.cut)
        await session.close()
    return tally


async def run_exfil(
    options: ModeOptions,
    factory: FactoryCA,
    stop: asyncio.Event,
    ramp: ExfilRamp | None = None,
) -> ModeSummary:
    """``options.devices`` exfiltrating devices at once, until ``options.duration`` (from the
    start) or ``stop``. Every field of ``options`` but ``mode`` is read: ``telemetry_interval``
    is the normal rate the ramp starts from."""
    ramp = ramp or ExfilRamp()
    if not options.telemetry_interval > 0:
        raise ValueError("exfil needs telemetry: telemetry_interval must be positive")
    began = time.monotonic()
    until = began + options.duration if options.duration is not None else None
    summary = ModeSummary(devices=options.devices, mode=EXFIL)
    started: dict[str, float] = {}
    ids = options.ids(EXFIL)
    tallies = await asyncio.gather(
        *(
            _exfiltrate(
                options, ramp, factory.mint(device_id, MODEL), seed, stop, until, summary, started
            )
            for seed, device_id in enumerate(ids)
        )
    )
    summary.telemetry = sum(t.messages for t in tallies)
    summary.details = {
        "warmup_s": ramp.warmup,
        "step_s": ramp.step_seconds,
        "step_pct": ramp.step_pct,
        "growth": ramp.growth.value,
        "max_factor": ramp.max_factor,
        BEHAVIOUR_STARTED: dict(started),
        "bytes": sum(t.bytes for t in tallies),
        "final_volume_factor": round(max((t.volume_factor for t in tallies), default=1.0), 3),
    }
    summary.seconds = time.monotonic() - began
    return summary
