"""``MemoryStore``: the whole ``gateway.store.Store`` port in memory, for tests and simulations.

It keeps the same rules as the SQL registry (uniqueness, idempotency, lifecycle, audit chaining)
so the contract tests hold for both. One lock serialises every method; each method validates
everything it is about to do before changing anything, so a refused call leaves no trace.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from gateway.audit import chain
from gateway.lifecycle import check_transition
from gateway.store import (
    AuditCheckpoint,
    AuditEntry,
    AuditRecord,
    CertificateRecord,
    CertificateStatus,
    DuplicateError,
    IdentityRecord,
    IdentityState,
    NonceCheck,
    NonceRecord,
    RefusalRecord,
    StoredResponse,
    TokenCheck,
    TokenRecord,
)
from pki.clock import require_aware as require_aware_time
from pki.profile import IdentityKind

__all__ = [
    "MAX_SERIAL",
    "MemoryStore",
    "check_limit",
    "check_nonce_value",
    "check_refusals",
    "check_serial",
    "in_utc",
    "merge_refusals",
    "require_aware",
]

_Record = TypeVar("_Record")

MAX_SERIAL = 2**160 - 1
"""RFC 5280 allows serial numbers of up to 20 octets."""


def require_aware(record: object) -> None:
    """Raise ValueError if any datetime field of the dataclass ``record`` is naive."""
    for item in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, item.name)
        if isinstance(value, datetime) and (value.tzinfo is None or value.utcoffset() is None):
            raise ValueError(f"{type(record).__name__}.{item.name} must be timezone-aware")


def in_utc(record: _Record) -> _Record:
    """``record`` with every datetime field moved to UTC (the SQL registry reads them back that
    way); ValueError if one is naive."""
    require_aware(record)
    changes = {
        item.name: value.astimezone(UTC)
        for item in dataclasses.fields(record)  # type: ignore[arg-type]
        if isinstance(value := getattr(record, item.name), datetime)
        and value.utcoffset() != timedelta(0)
    }
    return dataclasses.replace(record, **changes) if changes else record  # type: ignore[type-var]


def check_serial(serial: object) -> int:
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise TypeError(f"serial must be an int, not {type(serial).__name__}")
    if not 0 < serial <= MAX_SERIAL:
        raise ValueError("serial must be a positive integer of at most 160 bits")
    return serial


def check_nonce_value(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"nonce value must be bytes, not {type(value).__name__}")
    if not 1 <= len(value) <= 64:
        raise ValueError("nonce value must be 1 to 64 bytes")
    return value


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, not {type(limit).__name__}")
    if limit < 0:
        raise ValueError("limit must be >= 0")
    return limit


def check_refusals(records: Sequence[RefusalRecord]) -> list[RefusalRecord]:
    """Every record of a batch validated again (``dataclasses.replace`` reruns
    ``__post_init__``, so even a record altered after construction is caught) and in UTC;
    TypeError or ValueError for the first bad one, before anything is written."""
    if isinstance(records, str | bytes) or not isinstance(records, Sequence):
        raise TypeError("refusals must be a sequence of RefusalRecord")
    checked = []
    for record in records:
        if not isinstance(record, RefusalRecord):
            raise TypeError(f"expected a RefusalRecord, not {type(record).__name__}")
        checked.append(in_utc(dataclasses.replace(record)))
    return checked


def merge_refusals(stored: RefusalRecord | None, seen: RefusalRecord) -> RefusalRecord:
    """``seen`` folded into the aggregate ``stored`` of the same key: counts add up, the span
    covers both, and the newer sighting (``seen`` on a tie) names who and where. ValueError if
    the count would outgrow its column."""
    if stored is None:
        return seen
    newer = seen if seen.last_seen >= stored.last_seen else stored
    return dataclasses.replace(
        newer,
        first_seen=min(stored.first_seen, seen.first_seen),
        last_seen=newer.last_seen,
        count=stored.count + seen.count,
    )


def _detached(entry: AuditEntry) -> AuditEntry:
    # AuditEntry is frozen but its detail dict is not: keep a private copy so a caller mutating
    # its dict can never change a hashed record.
    return dataclasses.replace(
        in_utc(entry), reasons=tuple(entry.reasons), detail=dict(entry.detail)
    )


def _detached_record(record: AuditRecord) -> AuditRecord:
    return dataclasses.replace(record, entry=_detached(record.entry))


class MemoryStore:
    """An in-memory ``Store``; thread-safe, nothing persists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._identities: dict[str, IdentityRecord] = {}
        self._certificates: dict[int, CertificateRecord] = {}
        self._serial_by_key: dict[str, int] = {}
        self._responses: dict[tuple[str, str], StoredResponse] = {}
        self._nonces: dict[bytes, NonceRecord] = {}
        self._tokens: dict[str, TokenRecord] = {}
        self._audit: list[AuditRecord] = []
        self._checkpoints: dict[int, AuditCheckpoint] = {}
        self._refusals: dict[str, RefusalRecord] = {}

    # identities

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        with self._lock:
            return self._identities.get(identity_id)

    def find_by_birth_fingerprint(self, fingerprint: str) -> IdentityRecord | None:
        with self._lock:
            return self._by_birth(fingerprint)

    def list_identities(
        self, kind: IdentityKind | None = None, state: IdentityState | None = None
    ) -> list[IdentityRecord]:
        with self._lock:
            return sorted(
                (
                    identity
                    for identity in self._identities.values()
                    if (kind is None or identity.kind == kind)
                    and (state is None or identity.state == state)
                ),
                key=lambda identity: identity.id,
            )

    def put_identity(self, record: IdentityRecord, audit: Sequence[AuditEntry] = ()) -> None:
        record = in_utc(record)
        with self._lock:
            self._check_identity(record)
            chained = self._chain(audit)
            self._identities[record.id] = record
            self._audit.extend(chained)

    def touch(self, identity_id: str, seen_at: datetime) -> None:
        seen_at = require_aware_time(seen_at, "seen_at")
        with self._lock:
            identity = self._identities.get(identity_id)
            if identity is None:
                raise KeyError(identity_id)
            seen = dataclasses.replace(identity, last_seen_at=seen_at)
            self._identities[identity_id] = seen

    def touch_many(self, seen: Mapping[str, datetime]) -> int:
        updated = 0
        with self._lock:
            for identity_id, seen_at in seen.items():
                seen_at = require_aware_time(seen_at, "seen_at")
                identity = self._identities.get(identity_id)
                if identity is not None:
                    self._identities[identity_id] = dataclasses.replace(
                        identity, last_seen_at=seen_at
                    )
                    updated += 1
        return updated

    # nonces

    def put_nonce(self, nonce: NonceRecord) -> None:
        check_nonce_value(nonce.value)
        nonce = in_utc(nonce)
        with self._lock:
            if nonce.value in self._nonces:
                raise DuplicateError("nonce already issued")
            self._nonces[nonce.value] = nonce

    def consume_nonce(self, value: bytes, device_id: str, now: datetime) -> NonceCheck:
        check_nonce_value(value)
        now = require_aware_time(now, "now")
        with self._lock:
            nonce = self._nonces.get(value)
            if nonce is None:
                return NonceCheck.UNKNOWN
            if nonce.device_id != device_id:
                return NonceCheck.OTHER_DEVICE
            if nonce.used_at is not None:
                return NonceCheck.REUSED
            if now >= nonce.expires_at:
                return NonceCheck.EXPIRED
            self._nonces[value] = dataclasses.replace(nonce, used_at=now)
            return NonceCheck.OK

    # bootstrap tokens

    def put_token(self, token: TokenRecord, audit: Sequence[AuditEntry] = ()) -> None:
        token = in_utc(token)
        with self._lock:
            if token.token_hash in self._tokens:
                raise DuplicateError("token already exists")
            chained = self._chain(audit)
            self._tokens[token.token_hash] = token
            self._audit.extend(chained)

    def consume_token(self, token_hash: str, device_id: str, now: datetime) -> TokenCheck:
        now = require_aware_time(now, "now")
        with self._lock:
            token = self._tokens.get(token_hash)
            if token is None:
                return TokenCheck.UNKNOWN
            if token.device_id != device_id:
                return TokenCheck.OTHER_DEVICE
            if token.used_at is not None:
                return TokenCheck.REUSED
            if now >= token.expires_at:
                return TokenCheck.EXPIRED
            self._tokens[token_hash] = dataclasses.replace(token, used_at=now)
            return TokenCheck.OK

    # certificates

    def certificates_for(self, identity_id: str) -> list[CertificateRecord]:
        with self._lock:
            return sorted(
                (cert for cert in self._certificates.values() if cert.identity_id == identity_id),
                key=lambda cert: (cert.issued_at, cert.serial),
            )

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        with self._lock:
            return self._certificates.get(serial)

    def key_fingerprint_used(self, fingerprint: str) -> bool:
        with self._lock:
            return fingerprint in self._serial_by_key

    def revoked_certificates(self) -> list[CertificateRecord]:
        with self._lock:
            return sorted(
                (
                    cert
                    for cert in self._certificates.values()
                    if cert.status is CertificateStatus.REVOKED
                ),
                key=lambda cert: cert.serial,
            )

    def active_certificates(self) -> list[CertificateRecord]:
        with self._lock:
            return sorted(
                (
                    cert
                    for cert in self._certificates.values()
                    if cert.status is CertificateStatus.ACTIVE
                ),
                key=lambda cert: (cert.identity_id, cert.serial),
            )

    # idempotency

    def get_response(self, identity_id: str, request_id: str) -> StoredResponse | None:
        with self._lock:
            return self._responses.get((identity_id, request_id))

    def record_outcome(
        self,
        *,
        response: StoredResponse,
        identity: IdentityRecord | None = None,
        certificate: CertificateRecord | None = None,
        audit: Sequence[AuditEntry] = (),
        nonce: NonceRecord | None = None,
    ) -> None:
        response = in_utc(response)
        identity = None if identity is None else in_utc(identity)
        certificate = None if certificate is None else in_utc(certificate)
        if nonce is not None:
            check_nonce_value(nonce.value)
            nonce = in_utc(nonce)
        with self._lock:
            key = (response.identity_id, response.request_id)
            previous = self._responses.get(key)
            if previous is not None and previous.outcome != "pending":
                raise DuplicateError(
                    f"request {response.request_id!r} of {response.identity_id!r} already answered"
                )
            if nonce is not None and nonce.value in self._nonces:
                raise DuplicateError("nonce already issued")
            if identity is not None:
                self._check_identity(identity)
            if certificate is not None:
                self._check_certificate(certificate, identity)
            chained = self._chain(audit)

            if identity is not None:
                self._identities[identity.id] = identity
            if certificate is not None:
                for serial, other in list(self._certificates.items()):
                    if (
                        other.identity_id == certificate.identity_id
                        and other.status is CertificateStatus.ACTIVE
                    ):
                        self._certificates[serial] = dataclasses.replace(
                            other, status=CertificateStatus.SUPERSEDED
                        )
                self._certificates[certificate.serial] = certificate
                self._serial_by_key[certificate.public_key_fingerprint] = certificate.serial
            if nonce is not None:
                self._nonces[nonce.value] = nonce
            self._responses[key] = response
            self._audit.extend(chained)

    # retention

    def prune_responses(
        self, answered_before: datetime, pending_before: datetime, limit: int
    ) -> int:
        final = require_aware_time(answered_before, "answered_before")
        pending = require_aware_time(pending_before, "pending_before")
        check_limit(limit)
        with self._lock:
            doomed = sorted(
                (
                    (response.at, key)
                    for key, response in self._responses.items()
                    if response.at < (pending if response.outcome == "pending" else final)
                ),
                key=lambda item: item[0],
            )[:limit]
            for _, key in doomed:
                del self._responses[key]
            return len(doomed)

    def prune_nonces(self, expired_before: datetime, limit: int) -> int:
        cutoff = require_aware_time(expired_before, "expired_before")
        check_limit(limit)
        with self._lock:
            doomed = sorted(
                (nonce.expires_at, value)
                for value, nonce in self._nonces.items()
                if nonce.expires_at < cutoff
            )[:limit]
            for _, value in doomed:
                del self._nonces[value]
            return len(doomed)

    def change_state(
        self,
        identity_id: str,
        state: IdentityState,
        at: datetime,
        audit: Sequence[AuditEntry] = (),
        revocation_reason: str | None = None,
    ) -> IdentityRecord:
        wanted = IdentityState(state)
        at = require_aware_time(at, "at")
        with self._lock:
            identity = self._identities.get(identity_id)
            if identity is None:
                raise KeyError(identity_id)
            check_transition(identity.state, wanted)
            changed = dataclasses.replace(identity, state=wanted, updated_at=at)
            chained = self._chain(audit)

            self._identities[identity_id] = changed
            if wanted is IdentityState.REVOKED:
                for serial, cert in list(self._certificates.items()):
                    if (
                        cert.identity_id == identity_id
                        and cert.status is not CertificateStatus.REVOKED
                    ):
                        self._certificates[serial] = dataclasses.replace(
                            cert,
                            status=CertificateStatus.REVOKED,
                            revoked_at=at,
                            revocation_reason=revocation_reason,
                        )
            self._audit.extend(chained)
            return changed

    # audit trail

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        with self._lock:
            chained = self._chain(entries)
            self._audit.extend(chained)
            return [_detached_record(record) for record in chained]

    def audit_records(self, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        with self._lock:
            # Sequence numbers are dense from 1, so seq n sits at index n - 1.
            start = max(after_seq, 0)
            stop = None if limit is None else start + limit
            return [_detached_record(record) for record in self._audit[start:stop]]

    def audit_head(self) -> AuditRecord | None:
        with self._lock:
            return _detached_record(self._audit[-1]) if self._audit else None

    def put_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        checkpoint = in_utc(checkpoint)
        with self._lock:
            if checkpoint.seq in self._checkpoints:
                raise DuplicateError(f"checkpoint at {checkpoint.seq} already exists")
            self._checkpoints[checkpoint.seq] = checkpoint

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._lock:
            return [self._checkpoints[seq] for seq in sorted(self._checkpoints)]

    # refused connections

    def record_refusals(self, records: Sequence[RefusalRecord]) -> None:
        checked = check_refusals(records)
        with self._lock:
            merged: dict[str, RefusalRecord] = {}
            for record in checked:
                stored = merged.get(record.key, self._refusals.get(record.key))
                merged[record.key] = merge_refusals(stored, record)
            self._refusals.update(merged)

    def refusals(self, limit: int = 500, since: datetime | None = None) -> list[RefusalRecord]:
        check_limit(limit)
        if since is not None:
            since = require_aware_time(since, "since")
        with self._lock:
            chosen = [
                record
                for record in self._refusals.values()
                if since is None or record.last_seen >= since
            ]
        chosen.sort(key=lambda record: (record.last_seen, record.key), reverse=True)
        return chosen[:limit]

    # helpers; the caller holds the lock

    def _chain(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        prev = self._audit[-1] if self._audit else None
        return chain(prev, [_detached(entry) for entry in entries])

    def _by_birth(self, fingerprint: str) -> IdentityRecord | None:
        for identity in self._identities.values():
            if identity.birth_fingerprint == fingerprint:
                return identity
        return None

    def _check_identity(self, record: IdentityRecord) -> None:
        IdentityKind(record.kind)
        IdentityState(record.state)
        if record.birth_fingerprint is not None:
            holder = self._by_birth(record.birth_fingerprint)
            if holder is not None and holder.id != record.id:
                raise DuplicateError(f"birth certificate already belongs to {holder.id!r}")

    def _check_certificate(
        self, certificate: CertificateRecord, identity: IdentityRecord | None
    ) -> None:
        check_serial(certificate.serial)
        CertificateStatus(certificate.status)
        if certificate.serial in self._certificates:
            raise DuplicateError(f"serial {certificate.serial:x} already issued")
        if certificate.public_key_fingerprint in self._serial_by_key:
            raise DuplicateError("public key already certified")
        owner_given = identity is not None and identity.id == certificate.identity_id
        if not owner_given and certificate.identity_id not in self._identities:
            raise KeyError(certificate.identity_id)
