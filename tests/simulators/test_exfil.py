"""exfil: the ramp as planned (no gateway), then one device against a real gateway."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.bench.home import make_bench_home
from gateway.protocol import topics
from gateway.service import Gateway
from gateway.transport import Message, Route
from simulators.factory import load_or_create_factory
from simulators.modes import (
    BEHAVIOUR_STARTED,
    MODE_NAMES,
    ExfilRamp,
    Growth,
    Mode,
    ModeOptions,
    run_exfil,
)
from simulators.modes.exfil import PAD_FIELD, padded_reading

READING: dict[str, float | int] = {
    "seq": 7,
    "temperature_c": 21.5,
    "humidity_pct": 44.1,
    "battery_pct": 93.02,
}


def step_volumes(ramp: ExfilRamp, base_interval: float, steps: int) -> list[float]:
    """The planned volume (sum of size multiples) in each step after the warm-up, relative to
    the volume of a normal step."""
    normal = ramp.step_seconds / base_interval
    volumes = [0.0] * steps
    for reading in ramp.readings(base_interval):
        since = reading.at - ramp.warmup
        if since >= steps * ramp.step_seconds:
            break
        if since >= 0:
            volumes[int(since // ramp.step_seconds)] += reading.size_factor
    return [v / normal for v in volumes]


def test_the_warm_up_is_ordinary_readings_at_the_normal_interval() -> None:
    ramp = ExfilRamp(warmup=30.0, step_seconds=10.0, step_pct=20.0)
    readings = []
    for reading in ramp.readings(2.0):
        if reading.at >= 30.0:
            first = reading
            break
        readings.append(reading)
    assert [r.at for r in readings] == [2.0 * n for n in range(15)]
    assert all(r.size_factor == 1.0 and r.volume_factor == 1.0 for r in readings)
    assert not any(r.started for r in readings)
    # The first reading of the behaviour is already grown, and says so.
    assert first.started and first.volume_factor == pytest.approx(1.2)


@pytest.mark.parametrize("growth", list(Growth))
def test_the_volume_grows_by_the_step_percentage_every_step(growth: Growth) -> None:
    ramp = ExfilRamp(warmup=10.0, step_seconds=10.0, step_pct=20.0, growth=growth)
    volumes = step_volumes(ramp, 0.1, 6)
    for step, volume in enumerate(volumes):
        # +20 % at the start, compounded each step; a reading more or less in a window
        # (the rate changes between steps) is the only slack.
        assert volume == pytest.approx(1.2 ** (step + 1), rel=0.03), (step, volumes)


def test_growth_says_what_grows() -> None:
    since = 35.0  # four steps in: 1.2 ** 4
    factor = 1.2**4
    assert ExfilRamp(growth=Growth.BYTES).multiples(since) == pytest.approx((factor, 1.0))
    assert ExfilRamp(growth=Growth.RATE).multiples(since) == pytest.approx((1.0, factor))
    assert ExfilRamp(growth=Growth.BOTH).multiples(since) == pytest.approx(
        (factor**0.5, factor**0.5)
    )


def test_the_volume_stops_growing_at_its_cap_even_after_a_very_long_run() -> None:
    ramp = ExfilRamp(step_seconds=1.0, step_pct=50.0, max_factor=40.0)
    assert ramp.factor(-0.001) == 1.0
    assert ramp.factor(5.0) == pytest.approx(1.5**6)
    assert ramp.factor(9.0) == 40.0
    assert ramp.factor(10.0**9) == 40.0  # no overflow on the way


def test_a_grown_reading_is_the_reading_plus_incompressible_filler() -> None:
    filler = random.Random(1)
    plain = json.dumps(READING, separators=(",", ":")).encode()
    grown = padded_reading(READING, 3.0, filler, 64 * 1024)
    assert len(grown) == round(len(plain) * 3.0)
    decoded = json.loads(grown)
    assert {k: decoded[k] for k in READING} == READING
    assert set(decoded[PAD_FIELD]) <= set("0123456789abcdef")
    assert padded_reading(READING, 3.0, random.Random(2), 64 * 1024) != grown


def test_a_reading_does_not_grow_past_its_cap_nor_below_the_filler_cost() -> None:
    filler = random.Random(1)
    plain = json.dumps(READING, separators=(",", ":")).encode()
    assert len(padded_reading(READING, 10_000.0, filler, 1024)) == 1024
    assert padded_reading(READING, 1.0, filler, 1024) == plain
    assert padded_reading(READING, 1.05, filler, 1024) == plain  # 4 bytes: the field costs 10


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"warmup": -1.0}, ValueError),
        ({"step_seconds": 0.0}, ValueError),
        ({"step_pct": 0.0}, ValueError),
        ({"max_factor": 0.5}, ValueError),
        ({"max_payload_bytes": 100}, ValueError),
        ({"growth": "sideways"}, ValueError),
        ({"warmup": float("nan")}, ValueError),
        ({"step_pct": True}, TypeError),
        ({"max_payload_bytes": 1024.0}, TypeError),
    ],
)
def test_bad_ramps_are_refused(changes: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        ExfilRamp(**changes)  # type: ignore[arg-type]


def test_a_ramp_needs_a_telemetry_interval() -> None:
    with pytest.raises(ValueError, match="telemetry"):
        next(ExfilRamp().readings(0.0))


def test_exfil_is_a_mode_by_name() -> None:
    assert "exfil" in MODE_NAMES
    assert {m.value for m in Mode} <= set(MODE_NAMES)


# -- against a real gateway --------------------------------------------------------------------


@pytest.fixture
async def gateway_seeing_telemetry(
    tmp_path: Path,
) -> AsyncIterator[tuple[Gateway, list[tuple[float, str, int]]]]:
    """A gateway whose own telemetry route records (time, topic, size) of what it received."""
    settings = make_bench_home(tmp_path / "home", broker="embedded")
    gateway = Gateway(settings)
    seen: list[tuple[float, str, int]] = []

    def record(topic: str, payload: bytes) -> Sequence[Message]:
        seen.append((time.monotonic(), topic, len(payload)))
        return ()

    # First: the transport hands a message to the first route that matches (the admin API's
    # telemetry counter is already there).
    gateway.routes.insert(0, Route(f"{topics.PREFIX}/dev/+/telemetry", record, inline=True))
    try:
        await gateway.start()
        yield gateway, seen
    finally:
        await gateway.stop()


@pytest.mark.broker
async def test_an_exfil_device_stays_in_its_acl_and_its_volume_rises(
    gateway_seeing_telemetry: tuple[Gateway, list[tuple[float, str, int]]],
) -> None:
    gateway, seen = gateway_seeing_telemetry
    factory = load_or_create_factory(gateway.settings.home / "factory")
    options = ModeOptions(
        mode=Mode.NORMAL,
        devices=1,
        host="127.0.0.1",
        enrollment_port=gateway.ports.enrollment,
        operational_port=gateway.ports.operational,
        ca_pem=gateway.ca_chain_pem(),
        duration=6.0,
        telemetry_interval=0.25,
        response_timeout=5.0,
    )
    ramp = ExfilRamp(warmup=2.0, step_seconds=0.5, step_pct=50.0, growth=Growth.BYTES)
    began = time.monotonic()
    summary = await run_exfil(options, factory, asyncio.Event(), ramp)
    assert summary.mode == "exfil"
    assert summary.enrolled == 1 and summary.failed == 0
    assert summary.quarantined == 0 and summary.cut == 0 and not summary.refused
    (device_id,) = options.ids("exfil")
    started = summary.details[BEHAVIOUR_STARTED][device_id]
    assert began + ramp.warmup <= started <= time.monotonic()
    await asyncio.sleep(0.3)  # the last readings on their way
    mine = [(at, size) for at, topic, size in seen if topic == topics.telemetry(device_id)]
    # Nothing refused: the gateway got the readings the device sent (QoS 0 on loopback).
    assert len(mine) >= 0.9 * summary.telemetry and summary.telemetry > 10
    before = [size for at, size in mine if at < started]
    after = [size for at, size in mine if at >= started + 1.5]
    assert before and after
    # Three steps of +50 % on the size by then: bigger by 1.5 ** 4 ~ 5x at the least.
    assert min(after) > 4 * max(before)
