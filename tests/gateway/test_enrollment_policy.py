"""EnrollmentPolicy validates on construction; approval rules, firmware allow-lists and the
renew-after computation behave as documented."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.enrollment import ApprovalRule, EnrollmentPolicy, renew_after
from gateway.enrollment.policy import MAX_CERT_LIFETIME
from gateway.enrollment.timing import clock_skew, granted_lifetime
from gateway.protocol.messages import MAX_LIFETIME, MIN_LIFETIME
from pki.profile import MIN_LEAF_LIFETIME

DIGEST = "ab" * 32


def policy(**changes: Any) -> EnrollmentPolicy:
    settings: dict[str, Any] = {"trust_domain": "fleet.test", "trusted_roots": ()}
    return EnrollmentPolicy(**{**settings, **changes})


def test_defaults_match_the_design() -> None:
    p = policy()
    assert p.cert_lifetime == timedelta(hours=1)
    assert p.renew_fraction == pytest.approx(2 / 3)
    assert p.nonce_ttl == timedelta(seconds=60)
    assert p.max_clock_skew == timedelta(minutes=5)
    assert p.auto_approve == ()
    assert dict(p.firmware_allowlist) == {}


@pytest.mark.parametrize(
    "changes",
    [
        {"trust_domain": "Not A Domain"},
        {"cert_lifetime": timedelta(seconds=59)},
        {"cert_lifetime": timedelta(days=31)},
        {"renew_fraction": 0.05},
        {"renew_fraction": 1.0},
        {"renew_jitter": -0.01},
        {"renew_jitter": 0.3},
        {"nonce_ttl": timedelta(seconds=1)},
        {"max_clock_skew": timedelta(seconds=-1)},
        {"pending_retry_after": 0},
        {"denied_birth_fingerprints": frozenset({"not-hex"})},
        {"firmware_allowlist": {"m": frozenset({"ABC"})}},
        {"firmware_allowlist": {"": frozenset({DIGEST})}},
    ],
)
def test_bad_values_are_value_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        policy(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"trusted_roots": ["not a certificate"]},
        {"auto_approve": [ApprovalRule()]},
        {"auto_approve": ("*",)},
        {"firmware_allowlist": {"m": DIGEST}},
        {"firmware_allowlist": [("m", DIGEST)]},
        {"pending_retry_after": 1.5},
        {"pending_retry_after": True},
    ],
)
def test_bad_types_are_type_errors(changes: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        policy(**changes)


def test_the_allow_list_is_frozen_against_later_changes() -> None:
    source = {"m": frozenset({DIGEST})}
    p = policy(firmware_allowlist=source)
    source["m"] = frozenset()
    assert p.firmware_allowed("m", DIGEST)
    with pytest.raises(TypeError):
        p.firmware_allowlist["x"] = frozenset()  # type: ignore[index]


def test_approval_rules_match_manufacturer_and_model_with_wildcards() -> None:
    p = policy(auto_approve=(ApprovalRule("Acme*", "cam-?"), ApprovalRule(model="thermo")))
    assert p.approves("Acme Sensors", "cam-1")
    assert not p.approves("Acme Sensors", "cam-10")
    assert p.approves("Anyone", "thermo")
    assert not p.approves("acme sensors", "cam-1")  # case matters
    assert not p.approves(None, None)
    assert not policy().approves("Acme", "cam-1")


def test_approval_rules_validate() -> None:
    with pytest.raises(ValueError):
        ApprovalRule(manufacturer="")
    with pytest.raises(TypeError):
        ApprovalRule(model=None)  # type: ignore[arg-type]


def test_firmware_rules() -> None:
    p = policy(firmware_allowlist={"cam": frozenset({DIGEST})})
    assert p.firmware_allowed("cam", DIGEST)
    assert not p.firmware_allowed("cam", "cd" * 32)
    assert not p.firmware_allowed("cam", None)
    assert p.firmware_allowed("other", "cd" * 32)  # unlisted model, not required
    strict = policy(firmware_allowlist={"cam": frozenset({DIGEST})}, require_known_firmware=True)
    assert not strict.firmware_allowed("other", "cd" * 32)
    assert not strict.firmware_allowed(None, None)


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_renew_after_without_jitter_is_the_fraction_of_the_lifetime() -> None:
    at = renew_after(T0, T0 + timedelta(hours=1), 2 / 3, 0.0, random.Random(1))
    assert at == T0 + timedelta(minutes=40)


def test_renew_after_jitter_comes_from_the_injected_random() -> None:
    def at(seed: int) -> datetime:
        return renew_after(T0, T0 + timedelta(hours=1), 0.5, 0.1, random.Random(seed))

    assert at(7) == at(7)
    assert len({at(seed) for seed in range(50)}) > 10


@given(
    lifetime=st.integers(60, 30 * 86400),
    fraction=st.floats(0.1, 0.95),
    jitter=st.floats(0, 0.2),
    seed=st.integers(0, 2**32),
)
def test_renew_after_stays_inside_the_validity(
    lifetime: int, fraction: float, jitter: float, seed: int
) -> None:
    end = T0 + timedelta(seconds=lifetime)
    at = renew_after(T0, end, fraction, jitter, random.Random(seed))
    assert T0 <= at < end
    assert abs((at - T0).total_seconds() - fraction * lifetime) <= jitter * lifetime + 1
    assert at.microsecond == 0


@pytest.mark.parametrize(
    ("policy_lifetime", "requested", "granted"),
    [
        (timedelta(hours=1), None, timedelta(hours=1)),
        (timedelta(hours=1), 60, timedelta(seconds=60)),
        (timedelta(hours=1), 3600, timedelta(hours=1)),
        (timedelta(hours=1), 7200, timedelta(hours=1)),
        (timedelta(minutes=5), 30 * 86400, timedelta(minutes=5)),
        # The floor holds even for a caller that skipped the wire's validation.
        (timedelta(hours=1), 1, timedelta(seconds=60)),
        (timedelta(hours=1), -5, timedelta(seconds=60)),
    ],
)
def test_the_granted_lifetime_is_the_shorter_of_policy_and_request(
    policy_lifetime: timedelta, requested: int | None, granted: timedelta
) -> None:
    assert granted_lifetime(policy_lifetime, requested) == granted


def test_the_wire_bounds_of_a_requested_lifetime_match_what_a_policy_may_grant() -> None:
    assert timedelta(seconds=MIN_LIFETIME) == MIN_LEAF_LIFETIME
    assert timedelta(seconds=MAX_LIFETIME) == MAX_CERT_LIFETIME


def test_clock_skew_is_symmetric() -> None:
    now = T0
    assert clock_skew(int(now.timestamp()) + 30, now) == timedelta(seconds=30)
    assert clock_skew(int(now.timestamp()) - 30, now) == timedelta(seconds=30)
