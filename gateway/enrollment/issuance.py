"""Issue an operational certificate from registry facts and turn it into a row and a response."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.enrollment.errors import EnrollmentRejected
from gateway.enrollment.policy import EnrollmentPolicy
from gateway.enrollment.timing import granted_lifetime, renew_after, unix
from gateway.protocol.messages import IssuedCertificate
from gateway.protocol.reasons import ReasonCode
from gateway.store import CertificateRecord, CertificateStatus
from pki.errors import IssuanceError
from pki.issue import Issuer
from pki.profile import IdentityKind, LeafTemplate


@dataclass(frozen=True)
class Issued:
    record: CertificateRecord
    response: IssuedCertificate
    lifetime: timedelta  # what was granted (the CA's own expiry may still cut it shorter)


def issue_device_certificate(
    issuer: Issuer,
    policy: EnrollmentPolicy,
    rng: random.Random,
    *,
    device_id: str,
    public_key: CertificatePublicKeyTypes,
    key_fingerprint: str,
    request_id: str,
    now: datetime,
    requested_lifetime: int | None = None,
) -> Issued:
    """Only the CSR's public key comes from the device; name, SAN, lifetime and extensions come
    from the registry and the policy. ``requested_lifetime`` (seconds, from the request) can
    only shorten the policy's lifetime."""
    lifetime = granted_lifetime(policy.cert_lifetime, requested_lifetime)
    template = LeafTemplate(
        kind=IdentityKind.DEVICE,
        name=device_id,
        trust_domain=policy.trust_domain,
        lifetime=lifetime,
    )
    try:
        certificate = issuer.issue(template, public_key)
    except IssuanceError as exc:
        raise EnrollmentRejected(ReasonCode.ISSUANCE_FAILED, exc.detail) from exc
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    # The issuer read the same clock as ``now``; the clamp keeps the start inside the
    # certificate's validity however the two readings fall.
    issued_at = min(max(now.replace(microsecond=0), not_before), not_after)
    renew_at = renew_after(issued_at, not_after, policy.renew_fraction, policy.renew_jitter, rng)
    record = CertificateRecord(
        serial=certificate.serial_number,
        identity_id=device_id,
        public_key_fingerprint=key_fingerprint,
        not_before=not_before,
        not_after=not_after,
        issued_at=now,
        pem=certificate.public_bytes(Encoding.PEM).decode("ascii"),
        status=CertificateStatus.ACTIVE,
        request_id=request_id,
    )
    response = IssuedCertificate(
        id=request_id,
        certificate=certificate.public_bytes(Encoding.DER),
        chain=tuple(ca.public_bytes(Encoding.DER) for ca in issuer.chain),
        not_after=unix(not_after),
        renew_after=unix(renew_at),
    )
    return Issued(record, response, lifetime)
