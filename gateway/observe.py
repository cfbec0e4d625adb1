"""What a broker saw an identity do: names, counts and sizes, never payloads.

Both brokers report through one ``Observer`` callback (the embedded broker from its admission
and ACL hooks, Mosquitto from its connection notices and the gateway's own subscriptions), and
the enrollment service reports certificates it issued. Behaviour baselines and anomaly
detection (``gateway.anomaly``) consume these; nothing here keeps state.

An observer is called on the gateway's event loop for every message: it must be quick and must
not raise (callers log and drop what it raises).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.acl import Action
from gateway.store import IdentityRecord

__all__ = [
    "CertificateIssued",
    "Connected",
    "Denied",
    "Disconnected",
    "Observation",
    "Observer",
    "Published",
    "RequestRefused",
]


@dataclass(frozen=True, slots=True)
class Connected:
    """An identity's session was admitted, from ``remote`` ("host:port" of the peer)."""

    identity: str
    remote: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    """An admitted session of ``identity`` ended (closed, cut, or taken over)."""

    identity: str


@dataclass(frozen=True, slots=True)
class Published:
    """``identity`` published ``size`` payload bytes to ``topic`` and the ACL allowed it."""

    identity: str
    topic: str
    size: int


@dataclass(frozen=True, slots=True)
class Denied:
    """The ACL refused ``identity`` an ``action`` on ``topic`` (a publish, a subscription,
    or a delivery to it)."""

    identity: str
    action: Action
    topic: str


@dataclass(frozen=True, slots=True)
class CertificateIssued:
    """The gateway issued ``identity`` a certificate: ``attested`` for a fresh enrollment
    (verified evidence, or an operator's bootstrap token), False for a renewal proven by the
    current certificate. ``firmware_digest`` is what the device reported (None: not
    reported). ``registered``: the identity's registry row as the issuance wrote it, when it
    wrote one (spares the consumer a registry read per enrollment)."""

    identity: str
    attested: bool
    firmware_version: str | None
    firmware_digest: str | None
    registered: IdentityRecord | None = None


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """The gateway refused an enrollment or renewal request of ``identity`` (a device id as
    the request topic named it: possibly no registered identity) with a wire reason code."""

    identity: str
    reason: str


Observation = Connected | Disconnected | Published | Denied | CertificateIssued | RequestRefused
Observer = Callable[[Observation], None]
