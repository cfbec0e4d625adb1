"""Telemetry rate per device: one-minute buckets, bounded memory, no payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.admin.telemetry import TelemetryCounter, TelemetryRate
from pki.clock import FakeClock

START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


def test_counts_land_in_the_current_minute_oldest_first(clock: FakeClock) -> None:
    counter = TelemetryCounter(clock, minutes=5)
    counter.count("dev-1")
    counter.count("dev-1")
    clock.advance(timedelta(minutes=1))
    counter.count("dev-1")
    clock.advance(timedelta(minutes=2))
    assert counter.rate("dev-1") == TelemetryRate((0, 2, 1, 0, 0), 3)


def test_old_minutes_fall_off_but_the_total_stays(clock: FakeClock) -> None:
    counter = TelemetryCounter(clock, minutes=3)
    for _ in range(4):
        counter.count("dev-1")
    clock.advance(timedelta(minutes=3))
    assert counter.rate("dev-1") == TelemetryRate((0, 0, 0), 4)
    clock.advance(timedelta(days=2))  # a long silence does not cost a loop per minute
    counter.count("dev-1")
    assert counter.rate("dev-1") == TelemetryRate((0, 0, 1), 5)


def test_an_unknown_device_has_an_empty_series(clock: FakeClock) -> None:
    assert TelemetryCounter(clock).rate("ghost") == TelemetryRate((0,) * 30, 0)


def test_memory_is_bounded_by_forgetting_the_longest_silent_device(clock: FakeClock) -> None:
    counter = TelemetryCounter(clock, max_devices=2)
    counter.count("dev-1")
    counter.count("dev-2")
    counter.count("dev-1")  # dev-2 is now the longest silent
    counter.count("dev-3")
    assert len(counter) == 2
    assert counter.rate("dev-2").total == 0
    assert counter.rate("dev-1").total == 2 and counter.rate("dev-3").total == 1


def test_the_route_handler_counts_telemetry_topics_only(clock: FakeClock) -> None:
    counter = TelemetryCounter(clock)
    assert counter.handle("fg/v1/dev/dev-1/telemetry", b"payload is not kept") == ()
    counter.handle("fg/v1/dev/dev-1/state", b"")
    counter.handle("fg/v1/dev/dev-1/telemetry/extra", b"")
    assert counter.rate("dev-1").total == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"minutes": 0}, ValueError),
        ({"max_devices": 0}, ValueError),
        ({"minutes": True}, ValueError),
    ],
)
def test_bad_settings_are_refused(clock: FakeClock, kwargs: dict[str, int], error: type) -> None:
    with pytest.raises(error):
        TelemetryCounter(clock, **kwargs)


@pytest.mark.parametrize(
    ("per_minute", "total"), [((-1,), 0), ((1.5,), 1), ((True,), 1), ((1,), -1)]
)
def test_a_rate_validates_itself(per_minute: tuple[int, ...], total: int) -> None:
    with pytest.raises(ValueError):
        TelemetryRate(per_minute, total)
