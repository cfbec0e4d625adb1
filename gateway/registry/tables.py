"""The registry's tables, declared with SQLModel.

The models only declare the schema (and feed Alembic's comparison); ``SqlStore`` queries them
through SQLAlchemy Core statements and converts rows into the frozen records of
``gateway.store``, so no ORM object ever leaves a method.

Enrollment attempts have no table of their own: every answered request is a ``stored_response``
row (who, which request, what kind, outcome, reason, when, the request digest and the exact bytes
sent), which is the attempt log and the idempotency cache at once.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import registry
from sqlmodel import Field, SQLModel

from gateway.registry.types import UtcDateTime

__all__ = [
    "METADATA",
    "ONE_ACTIVE_CERTIFICATE",
    "AuditCheckpointRow",
    "AuditEventRow",
    "BootstrapTokenRow",
    "CertificateRow",
    "ConnectionRefusalRow",
    "IdentityRow",
    "NonceRow",
    "RegistryModel",
    "StoredResponseRow",
    "table_of",
]

# Named constraints: PostgreSQL and SQLite batch migrations can only alter what has a name.
METADATA = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class RegistryModel(SQLModel, registry=registry(metadata=METADATA)):
    """Base of the registry's tables, on its own metadata so other SQLModel tables in the same
    process never leak into the registry's migrations."""


class IdentityRow(RegistryModel, table=True):
    __tablename__ = "identity"
    __table_args__ = (
        UniqueConstraint("birth_fingerprint"),
        Index(None, "kind", "state"),
    )

    id: str = Field(sa_type=String(64), primary_key=True)
    kind: str = Field(sa_type=String(16))
    state: str = Field(sa_type=String(16))
    created_at: datetime = Field(sa_type=UtcDateTime)
    updated_at: datetime = Field(sa_type=UtcDateTime)
    manufacturer: str | None = Field(default=None, sa_type=String(255))
    model: str | None = Field(default=None, sa_type=String(255))
    firmware_version: str | None = Field(default=None, sa_type=String(255))
    firmware_digest: str | None = Field(default=None, sa_type=String(64))
    birth_fingerprint: str | None = Field(default=None, sa_type=String(64))
    role: str | None = Field(default=None, sa_type=String(16))
    last_seen_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    reattest_required: bool = Field(default=False, sa_type=Boolean)


ONE_ACTIVE_CERTIFICATE = "uq_certificate_identity_id_active"
"""The partial unique index that allows one 'active' certificate per identity."""

_ACTIVE_ONLY = text("status = 'active'")


class CertificateRow(RegistryModel, table=True):
    __tablename__ = "certificate"
    __table_args__ = (
        UniqueConstraint("public_key_fingerprint"),
        ForeignKeyConstraint(["identity_id"], ["identity.id"]),
        Index(None, "identity_id"),
        Index(None, "status"),
        # A new certificate supersedes the active one in the same transaction; the database
        # itself refuses a second active one, whatever process or gateway writes it.
        Index(
            ONE_ACTIVE_CERTIFICATE,
            "identity_id",
            unique=True,
            sqlite_where=_ACTIVE_ONLY,
            postgresql_where=_ACTIVE_ONLY,
        ),
    )

    # Serial numbers are up to 160 bits: stored as 40 zero-padded lower-case hex digits, which
    # no integer column holds and which still sort in numeric order.
    serial: str = Field(sa_type=String(40), primary_key=True)
    identity_id: str = Field(sa_type=String(64))
    public_key_fingerprint: str = Field(sa_type=String(64))
    not_before: datetime = Field(sa_type=UtcDateTime)
    not_after: datetime = Field(sa_type=UtcDateTime)
    issued_at: datetime = Field(sa_type=UtcDateTime)
    pem: str = Field(sa_type=Text)
    status: str = Field(sa_type=String(16))
    request_id: str | None = Field(default=None, sa_type=String(128))
    revoked_at: datetime | None = Field(default=None, sa_type=UtcDateTime)
    revocation_reason: str | None = Field(default=None, sa_type=String(255))


class StoredResponseRow(RegistryModel, table=True):
    __tablename__ = "stored_response"
    # The retention sweep deletes the oldest answers first (``SqlStore.prune_responses``).
    __table_args__ = (Index(None, "at"),)

    # No foreign key to identity: a refused hello from an unknown device is answered (and
    # remembered) too.
    identity_id: str = Field(sa_type=String(64), primary_key=True)
    request_id: str = Field(sa_type=String(128), primary_key=True)
    kind: str = Field(sa_type=String(32))
    outcome: str = Field(sa_type=String(16))
    payload: bytes = Field(sa_type=LargeBinary)
    at: datetime = Field(sa_type=UtcDateTime)
    request_digest: str = Field(sa_type=String(64))
    reason: str | None = Field(default=None, sa_type=String(128))


class NonceRow(RegistryModel, table=True):
    __tablename__ = "nonce"
    __table_args__ = (Index(None, "expires_at"),)

    value: str = Field(sa_type=String(128), primary_key=True)  # hex of the nonce bytes
    device_id: str = Field(sa_type=String(64))
    issued_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class BootstrapTokenRow(RegistryModel, table=True):
    __tablename__ = "bootstrap_token"

    token_hash: str = Field(sa_type=String(64), primary_key=True)
    device_id: str = Field(sa_type=String(64))
    created_at: datetime = Field(sa_type=UtcDateTime)
    expires_at: datetime = Field(sa_type=UtcDateTime)
    created_by: str = Field(sa_type=String(255))
    used_at: datetime | None = Field(default=None, sa_type=UtcDateTime)


class AuditEventRow(RegistryModel, table=True):
    __tablename__ = "audit_event"
    __table_args__ = (Index(None, "subject"),)

    # Sequence numbers come from the hash chain, never from the database.
    seq: int = Field(sa_type=Integer, primary_key=True, sa_column_kwargs={"autoincrement": False})
    prev_hash: str = Field(sa_type=String(64))
    hash: str = Field(sa_type=String(64))
    actor: str = Field(sa_type=String(255))
    action: str = Field(sa_type=String(64))
    subject: str = Field(sa_type=String(255))
    outcome: str = Field(sa_type=String(16))
    at: datetime = Field(sa_type=UtcDateTime)
    reasons: str = Field(sa_type=Text)  # JSON list of strings
    detail: str = Field(sa_type=Text)  # JSON object of strings


class AuditCheckpointRow(RegistryModel, table=True):
    __tablename__ = "audit_checkpoint"

    seq: int = Field(sa_type=Integer, primary_key=True, sa_column_kwargs={"autoincrement": False})
    hash: str = Field(sa_type=String(64))
    at: datetime = Field(sa_type=UtcDateTime)
    signature: bytes = Field(sa_type=LargeBinary)
    key_id: str = Field(sa_type=String(64))


class ConnectionRefusalRow(RegistryModel, table=True):
    """Connections the broker refused, one row per aggregation key (see
    ``gateway.store.refusal_key``): a flood from one source is one row with a growing count."""

    __tablename__ = "connection_refusal"
    # Serves "newest first" (ORDER BY last_seen DESC, key DESC LIMIT n) and "since" without a
    # sort of the whole table.
    __table_args__ = (Index(None, "last_seen", "key"),)

    key: str = Field(sa_type=String(64), primary_key=True)
    listener: str = Field(sa_type=String(64))
    reason: str = Field(sa_type=String(64))
    # Chosen by the refused client: unbounded text, so no value can fail a batch on length.
    client_id: str | None = Field(default=None, sa_type=Text)
    cert_subject: str | None = Field(default=None, sa_type=Text)
    cert_issuer: str | None = Field(default=None, sa_type=Text)
    cert_fingerprint: str | None = Field(default=None, sa_type=String(64))
    remote: str = Field(sa_type=String(255))
    first_seen: datetime = Field(sa_type=UtcDateTime)
    last_seen: datetime = Field(sa_type=UtcDateTime)
    count: int = Field(sa_type=BigInteger)


def table_of(model: type[RegistryModel]) -> Table:
    """The Core table behind a model (what the store's statements are written against)."""
    table = model.__table__  # type: ignore[attr-defined]
    assert isinstance(table, Table)
    return table
