"""The statements behind the store's per-request calls and every audited write, as Core
constructs with named ``bindparam``s, compiled once per store by ``Statements.compile``.

Reads and writes that take optional filters (listings, the audit pages, refusals) are built per
call in ``sql_store`` instead: they are not on the request path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqlalchemy import BigInteger, Dialect, Table, bindparam, func, insert, select, update
from sqlalchemy.sql import ClauseElement

from gateway.registry.prepared import Prepared, prepare
from gateway.registry.tables import (
    AuditEventRow,
    BootstrapTokenRow,
    CertificateRow,
    IdentityRow,
    NonceRow,
    StoredResponseRow,
    table_of,
)
from gateway.store import CertificateStatus

__all__ = ["AUDIT_APPEND_LOCK", "Statements"]

IDENTITY = table_of(IdentityRow)
CERTIFICATE = table_of(CertificateRow)
RESPONSE = table_of(StoredResponseRow)
NONCE = table_of(NonceRow)
TOKEN = table_of(BootstrapTokenRow)
AUDIT = table_of(AuditEventRow)

AUDIT_APPEND_LOCK = int.from_bytes(b"fg-audit")
"""PostgreSQL advisory lock held by each audit appender until its transaction ends."""

_ACTIVE = CertificateStatus.ACTIVE.value
_AUDIT_LOCK_KEY = bindparam("lock", AUDIT_APPEND_LOCK, type_=BigInteger)


def _insert(table: Table) -> ClauseElement:
    """INSERT of every column, each a parameter named after it."""
    return insert(table).values(
        {column.key: bindparam(column.key, type_=column.type) for column in table.c}
    )


def _set(table: Table, *names: str) -> dict[str, object]:
    return {name: bindparam(name, type_=table.c[name].type) for name in names}


_IDENTITY_FIELDS = tuple(column.key for column in IDENTITY.c if column.key != "id")

# Named by what they do; the keyword arguments a call passes are the bindparam names.
_CORE: dict[str, ClauseElement] = {
    # identities
    "identity": select(IDENTITY).where(IDENTITY.c.id == bindparam("id")),
    "identity_by_birth": select(IDENTITY).where(
        IDENTITY.c.birth_fingerprint == bindparam("fingerprint")
    ),
    # Row lock on PostgreSQL (SQLite's BEGIN IMMEDIATE already serialises writers): whoever
    # changes an identity's state or certificates next waits for this transaction.
    "identity_for_update": select(IDENTITY)
    .where(IDENTITY.c.id == bindparam("id"))
    .with_for_update(),
    "identity_insert": _insert(IDENTITY),
    "identity_update": update(IDENTITY)
    .where(IDENTITY.c.id == bindparam("id"))
    .values(_set(IDENTITY, *_IDENTITY_FIELDS)),
    "identity_state": update(IDENTITY)
    .where(IDENTITY.c.id == bindparam("id"))
    .values(_set(IDENTITY, "state", "updated_at")),
    "identity_touch": update(IDENTITY)
    .where(IDENTITY.c.id == bindparam("id"))
    .values(_set(IDENTITY, "last_seen_at")),
    # nonces and tokens: the conditional update is the atomic test-and-set, of two concurrent
    # consumers exactly one sees a row change
    "nonce_insert": _insert(NONCE),
    "nonce": select(NONCE).where(NONCE.c.value == bindparam("value")),
    "nonce_consume": update(NONCE)
    .where(
        NONCE.c.value == bindparam("value"),
        NONCE.c.device_id == bindparam("device_id"),
        NONCE.c.used_at.is_(None),
        NONCE.c.expires_at > bindparam("now", type_=NONCE.c.expires_at.type),
    )
    .values(_set(NONCE, "used_at")),
    "token_insert": _insert(TOKEN),
    "token": select(TOKEN).where(TOKEN.c.token_hash == bindparam("token_hash")),
    "token_consume": update(TOKEN)
    .where(
        TOKEN.c.token_hash == bindparam("token_hash"),
        TOKEN.c.device_id == bindparam("device_id"),
        TOKEN.c.used_at.is_(None),
        TOKEN.c.expires_at > bindparam("now", type_=TOKEN.c.expires_at.type),
    )
    .values(_set(TOKEN, "used_at")),
    # certificates
    "key_used": select(CERTIFICATE.c.serial)
    .where(CERTIFICATE.c.public_key_fingerprint == bindparam("fingerprint"))
    .limit(1),
    "certificate_insert": _insert(CERTIFICATE),
    # Runs before the insert of the new certificate, in the same transaction: the partial
    # unique index (one 'active' row per identity) never sees two.
    "certificates_supersede": update(CERTIFICATE)
    .where(CERTIFICATE.c.identity_id == bindparam("identity_id"), CERTIFICATE.c.status == _ACTIVE)
    .values(status=CertificateStatus.SUPERSEDED.value),
    "certificates_revoke": update(CERTIFICATE)
    .where(
        CERTIFICATE.c.identity_id == bindparam("identity_id"),
        CERTIFICATE.c.status != CertificateStatus.REVOKED.value,
    )
    .values(_set(CERTIFICATE, "status", "revoked_at", "revocation_reason")),
    # stored responses
    "response": select(RESPONSE).where(
        RESPONSE.c.identity_id == bindparam("identity_id"),
        RESPONSE.c.request_id == bindparam("request_id"),
    ),
    "response_outcome": select(RESPONSE.c.outcome).where(
        RESPONSE.c.identity_id == bindparam("identity_id"),
        RESPONSE.c.request_id == bindparam("request_id"),
    ),
    "response_insert": _insert(RESPONSE),
    "response_replace": update(RESPONSE)
    .where(
        RESPONSE.c.identity_id == bindparam("identity_id"),
        RESPONSE.c.request_id == bindparam("request_id"),
    )
    .values(_set(RESPONSE, "kind", "outcome", "payload", "at", "request_digest", "reason")),
    # audit trail; the primary key index read backwards: one row, whatever the trail's length
    "audit_head": select(AUDIT).order_by(AUDIT.c.seq.desc()).limit(1),
    "audit_insert": _insert(AUDIT),
    "audit_lock": select(func.pg_advisory_xact_lock(_AUDIT_LOCK_KEY).label("locked")),
}


@dataclass(frozen=True)
class Statements:
    """Every statement of ``_CORE``, compiled for one dialect."""

    identity: Prepared
    identity_by_birth: Prepared
    identity_for_update: Prepared
    identity_insert: Prepared
    identity_update: Prepared
    identity_state: Prepared
    identity_touch: Prepared
    nonce_insert: Prepared
    nonce: Prepared
    nonce_consume: Prepared
    token_insert: Prepared
    token: Prepared
    token_consume: Prepared
    key_used: Prepared
    certificate_insert: Prepared
    certificates_supersede: Prepared
    certificates_revoke: Prepared
    response: Prepared
    response_outcome: Prepared
    response_insert: Prepared
    response_replace: Prepared
    audit_head: Prepared
    audit_insert: Prepared
    audit_lock: Prepared  # PostgreSQL only

    @classmethod
    def compile(cls, dialect: Dialect) -> Statements:
        names = [field.name for field in dataclasses.fields(cls)]
        return cls(**{name: prepare(_CORE[name], dialect) for name in names})

    @staticmethod
    def core() -> dict[str, ClauseElement]:
        """The Core statements, by name (what ``compile`` compiles)."""
        return dict(_CORE)
