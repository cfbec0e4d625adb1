"""The persistence port: what the enrollment core, the CLI and the broker integration need from
the registry, and nothing more.

Two implementations satisfy it: ``gateway.store_memory.MemoryStore`` (tests, simulations) and
``gateway.registry.SqlStore`` (SQLModel on SQLite or PostgreSQL). Both pass the same contract
tests in ``tests/gateway/test_store_contract.py``.

Every method that changes more than one row does so in one transaction: a certificate row, the
identity it belongs to, the stored answer to the request and the audit events either all land
or none do. That is what lets the gateway publish a certificate only after its row is durable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from pki.profile import IdentityKind


class IdentityState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    QUARANTINED = "quarantined"
    REVOKED = "revoked"


class CertificateStatus(StrEnum):
    ACTIVE = "active"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


class NonceCheck(StrEnum):
    """Outcome of consuming a nonce; anything but OK is a rejection with that reason."""

    OK = "ok"
    UNKNOWN = "nonce_unknown"
    EXPIRED = "nonce_expired"
    REUSED = "nonce_reused"
    OTHER_DEVICE = "nonce_other_device"


class TokenCheck(StrEnum):
    OK = "ok"
    UNKNOWN = "token_unknown"
    EXPIRED = "token_expired"
    REUSED = "token_reused"
    OTHER_DEVICE = "token_other_device"


class StoreError(Exception):
    """The registry could not do what was asked (database down, disk full, read-only).

    Translated at the wire boundary into the ``unavailable`` reason code.
    """


class DuplicateError(StoreError):
    """A uniqueness rule was broken: serial, public key, nonce or request id already used."""


@dataclass(frozen=True)
class IdentityRecord:
    id: str
    kind: IdentityKind
    state: IdentityState
    created_at: datetime
    updated_at: datetime
    manufacturer: str | None = None
    model: str | None = None
    firmware_version: str | None = None
    firmware_digest: str | None = None
    birth_fingerprint: str | None = None  # sha256 hex of the birth certificate DER
    role: str | None = None  # operators: viewer | operator | admin
    last_seen_at: datetime | None = None
    reattest_required: bool = False


@dataclass(frozen=True)
class CertificateRecord:
    serial: int
    identity_id: str
    public_key_fingerprint: str  # sha256 hex of SubjectPublicKeyInfo DER; unique for ever
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    pem: str
    status: CertificateStatus = CertificateStatus.ACTIVE
    request_id: str | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class NonceRecord:
    value: bytes
    device_id: str
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None = None


@dataclass(frozen=True)
class TokenRecord:
    token_hash: str  # sha256 hex of the token; the token itself is never stored
    device_id: str
    created_at: datetime
    expires_at: datetime
    created_by: str
    used_at: datetime | None = None


@dataclass(frozen=True)
class StoredResponse:
    """The answer given to one request, kept so a retried request gets the same answer."""

    identity_id: str
    request_id: str
    kind: str  # message type of the request: hello, enroll, renew
    outcome: str  # challenge | issued | pending | rejected
    payload: bytes  # the exact bytes published
    at: datetime
    # sha256 hex of the request bytes: a reused id with other content is refused
    request_digest: str
    reason: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """An audit event before it is chained; the store assigns sequence number and hashes."""

    actor: str  # identity that acted: "device:<id>", "operator:<name>", "gateway", "cli:<user>"
    # enroll, renew, approve, quarantine, release, revoke, reject, token_create...
    action: str
    subject: str  # identity acted upon
    outcome: str  # ok | rejected | pending
    at: datetime
    reasons: tuple[str, ...] = ()
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    entry: AuditEntry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditCheckpoint:
    """A signature by the gateway's audit key over the chain head at ``seq``."""

    seq: int
    hash: str
    at: datetime
    signature: bytes
    key_id: str  # sha256 hex of the signing public key


class Store(Protocol):
    # identities
    def get_identity(self, identity_id: str) -> IdentityRecord | None: ...
    def find_by_birth_fingerprint(self, fingerprint: str) -> IdentityRecord | None: ...
    def list_identities(
        self, kind: IdentityKind | None = None, state: IdentityState | None = None
    ) -> list[IdentityRecord]: ...
    def put_identity(self, record: IdentityRecord, audit: Sequence[AuditEntry] = ()) -> None:
        """Insert or replace one identity (keyed by id), with its audit events, atomically."""
        ...

    def touch(self, identity_id: str, seen_at: datetime) -> None:
        """Update last_seen_at only; no audit (it is not a decision)."""
        ...

    # nonces: single use, bound to a device, short-lived
    def put_nonce(self, nonce: NonceRecord) -> None: ...
    def consume_nonce(self, value: bytes, device_id: str, now: datetime) -> NonceCheck:
        """Atomically mark the nonce used; a second consume of the same nonce is REUSED."""
        ...

    # one-time bootstrap tokens
    def put_token(self, token: TokenRecord, audit: Sequence[AuditEntry] = ()) -> None: ...
    def consume_token(self, token_hash: str, device_id: str, now: datetime) -> TokenCheck: ...

    # certificates
    def certificates_for(self, identity_id: str) -> list[CertificateRecord]: ...
    def get_certificate(self, serial: int) -> CertificateRecord | None: ...
    def key_fingerprint_used(self, fingerprint: str) -> bool: ...
    def revoked_certificates(self) -> list[CertificateRecord]: ...

    # idempotency
    def get_response(self, identity_id: str, request_id: str) -> StoredResponse | None: ...

    def record_outcome(
        self,
        *,
        response: StoredResponse,
        identity: IdentityRecord | None = None,
        certificate: CertificateRecord | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        """One transaction: upsert the identity, mark that identity's other ACTIVE certificates
        SUPERSEDED and add ``certificate`` (if given), store the response, append the audit
        events. Raises DuplicateError (nothing written) if the serial or the key fingerprint is
        already taken, or (identity_id, request_id) already holds a response whose outcome is not
        ``pending`` (a pending answer is replaced when the approved request is retried)."""
        ...

    def change_state(
        self,
        identity_id: str,
        state: IdentityState,
        at: datetime,
        audit: Sequence[AuditEntry] = (),
        revocation_reason: str | None = None,
    ) -> IdentityRecord:
        """Set an identity's state with its audit events. Moving to REVOKED also marks all its
        certificates REVOKED (revoked_at=at). Raises KeyError for an unknown identity and
        ValueError for a transition ``gateway.lifecycle.check_transition`` forbids."""
        ...

    # audit trail (append-only, hash-chained; see gateway.audit)
    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]: ...
    def audit_records(self, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]: ...
    def put_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...
    def checkpoints(self) -> list[AuditCheckpoint]: ...
