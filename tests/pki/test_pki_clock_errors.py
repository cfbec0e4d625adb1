from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pki.clock import Clock, FakeClock, SystemClock, require_aware
from pki.errors import CsrRejected, IssuanceError, KeyStoreError, PkiError, Reason


def test_fake_clock_starts_at_the_documented_default() -> None:
    assert FakeClock().now() == datetime(2026, 1, 1, tzinfo=UTC)


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(datetime(2030, 5, 1, 12, tzinfo=UTC))
    assert clock.now() == clock.now()
    clock.advance(timedelta(minutes=5))
    assert clock.now() == datetime(2030, 5, 1, 12, 5, tzinfo=UTC)
    clock.advance(1.5)
    assert clock.now() == datetime(2030, 5, 1, 12, 5, 1, 500000, tzinfo=UTC)
    clock.set(datetime(2020, 1, 1, tzinfo=UTC))
    assert clock.now() == datetime(2020, 1, 1, tzinfo=UTC)


def test_fake_clock_normalises_other_zones_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    clock = FakeClock(datetime(2030, 1, 1, 2, tzinfo=plus_two))
    assert clock.now() == datetime(2030, 1, 1, tzinfo=UTC)
    assert clock.now().utcoffset() == timedelta(0)


def test_fake_clock_refuses_backwards_advance_and_naive_times() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="timezone-aware"):
        clock.set(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        FakeClock(datetime(2030, 1, 1))
    with pytest.raises(TypeError):
        clock.advance("5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        clock.advance(True)  # type: ignore[arg-type]


def test_system_clock_is_aware_utc_and_close_to_now() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    assert abs(now - datetime.now(UTC)) < timedelta(seconds=5)


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(FakeClock(), Clock)
    assert isinstance(SystemClock(), Clock)


def test_require_aware_rejects_non_datetimes() -> None:
    with pytest.raises(TypeError):
        require_aware("2030-01-01")  # type: ignore[arg-type]


def test_reason_values_are_lower_case_names() -> None:
    for reason in Reason:
        assert reason.value == reason.name.lower()


@pytest.mark.parametrize("kind", [CsrRejected, IssuanceError, KeyStoreError])
def test_errors_carry_reason_and_detail(kind: type[PkiError]) -> None:
    error = kind(Reason.BAD_SIGNATURE, "flipped bit")
    assert isinstance(error, PkiError)
    assert error.reason is Reason.BAD_SIGNATURE
    assert error.detail == "flipped bit"
    assert str(error) == "bad_signature: flipped bit"
    assert str(kind(Reason.KEY_NOT_FOUND)) == "key_not_found"


def test_error_reason_must_be_a_reason() -> None:
    with pytest.raises(TypeError):
        PkiError("bad_signature")  # type: ignore[arg-type]
