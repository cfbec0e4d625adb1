"""Checking a CRL before Mosquitto gets it: a CRL whose nextUpdate has passed makes Mosquitto
refuse every client certificate, revoked or not. The gateway re-signs the CRL every quarter of
its validity or every hour, whichever comes first (``Gateway._refresh_crl_if_leading``); a
cluster's broker keeper when ``needs_refresh`` says so."""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509

from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from pki.clock import require_aware

__all__ = ["check_crl", "needs_refresh"]


def check_crl(crl_pem: bytes, now: datetime) -> x509.CertificateRevocationList:
    """The parsed CRL; MosquittoError(INVALID_CRL) if it is not one PEM CRL with a
    nextUpdate, MosquittoError(CRL_EXPIRED) if that nextUpdate is not after ``now``."""
    if not isinstance(crl_pem, bytes):
        raise TypeError(f"crl_pem must be bytes, not {type(crl_pem).__name__}")
    now = require_aware(now, "now")
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise MosquittoError(MosquittoReason.INVALID_CRL, f"not a PEM CRL: {exc}") from None
    next_update = crl.next_update_utc
    if next_update is None:
        raise MosquittoError(MosquittoReason.INVALID_CRL, "CRL has no nextUpdate")
    if next_update <= now:
        raise MosquittoError(
            MosquittoReason.CRL_EXPIRED,
            f"nextUpdate {next_update.isoformat()} is not after {now.isoformat()}",
        )
    return crl


def needs_refresh(crl_pem: bytes | None, now: datetime, margin: timedelta) -> bool:
    """True when there is no CRL yet, it does not parse, or its nextUpdate is within
    ``margin`` of ``now``."""
    if not isinstance(margin, timedelta) or margin < timedelta(0):
        raise ValueError("margin must be a non-negative timedelta")
    if crl_pem is None:
        return True
    try:
        crl = check_crl(crl_pem, now)
    except MosquittoError:
        return True
    next_update = crl.next_update_utc
    return next_update is None or next_update - now <= margin
