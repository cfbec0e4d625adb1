"""Floods: per-device and total token buckets in front of the enrollment core."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gateway.enrollment import EnrollmentService
from gateway.enrollment.ratelimit import (
    LimitScope,
    RateLimiter,
    RateLimits,
    RateVerdict,
)
from gateway.enrollment.testing import LoopbackGateway, build_enroll, hello_for
from gateway.protocol import (
    Challenge,
    Error,
    IssuedCertificate,
    ReasonCode,
    decode_response,
    encode,
    topics,
)
from gateway.store import StoreError
from pki.clock import FakeClock


def limited_gateway(**limits: float) -> LoopbackGateway:
    gw = LoopbackGateway()
    limiter = RateLimiter(RateLimits(**limits), gw.clock)  # type: ignore[arg-type]
    gw.service = EnrollmentService(
        gw.store, gw.issuer, gw.policy, gw.clock, rate_limiter=limiter
    )
    return gw


# -- the buckets -------------------------------------------------------------------------------


def test_a_device_gets_its_burst_then_its_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(per_device_rate=2.0, per_device_burst=3), clock)
    assert [limiter.check("d").allowed for _ in range(4)] == [True, True, True, False]
    clock.advance(0.5)  # one token at 2 per second
    assert limiter.check("d").allowed
    assert not limiter.check("d").allowed


def test_a_refusal_says_which_bucket_and_how_long_to_wait() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(per_device_rate=0.5, per_device_burst=1), clock)
    assert limiter.check("d").allowed
    refused = limiter.check("d")
    assert refused == RateVerdict(False, LimitScope.DEVICE, pytest.approx(2.0), first=True)
    again = limiter.check("d")
    assert not again.allowed and not again.first  # one audit record per burst, not per message


def test_devices_have_separate_buckets_under_a_shared_total() -> None:
    clock = FakeClock()
    limits = RateLimits(per_device_rate=1, per_device_burst=2, total_rate=1, total_burst=5)
    limiter = RateLimiter(limits, clock)
    assert limiter.check("a").allowed and limiter.check("a").allowed
    assert limiter.check("a").scope is LimitScope.DEVICE
    # Rotating device ids does not get around the total.
    verdicts = [limiter.check(f"rotating-{n}") for n in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert verdicts[3].scope is LimitScope.TOTAL


def test_a_clock_stepping_back_refills_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(per_device_rate=1, per_device_burst=1), clock)
    assert limiter.check("d").allowed
    start = clock.now()
    clock.set(start - timedelta(hours=1))
    assert not limiter.check("d").allowed
    clock.set(start + timedelta(seconds=1))
    assert limiter.check("d").allowed


def test_memory_is_bounded_by_the_number_of_tracked_devices() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimits(max_tracked=100, total_burst=10_000), clock)
    for n in range(1000):
        limiter.check(f"d-{n}")
    assert limiter.tracked == 100


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("per_device_rate", 0, ValueError),
        ("per_device_rate", float("inf"), ValueError),
        ("per_device_rate", float("nan"), ValueError),
        ("per_device_burst", -1, ValueError),
        ("per_device_burst", 1.5, TypeError),
        ("total_rate", "10", TypeError),
        ("total_burst", True, TypeError),
        ("max_tracked", 0, ValueError),
    ],
)
def test_bad_limits_are_refused(field: str, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        RateLimits(**{field: value})  # type: ignore[arg-type]


def test_limiter_and_verdicts_validate() -> None:
    with pytest.raises(TypeError):
        RateLimiter({"per_device_rate": 1}, FakeClock())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RateLimiter(RateLimits(), FakeClock()).check(7)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RateVerdict(True, LimitScope.DEVICE)
    with pytest.raises(ValueError):
        RateVerdict(False)
    gw = LoopbackGateway()
    with pytest.raises(TypeError):
        EnrollmentService(gw.store, gw.issuer, gw.policy, gw.clock, rate_limiter=object())  # type: ignore[arg-type]


# -- a flood on the wire ---------------------------------------------------------------------


def test_a_flood_from_one_client_is_rate_limited_counted_and_audited_once() -> None:
    gw = limited_gateway(per_device_rate=1.0, per_device_burst=5)
    credential = gw.mint("dev-1")
    answers = [gw.ask("dev-1", hello_for(credential, f"h{n}")) for n in range(50)]
    assert all(isinstance(a, Challenge) for a in answers[:5])
    refused = answers[5:]
    assert all(isinstance(a, Error) and a.reason == ReasonCode.RATE_LIMITED for a in refused)
    # The refusal carries the request's id, so the device knows it is meant and backs off.
    assert [a.id for a in refused[:2]] == ["h5", "h6"]
    assert gw.service.metrics["rejected.rate_limited"] == 45
    assert gw.service.metrics["challenges"] == 5
    limited = [r.entry for r in gw.store.audit_records() if "rate_limited" in r.entry.reasons]
    assert len(limited) == 1
    assert limited[0].subject == "dev-1" and limited[0].detail["scope"] == "device"


def test_garbage_is_limited_before_it_is_parsed() -> None:
    gw = limited_gateway(per_device_rate=1.0, per_device_burst=2)
    topic = topics.enroll_request("dev-1")
    for _ in range(2):
        gw.service.handle(topic, b"\xff not json")
    (reply,) = gw.service.handle(topic, b"\xff not json")
    answer = decode_response(reply.payload)
    assert isinstance(answer, Error)
    assert (answer.reason, answer.id) == (ReasonCode.RATE_LIMITED, None)
    assert gw.service.metrics["rejected.malformed"] == 2


def test_other_devices_are_served_while_one_floods() -> None:
    gw = limited_gateway(per_device_rate=1.0, per_device_burst=3)
    noisy = gw.mint("noisy")
    for n in range(30):
        gw.ask("noisy", hello_for(noisy, f"n{n}"))
    quiet = gw.mint("quiet")
    challenge = gw.ask("quiet", hello_for(quiet, "q1"))
    assert isinstance(challenge, Challenge)
    request, _ = build_enroll(quiet, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("quiet", request), IssuedCertificate)


def test_a_limited_request_is_not_stored_and_succeeds_when_retried_later() -> None:
    gw = limited_gateway(per_device_rate=0.2, per_device_burst=2)
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential, "h1")
    gw.ask("dev-1", hello_for(credential, "h2"))
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    refused = gw.ask("dev-1", request)
    assert isinstance(refused, Error) and refused.reason == ReasonCode.RATE_LIMITED
    gw.clock.advance(timedelta(seconds=5))
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)


def test_a_rate_limit_that_cannot_be_audited_is_still_a_rate_limit() -> None:
    gw = limited_gateway(per_device_rate=1.0, per_device_burst=1)
    credential = gw.mint("dev-1")
    gw.ask("dev-1", hello_for(credential, "h1"))

    def broken(entries: object) -> None:
        raise StoreError("append_audit: disk is full")

    gw.store.append_audit = broken  # type: ignore[method-assign]
    answer = gw.ask("dev-1", encode(hello_for(credential, "h2")))
    assert isinstance(answer, Error) and answer.reason == ReasonCode.RATE_LIMITED
