"""``SqlStore``: the ``gateway.store.Store`` port over SQLModel/SQLAlchemy, SQLite or PostgreSQL.

Each method is one short-lived session and one transaction: nothing is cached between calls, so
after a failure (disk full, database locked or read-only) the next call starts clean and works
as soon as the condition clears. Uniqueness is enforced by constraints, not by locks in this
process, so several gateways sharing a PostgreSQL database obey the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, cast

from alembic.util import CommandError
from sqlalchemy import CursorResult, Engine, Result, case, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from gateway.audit import chain
from gateway.lifecycle import check_transition
from gateway.registry import convert
from gateway.registry.engine import DEFAULT_BUSY_TIMEOUT_MS, create_registry_engine, writer
from gateway.registry.errors import translated
from gateway.registry.migrate import upgrade
from gateway.registry.tables import (
    AuditCheckpointRow,
    AuditEventRow,
    BootstrapTokenRow,
    CertificateRow,
    ConnectionRefusalRow,
    IdentityRow,
    NonceRow,
    StoredResponseRow,
    table_of,
)
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
    StoreError,
    TokenCheck,
    TokenRecord,
)
from gateway.store_memory import check_limit, check_refusals, merge_refusals
from pki.profile import IdentityKind

__all__ = ["SqlStore", "refusal_upsert"]

IDENTITY = table_of(IdentityRow)
CERTIFICATE = table_of(CertificateRow)
RESPONSE = table_of(StoredResponseRow)
NONCE = table_of(NonceRow)
TOKEN = table_of(BootstrapTokenRow)
AUDIT = table_of(AuditEventRow)
CHECKPOINT = table_of(AuditCheckpointRow)
REFUSAL = table_of(ConnectionRefusalRow)

_AUDIT_APPEND_LOCK = int.from_bytes(b"fg-audit")
"""PostgreSQL advisory lock held by each audit appender until its transaction ends."""

# Describe the newest sighting of a key; the rest of a refusal row is the aggregate.
_LATEST_SIGHTING = (
    "listener",
    "reason",
    "client_id",
    "cert_subject",
    "cert_issuer",
    "cert_fingerprint",
    "remote",
    "last_seen",
)


def refusal_upsert(dialect: str) -> sqlite.Insert | postgresql.Insert:
    """INSERT ... ON CONFLICT (key) DO UPDATE for refusal rows, the same fold as
    ``gateway.store_memory.merge_refusals`` done by the database.

    One atomic statement per row: two gateways sharing a PostgreSQL database that both see a new
    key for the first time add up instead of one failing on the primary key, which UPDATE then
    INSERT would do. SQLite (3.24+) and PostgreSQL spell it the same way.
    """
    if dialect == "sqlite":
        statement: sqlite.Insert | postgresql.Insert = sqlite.insert(REFUSAL)
    elif dialect == "postgresql":
        statement = postgresql.insert(REFUSAL)
    else:
        raise StoreError(f"recording refusals needs SQLite or PostgreSQL, not {dialect}")
    new = statement.excluded
    stored = REFUSAL.c
    # In SET every right-hand side sees the row as it was, so "newer" is judged against the
    # stored last_seen even though last_seen itself is assigned in the same statement.
    newer = new["last_seen"] >= stored["last_seen"]
    changes: dict[str, Any] = {
        name: case((newer, new[name]), else_=stored[name]) for name in _LATEST_SIGHTING
    }
    changes["first_seen"] = case(
        (new["first_seen"] < stored["first_seen"], new["first_seen"]), else_=stored["first_seen"]
    )
    changes["count"] = stored["count"] + new["count"]
    return statement.on_conflict_do_update(index_elements=[stored["key"]], set_=changes)


def _rowcount(result: Result[Any]) -> int:
    return cast(CursorResult[Any], result).rowcount


class SqlStore:
    """The registry in a SQL database; the schema is brought to the newest revision on open."""

    def __init__(self, url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        with translated("opening the registry"):
            self._engine = create_registry_engine(url, busy_timeout_ms=busy_timeout_ms)
            self._writer = writer(self._engine)
            try:
                upgrade(self._engine)
            except CommandError as error:
                self._engine.dispose()
                # Typically a database already migrated by a newer gateway.
                raise StoreError(f"cannot bring the registry schema up to date: {error}") from error
            except BaseException:
                self._engine.dispose()
                raise

    @classmethod
    def open(cls, url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> SqlStore:
        return cls(url, busy_timeout_ms=busy_timeout_ms)

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        """Close every pooled connection (the store can still be used; it reconnects)."""
        self._engine.dispose()

    def __enter__(self) -> SqlStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self, action: str) -> Iterator[Session]:
        with translated(action), Session(self._engine) as session:
            yield session

    @contextmanager
    def _write(self, action: str) -> Iterator[Session]:
        with translated(action), Session(self._writer) as session, session.begin():
            yield session

    # identities

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        with self._read("reading an identity") as session:
            row = session.execute(
                select(IDENTITY).where(IDENTITY.c.id == identity_id)
            ).mappings().first()
            return None if row is None else convert.identity_from_row(row)

    def find_by_birth_fingerprint(self, fingerprint: str) -> IdentityRecord | None:
        with self._read("finding an identity by birth certificate") as session:
            row = session.execute(
                select(IDENTITY).where(IDENTITY.c.birth_fingerprint == fingerprint)
            ).mappings().first()
            return None if row is None else convert.identity_from_row(row)

    def list_identities(
        self, kind: IdentityKind | None = None, state: IdentityState | None = None
    ) -> list[IdentityRecord]:
        query = select(IDENTITY).order_by(IDENTITY.c.id)
        if kind is not None:
            query = query.where(IDENTITY.c.kind == IdentityKind(kind).value)
        if state is not None:
            query = query.where(IDENTITY.c.state == IdentityState(state).value)
        with self._read("listing identities") as session:
            return [convert.identity_from_row(row) for row in session.execute(query).mappings()]

    def put_identity(self, record: IdentityRecord, audit: Sequence[AuditEntry] = ()) -> None:
        values = convert.identity_values(record)
        with self._write("storing an identity") as session:
            self._upsert_identity(session, values)
            self._append(session, audit)

    def touch(self, identity_id: str, seen_at: datetime) -> None:
        convert.require_aware_time(seen_at)
        with self._write("recording when an identity was seen") as session:
            result = session.execute(
                update(IDENTITY).where(IDENTITY.c.id == identity_id).values(last_seen_at=seen_at)
            )
            if _rowcount(result) == 0:
                raise KeyError(identity_id)

    # nonces

    def put_nonce(self, nonce: NonceRecord) -> None:
        values = convert.nonce_values(nonce)
        with self._write("storing a nonce") as session:
            session.execute(insert(NONCE).values(**values))

    def consume_nonce(self, value: bytes, device_id: str, now: datetime) -> NonceCheck:
        key = convert.nonce_key(value)
        convert.require_aware_time(now)
        with self._write("consuming a nonce") as session:
            # The conditional update is the atomic test-and-set: of two concurrent consumers
            # exactly one sees a row change.
            result = session.execute(
                update(NONCE)
                .where(
                    NONCE.c.value == key,
                    NONCE.c.device_id == device_id,
                    NONCE.c.used_at.is_(None),
                    NONCE.c.expires_at > now,
                )
                .values(used_at=now)
            )
            if _rowcount(result) == 1:
                return NonceCheck.OK
            row = session.execute(select(NONCE).where(NONCE.c.value == key)).mappings().first()
            if row is None:
                return NonceCheck.UNKNOWN
            if row["device_id"] != device_id:
                return NonceCheck.OTHER_DEVICE
            if row["used_at"] is not None:
                return NonceCheck.REUSED
            return NonceCheck.EXPIRED

    # bootstrap tokens

    def put_token(self, token: TokenRecord, audit: Sequence[AuditEntry] = ()) -> None:
        values = convert.token_values(token)
        with self._write("storing a bootstrap token") as session:
            session.execute(insert(TOKEN).values(**values))
            self._append(session, audit)

    def consume_token(self, token_hash: str, device_id: str, now: datetime) -> TokenCheck:
        convert.require_aware_time(now)
        with self._write("consuming a bootstrap token") as session:
            result = session.execute(
                update(TOKEN)
                .where(
                    TOKEN.c.token_hash == token_hash,
                    TOKEN.c.device_id == device_id,
                    TOKEN.c.used_at.is_(None),
                    TOKEN.c.expires_at > now,
                )
                .values(used_at=now)
            )
            if _rowcount(result) == 1:
                return TokenCheck.OK
            row = session.execute(
                select(TOKEN).where(TOKEN.c.token_hash == token_hash)
            ).mappings().first()
            if row is None:
                return TokenCheck.UNKNOWN
            if row["device_id"] != device_id:
                return TokenCheck.OTHER_DEVICE
            if row["used_at"] is not None:
                return TokenCheck.REUSED
            return TokenCheck.EXPIRED

    # certificates

    def certificates_for(self, identity_id: str) -> list[CertificateRecord]:
        query = (
            select(CERTIFICATE)
            .where(CERTIFICATE.c.identity_id == identity_id)
            .order_by(CERTIFICATE.c.issued_at, CERTIFICATE.c.serial)
        )
        with self._read("listing certificates") as session:
            return [convert.certificate_from_row(row) for row in session.execute(query).mappings()]

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        key = convert.serial_key(serial)
        with self._read("reading a certificate") as session:
            row = session.execute(
                select(CERTIFICATE).where(CERTIFICATE.c.serial == key)
            ).mappings().first()
            return None if row is None else convert.certificate_from_row(row)

    def key_fingerprint_used(self, fingerprint: str) -> bool:
        with self._read("looking up a public key") as session:
            found = session.execute(
                select(CERTIFICATE.c.serial)
                .where(CERTIFICATE.c.public_key_fingerprint == fingerprint)
                .limit(1)
            ).first()
            return found is not None

    def revoked_certificates(self) -> list[CertificateRecord]:
        query = (
            select(CERTIFICATE)
            .where(CERTIFICATE.c.status == CertificateStatus.REVOKED.value)
            .order_by(CERTIFICATE.c.serial)
        )
        with self._read("listing revoked certificates") as session:
            return [convert.certificate_from_row(row) for row in session.execute(query).mappings()]

    # idempotency

    def get_response(self, identity_id: str, request_id: str) -> StoredResponse | None:
        with self._read("reading a stored response") as session:
            row = session.execute(
                select(RESPONSE).where(
                    RESPONSE.c.identity_id == identity_id, RESPONSE.c.request_id == request_id
                )
            ).mappings().first()
            return None if row is None else convert.response_from_row(row)

    def record_outcome(
        self,
        *,
        response: StoredResponse,
        identity: IdentityRecord | None = None,
        certificate: CertificateRecord | None = None,
        audit: Sequence[AuditEntry] = (),
    ) -> None:
        response_values = convert.response_values(response)
        identity_values = None if identity is None else convert.identity_values(identity)
        certificate_values = (
            None if certificate is None else convert.certificate_values(certificate)
        )
        owner_known = (
            certificate is None
            or (identity is not None
            and identity.id == certificate.identity_id)
        )
        with self._write("recording an outcome") as session:
            if certificate is not None and not owner_known:
                owner = session.execute(
                    select(IDENTITY.c.id).where(IDENTITY.c.id == certificate.identity_id)
                ).first()
                if owner is None:
                    raise KeyError(certificate.identity_id)
            where_response = (
                RESPONSE.c.identity_id == response.identity_id,
                RESPONSE.c.request_id == response.request_id,
            )
            previous = session.execute(select(RESPONSE.c.outcome).where(*where_response)).first()
            if previous is not None and previous.outcome != "pending":
                raise DuplicateError(
                    f"request {response.request_id!r} of {response.identity_id!r} already answered"
                )
            if identity_values is not None:
                self._upsert_identity(session, identity_values)
            if certificate is not None and certificate_values is not None:
                session.execute(
                    update(CERTIFICATE)
                    .where(
                        CERTIFICATE.c.identity_id == certificate.identity_id,
                        CERTIFICATE.c.status == CertificateStatus.ACTIVE.value,
                    )
                    .values(status=CertificateStatus.SUPERSEDED.value)
                )
                session.execute(insert(CERTIFICATE).values(**certificate_values))
            if previous is None:
                session.execute(insert(RESPONSE).values(**response_values))
            else:
                # A pending answer is replaced once the operator has approved and the device
                # retries the same request.
                session.execute(update(RESPONSE).where(*where_response).values(**response_values))
            self._append(session, audit)

    def change_state(
        self,
        identity_id: str,
        state: IdentityState,
        at: datetime,
        audit: Sequence[AuditEntry] = (),
        revocation_reason: str | None = None,
    ) -> IdentityRecord:
        wanted = IdentityState(state)
        convert.require_aware_time(at)
        with self._write("changing an identity's state") as session:
            row = session.execute(
                select(IDENTITY).where(IDENTITY.c.id == identity_id).with_for_update()
            ).mappings().first()
            if row is None:
                raise KeyError(identity_id)
            current = convert.identity_from_row(row)
            check_transition(current.state, wanted)
            session.execute(
                update(IDENTITY)
                .where(IDENTITY.c.id == identity_id)
                .values(state=wanted.value, updated_at=at)
            )
            if wanted is IdentityState.REVOKED:
                session.execute(
                    update(CERTIFICATE)
                    .where(
                        CERTIFICATE.c.identity_id == identity_id,
                        CERTIFICATE.c.status != CertificateStatus.REVOKED.value,
                    )
                    .values(
                        status=CertificateStatus.REVOKED.value,
                        revoked_at=at,
                        revocation_reason=revocation_reason,
                    )
                )
            self._append(session, audit)
            return convert.identity_from_row({**row, "state": wanted.value, "updated_at": at})

    # audit trail

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        with self._write("appending to the audit trail") as session:
            return self._append(session, entries)

    def audit_records(self, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        query = select(AUDIT).where(AUDIT.c.seq > after_seq).order_by(AUDIT.c.seq)
        if limit is not None:
            query = query.limit(limit)
        with self._read("reading the audit trail") as session:
            return [convert.audit_from_row(row) for row in session.execute(query).mappings()]

    def audit_head(self) -> AuditRecord | None:
        # The primary key index read backwards: one row, whatever the trail's length.
        query = select(AUDIT).order_by(AUDIT.c.seq.desc()).limit(1)
        with self._read("reading the audit head") as session:
            row = session.execute(query).mappings().first()
            return None if row is None else convert.audit_from_row(row)

    def put_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        values = convert.checkpoint_values(checkpoint)
        with self._write("storing an audit checkpoint") as session:
            session.execute(insert(CHECKPOINT).values(**values))

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._read("reading audit checkpoints") as session:
            rows = session.execute(select(CHECKPOINT).order_by(CHECKPOINT.c.seq)).mappings()
            return [convert.checkpoint_from_row(row) for row in rows]

    # refused connections

    def record_refusals(self, records: Sequence[RefusalRecord]) -> None:
        checked = check_refusals(records)
        if not checked:
            return
        # A key twice in one batch is folded here: one statement may not update a row twice
        # (PostgreSQL refuses "ON CONFLICT DO UPDATE command cannot affect row a second time").
        merged: dict[str, RefusalRecord] = {}
        for record in checked:
            merged[record.key] = merge_refusals(merged.get(record.key), record)
        rows = [convert.refusal_values(record) for record in merged.values()]
        statement = refusal_upsert(self._engine.dialect.name)
        with self._write("recording refused connections") as session:
            session.execute(statement, rows)

    def refusals(self, limit: int = 500, since: datetime | None = None) -> list[RefusalRecord]:
        check_limit(limit)
        query = (
            select(REFUSAL)
            .order_by(REFUSAL.c.last_seen.desc(), REFUSAL.c["key"].desc())
            .limit(limit)
        )
        if since is not None:
            query = query.where(REFUSAL.c.last_seen >= convert.require_aware_time(since, "since"))
        with self._read("reading refused connections") as session:
            return [convert.refusal_from_row(row) for row in session.execute(query).mappings()]

    # helpers, inside the caller's transaction

    @staticmethod
    def _upsert_identity(session: Session, values: dict[str, Any]) -> None:
        # UPDATE then INSERT is portable (no dialect-specific ON CONFLICT) and one statement in
        # the common case.
        changes = {name: value for name, value in values.items() if name != "id"}
        result = session.execute(
            update(IDENTITY).where(IDENTITY.c.id == values["id"]).values(**changes)
        )
        if _rowcount(result) == 0:
            session.execute(insert(IDENTITY).values(**values))

    @staticmethod
    def _append(session: Session, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        if not entries:
            return []
        if session.connection().dialect.name == "postgresql":
            # Appenders must queue before reading the head. SELECT ... ORDER BY seq DESC LIMIT 1
            # FOR UPDATE does not do it: the second appender waits on the same head row and,
            # once the first commits, still holds that old head (the ORDER BY was evaluated
            # before the wait), so both insert the same seq. SQLite needs nothing: BEGIN
            # IMMEDIATE already serialises writers.
            session.execute(select(func.pg_advisory_xact_lock(_AUDIT_APPEND_LOCK)))
        head_row = session.execute(
            select(AUDIT).order_by(AUDIT.c.seq.desc()).limit(1)
        ).mappings().first()
        head = None if head_row is None else convert.audit_from_row(head_row)
        records = chain(head, list(entries))
        session.execute(insert(AUDIT), [convert.audit_values(record) for record in records])
        return records
