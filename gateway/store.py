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

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from pki.clock import require_aware
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


MAX_REFUSAL_COUNT = 2**63 - 1
"""The largest count a refusal row holds (a signed 64-bit column)."""

# Column widths of the refusal table for the values the gateway itself chooses. The values a
# refused client chooses (client id, certificate subject and issuer) go into unbounded text
# columns instead: a length limit there would let one crafted client id make PostgreSQL refuse
# the whole batch it arrives in.
_REFUSAL_WIDTHS = {
    "key": 64,
    "listener": 64,
    "reason": 64,
    "remote": 255,
}
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


# Opens the source_host slot. 0xff never occurs in UTF-8, so no key without a source host (all
# UTF-8, its client id free text) can spell one with: a client cannot pick a client id that
# files its refusals under another host's row.
_SOURCE_HOST_SLOT = b"|\xffhost="


def refusal_key(
    listener: str,
    reason: str,
    cert_fingerprint: str | None,
    client_id: str | None,
    source_host: str | None = None,
) -> str:
    """The aggregation key of a refused connection: sha256 hex of the fields joined with ``|``
    (``None`` as the empty string).

    Every caller uses this so that one device retrying all day is one row. ``listener``,
    ``reason``, ``cert_fingerprint`` and ``source_host`` may not contain ``|`` (ValueError),
    which keeps the joined text unambiguous; ``client_id`` comes last and may contain anything.
    ``source_host`` keeps apart clients that nothing else tells apart (no certificate and no
    client id seen): without it every such client would share one row. Given, it goes before
    the client id behind a marker no text can hold (``_SOURCE_HOST_SLOT``); not given, the key
    is what it always was, so rows aggregated before keep growing.
    """
    fields = (
        ("listener", listener),
        ("reason", reason),
        ("cert_fingerprint", cert_fingerprint),
        ("source_host", source_host),
        ("client_id", client_id),
    )
    parts: dict[str, str] = {}
    for name, value in fields:
        optional = name in ("cert_fingerprint", "client_id", "source_host")
        if value is None and optional:
            parts[name] = ""
            continue
        if not isinstance(value, str):
            allowed = "a str or None" if optional else "a str"
            raise TypeError(f"{name} must be {allowed}, not {type(value).__name__}")
        if name != "client_id" and "|" in value:
            raise ValueError(f"{name} must not contain '|'")
        parts[name] = value
    head = "|".join((parts["listener"], parts["reason"], parts["cert_fingerprint"]))
    text = head.encode("utf-8")
    if source_host is not None:
        text += _SOURCE_HOST_SLOT + parts["source_host"].encode("utf-8")
    text += b"|" + parts["client_id"].encode("utf-8")
    return hashlib.sha256(text).hexdigest()


@dataclass(frozen=True)
class RefusalRecord:
    """Connections the broker refused, aggregated under ``key``: who tried, from where, with a
    certificate from which CA, how often, first and last time.

    ``count`` attempts were seen between ``first_seen`` and ``last_seen``; ``remote`` and the
    identifying fields describe the latest one. Raises TypeError for a wrong type and ValueError
    for an empty required or over-long field, text with NUL or unpaired surrogates, a
    fingerprint that is not sha256 hex, a naive time, ``last_seen`` before ``first_seen`` or a
    count below 1.
    """

    key: str  # aggregation key chosen by the caller, normally ``refusal_key(...)``
    listener: str
    reason: str
    client_id: str | None
    cert_subject: str | None
    cert_issuer: str | None
    cert_fingerprint: str | None  # sha256 hex of the certificate DER
    remote: str  # last seen "host:port"
    first_seen: datetime
    last_seen: datetime
    count: int = 1

    def __post_init__(self) -> None:
        for name in ("key", "listener", "reason", "remote"):
            _check_refusal_text(name, getattr(self, name), required=True)
        for name in ("client_id", "cert_subject", "cert_issuer", "cert_fingerprint"):
            _check_refusal_text(name, getattr(self, name), required=False)
        fingerprint = self.cert_fingerprint
        if fingerprint is not None and _FINGERPRINT.fullmatch(fingerprint) is None:
            raise ValueError("cert_fingerprint must be 64 lower-case hex digits")
        first = require_aware(self.first_seen, "first_seen")
        last = require_aware(self.last_seen, "last_seen")
        if last < first:
            raise ValueError("last_seen must not be before first_seen")
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise TypeError(f"count must be an int, not {type(self.count).__name__}")
        if not 1 <= self.count <= MAX_REFUSAL_COUNT:
            raise ValueError(f"count must be between 1 and {MAX_REFUSAL_COUNT}")


def _check_refusal_text(name: str, value: object, *, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str):
        allowed = "a str" if required else "a str or None"
        raise TypeError(f"{name} must be {allowed}, not {type(value).__name__}")
    if required and not value:
        raise ValueError(f"{name} must not be empty")
    width = _REFUSAL_WIDTHS.get(name)
    if width is not None and len(value) > width:
        raise ValueError(f"{name} must be at most {width} characters")
    # PostgreSQL text holds neither NUL nor unpaired surrogates; refusing them here keeps one
    # crafted client id from failing the whole batch at the database.
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} must be valid Unicode text ({error.reason})") from error


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

    def touch_many(self, seen: Mapping[str, datetime]) -> int:
        """``touch`` for many identities in one transaction (the gateway batches connects);
        identities the registry does not hold are skipped. Returns how many were updated."""
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
    def active_certificates(self) -> list[CertificateRecord]:
        """Every ACTIVE certificate (at most one per identity), in one query: the admin API's
        fleet listing reads them all at once rather than once per identity."""
        ...

    # idempotency
    def get_response(self, identity_id: str, request_id: str) -> StoredResponse | None: ...

    def record_outcome(
        self,
        *,
        response: StoredResponse,
        identity: IdentityRecord | None = None,
        certificate: CertificateRecord | None = None,
        audit: Sequence[AuditEntry] = (),
        nonce: NonceRecord | None = None,
    ) -> None:
        """One transaction: store ``nonce`` (a challenge's: it exists exactly when its stored
        answer does), upsert the identity, mark that identity's other ACTIVE certificates
        SUPERSEDED and add ``certificate`` (if given), store the response, append the audit
        events. Raises DuplicateError (nothing written) if the nonce, the serial or the key
        fingerprint is already taken, or (identity_id, request_id) already holds a response
        whose outcome is not ``pending`` (a pending answer is replaced when the approved
        request is retried)."""
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
    def audit_head(self) -> AuditRecord | None:
        """The newest audit record (``None`` while the trail is empty), in one indexed query.

        Every state change appends audit events in its own transaction, so a head that moved is
        a cheap "something changed" signal; the gateway polls it several times a second."""
        ...

    def put_checkpoint(self, checkpoint: AuditCheckpoint) -> None: ...
    def checkpoints(self) -> list[AuditCheckpoint]: ...

    # retention: what the protocol no longer needs goes (``gateway.retention`` sweeps)
    def prune_responses(
        self, answered_before: datetime, pending_before: datetime, limit: int
    ) -> int:
        """Delete at most ``limit`` stored answers, oldest first, in one short transaction:
        those given before ``answered_before``, except ``pending`` ones (a device still waiting
        for an operator), which go only once given before ``pending_before``. Returns how many
        were deleted. TypeError or ValueError for a naive time or a bad limit."""
        ...

    def prune_nonces(self, expired_before: datetime, limit: int) -> int:
        """Delete at most ``limit`` nonces, used or not, that expired before ``expired_before``,
        the longest expired first, in one short transaction; returns how many. A deleted nonce
        is refused as ``nonce_unknown``, so deleting one never makes it usable again."""
        ...

    # refused connections, for the "unknown identities" view
    def record_refusals(self, records: Sequence[RefusalRecord]) -> None:
        """Add a batch of refusals in one transaction, aggregated by key. For a key already
        stored: count grows by ``record.count``, first_seen becomes the earlier and last_seen
        the later of the two, and the identifying fields and remote follow the newer sighting.
        Records repeating a key within the batch are merged the same way. A batch with one bad
        record (TypeError, ValueError) writes nothing. No audit event: a refusal decides nothing
        about a registered identity, and a flood must neither grow the hash chain nor move
        ``audit_head``."""
        ...

    def refusals(self, limit: int = 500, since: datetime | None = None) -> list[RefusalRecord]:
        """At most ``limit`` aggregated refusals, newest ``last_seen`` first (ties: key
        descending); with ``since``, only those last seen at or after it. ValueError for a
        negative limit or a naive ``since``."""
        ...
