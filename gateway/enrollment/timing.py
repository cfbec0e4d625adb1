"""Time rules of enrollment: how long a certificate lives, when a device should renew, and how
far its clock may drift."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from pki.profile import MIN_LEAF_LIFETIME


def granted_lifetime(policy_lifetime: timedelta, requested: int | None) -> timedelta:
    """The lifetime a device gets: the policy's, or the shorter one it asked for (in seconds).

    A request can only shorten: the policy is the operator's ceiling. Never below pki's
    shortest leaf lifetime, whatever either side says (step-ca bounds a requested duration the
    same way)."""
    granted = policy_lifetime
    if requested is not None:
        granted = min(granted, timedelta(seconds=requested))
    return max(granted, MIN_LEAF_LIFETIME)


def renew_after(
    issued_at: datetime,
    not_after: datetime,
    fraction: float,
    jitter: float,
    rng: random.Random,
) -> datetime:
    """``issued_at + fraction * lifetime``, moved by up to +- ``jitter * lifetime`` so that a
    fleet enrolled in one burst does not renew in one burst. Whole seconds (the wire's unit),
    never before ``issued_at`` and always before ``not_after``.

    ``issued_at`` is the moment of issue, not the certificate's notBefore: the backdate is an
    allowance for clock skew, not lifetime, and with a one-minute certificate it would pull the
    renewal to a third of the time the device actually holds it."""
    lifetime = (not_after - issued_at).total_seconds()
    offset = lifetime * (fraction + rng.uniform(-jitter, jitter))
    seconds = min(max(int(offset), 0), max(int(lifetime) - 1, 0))
    return issued_at + timedelta(seconds=seconds)


def clock_skew(device_time: int, now: datetime) -> timedelta:
    """How far the device's clock (unix seconds) is from ours, as a non-negative duration."""
    return timedelta(seconds=abs(device_time - now.timestamp()))


def unix(when: datetime) -> int:
    return int(when.timestamp())
