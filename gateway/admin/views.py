"""Registry records as the admin API's JSON: one function per shape, no decisions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from cryptography import x509

from gateway.store import (
    AuditRecord,
    CertificateRecord,
    CertificateStatus,
    IdentityRecord,
    RefusalRecord,
    Store,
)


def iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def current_certificate(certificates: list[CertificateRecord]) -> CertificateRecord | None:
    """The identity's certificate in force: the newest ACTIVE one."""
    active = [c for c in certificates if c.status is CertificateStatus.ACTIVE]
    return max(active, key=lambda c: (c.issued_at, c.serial), default=None)


# Past this many identities to read again, one query over every active certificate is cheaper
# than one query per identity: 100k identities one by one took 22 s right after a start, longer
# than the console waits for its fleet. A few renewals are still read one by one.
BULK_LOOKUP_AFTER = 64


class CurrentCertificates:
    """The certificate in force per identity, read from the registry only when the identity's
    row changed since the last look.

    Every certificate change (enrollment, renewal, revocation) rewrites the identity's row with
    a new ``updated_at`` in the same transaction, so that timestamp says when to read again.
    ``refresh`` reads a whole listing's changed identities at once: one query over all active
    certificates when many changed (the first listing after a start), one per identity when
    few did (renewals since the last listing).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._known: dict[str, tuple[datetime, CertificateRecord | None]] = {}

    def _is_known(self, record: IdentityRecord) -> bool:
        known = self._known.get(record.id)
        return known is not None and known[0] == record.updated_at

    def refresh(self, records: Sequence[IdentityRecord]) -> None:
        """Learn the current certificate of every record in ``records`` not known yet."""
        stale = [r for r in records if not self._is_known(r)]
        if len(stale) <= BULK_LOOKUP_AFTER:
            for record in stale:
                self(record)
            return
        active: dict[str, list[CertificateRecord]] = {}
        for certificate in self._store.active_certificates():
            active.setdefault(certificate.identity_id, []).append(certificate)
        # A change between the listing and this query only makes the certificate fresher than
        # the row's updated_at says; that row's next updated_at differs, so it is read again.
        for record in stale:
            self._known[record.id] = (
                record.updated_at,
                current_certificate(active.get(record.id, [])),
            )

    def __call__(self, record: IdentityRecord) -> CertificateRecord | None:
        if self._is_known(record):
            return self._known[record.id][1]
        certificate = current_certificate(self._store.certificates_for(record.id))
        self._known[record.id] = (record.updated_at, certificate)
        return certificate

    def forget_others(self, present: Iterable[str]) -> None:
        """Drop identities no longer in the registry (keeps memory bounded by the fleet)."""
        keep = set(present)
        self._known = {k: v for k, v in self._known.items() if k in keep}


def identity_row(
    record: IdentityRecord, *, connected: bool, certificate: CertificateRecord | None
) -> dict[str, Any]:
    return {
        "id": record.id,
        "kind": record.kind.value,
        "state": record.state.value,
        "model": record.model,
        "manufacturer": record.manufacturer,
        "firmware_version": record.firmware_version,
        "connected": connected,
        "last_seen_at": iso(record.last_seen_at),
        "cert_not_after": iso(certificate.not_after) if certificate is not None else None,
        "role": record.role,
    }


def attestation(record: IdentityRecord) -> dict[str, Any]:
    return {
        "manufacturer": record.manufacturer,
        "model": record.model,
        "firmware_version": record.firmware_version,
        "firmware_digest": record.firmware_digest,
        "birth_fingerprint": record.birth_fingerprint,
    }


def _general_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"{type(name).__name__}:{name.value}"


def certificate_json(record: CertificateRecord) -> dict[str, Any]:
    subject = issuer = None
    san: list[str] = []
    try:
        cert = x509.load_pem_x509_certificate(record.pem.encode("ascii"))
        subject = cert.subject.rfc4514_string()
        issuer = cert.issuer.rfc4514_string()
        try:
            extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            san = [_general_name(n) for n in extension.value]
        except x509.ExtensionNotFound:
            pass
    except ValueError:
        pass  # a damaged row still shows its registry facts
    return {
        "serial": f"{record.serial:x}",
        "status": record.status.value,
        "subject": subject,
        "san": san,
        "issuer": issuer,
        "not_before": iso(record.not_before),
        "not_after": iso(record.not_after),
        "issued_at": iso(record.issued_at),
        "revoked_at": iso(record.revoked_at),
        "revocation_reason": record.revocation_reason,
        "pem": record.pem,
    }


def audit_json(record: AuditRecord) -> dict[str, Any]:
    entry = record.entry
    return {
        "seq": record.seq,
        "at": entry.at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "outcome": entry.outcome,
        "reasons": list(entry.reasons),
        "detail": dict(entry.detail),
        "hash": record.hash,
    }


def refusal_json(record: RefusalRecord) -> dict[str, Any]:
    return {
        "key": record.key,
        "listener": record.listener,
        "reason": record.reason,
        "client_id": record.client_id,
        "cert_subject": record.cert_subject,
        "cert_issuer": record.cert_issuer,
        "cert_fingerprint": record.cert_fingerprint,
        "remote": record.remote,
        "first_seen": record.first_seen.isoformat(),
        "last_seen": record.last_seen.isoformat(),
        "count": record.count,
    }
