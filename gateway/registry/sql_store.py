"""``SqlStore``: the ``gateway.store.Store`` port on SQLite or PostgreSQL.

Each method is one short-lived connection from the pool and at most one transaction: nothing is
cached between calls but the compiled statements, so after a failure (disk full, database locked
or read-only) the next call starts clean and works as soon as the condition clears. Uniqueness
is enforced by constraints, not by locks in this process, so several gateways sharing a
PostgreSQL database obey the same rules.

Two ways to the database, by how often a method runs:

- the per-request calls of enrollment and the broker (identity, nonce, token, key and response
  lookups, ``record_outcome``, ``touch``) and every write that appends to the audit trail run
  ``statements.Statements`` (Core, compiled once) on the pooled driver connection
  (``driver.Driver``): no ORM, no per-call statement building or cache lookup;
- listings, audit pages, the audit head poll, checkpoints and refusals build their query per
  call on a SQLAlchemy ``Connection``: they run a few times a second at most.

Durability on SQLite: every commit is synced (``synchronous=FULL``, see ``engine.py``) except
those of the writes that the protocol recovers from losing, which skip their own sync
(``Driver.writing(durable=False)``): a stored challenge with its new nonce (an outcome with no
identity, certificate or audit event; one transaction, so a challenge never names a nonce the
registry lacks), a nonce consumed, ``put_nonce`` and ``touch``. The log is one file synced
whole, so such a commit is lost on a power cut only together with everything after it up to the
next synced commit, and never once an outcome that depends on it is durable: a certificate row
is synced with the nonce consumption before it. What a loss costs: an unknown nonce (the device
starts again with hello), a new challenge for a retried hello, a nonce usable again by the
request that consumed it (which got no certificate), an older last-seen time. What the sync
costs: storing a nonce took 290 us of CPU and 1.7 ms with it, 65 us and 0.15 ms without
(measured on a busy machine), twice per enrollment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from alembic.util import CommandError
from sqlalchemy import Connection, Engine, and_, case, delete, insert, or_, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from gateway.audit import chain
from gateway.lifecycle import check_transition
from gateway.registry import convert
from gateway.registry.driver import Driver, Transaction
from gateway.registry.engine import DEFAULT_BUSY_TIMEOUT_MS, create_registry_engine, writer
from gateway.registry.errors import translated
from gateway.registry.migrate import upgrade
from gateway.registry.prepared import Prepared
from gateway.registry.statements import Statements
from gateway.registry.tables import (
    AuditCheckpointRow,
    AuditEventRow,
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
AUDIT = table_of(AuditEventRow)
CHECKPOINT = table_of(AuditCheckpointRow)
REFUSAL = table_of(ConnectionRefusalRow)
RESPONSE = table_of(StoredResponseRow)
NONCE = table_of(NonceRow)

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


Check = TypeVar("Check", NonceCheck, TokenCheck)


def _consume(
    sql: Transaction,
    consume: Prepared,
    lookup: Prepared,
    outcomes: type[Check],
    device_id: str,
    now: datetime,
    **key: Any,
) -> Check:
    """Use a single-use secret (a nonce, a bootstrap token) for ``device_id``. The conditional
    update is the atomic test-and-set: of two concurrent consumers exactly one sees a row
    change. It needs no transaction around it, nor does the read that explains a refusal
    (whatever changed in between, the secret is refused)."""
    if sql.execute(consume, device_id=device_id, now=now, used_at=now, **key) == 1:
        return outcomes.OK
    row = sql.first(lookup, **key)
    if row is None:
        return outcomes.UNKNOWN
    if row["device_id"] != device_id:
        return outcomes.OTHER_DEVICE
    if row["used_at"] is not None:
        return outcomes.REUSED
    return outcomes.EXPIRED


class SqlStore:
    """The registry in a SQL database; the schema is brought to the newest revision on open."""

    def __init__(self, url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS) -> None:
        with translated("opening the registry"):
            self._engine = create_registry_engine(url, busy_timeout_ms=busy_timeout_ms)
            self._writer = writer(self._engine)
            try:
                upgrade(self._engine)
                # After the first connection: the dialect knows the server it talks to.
                self._sql = Statements.compile(self._engine.dialect)
            except CommandError as error:
                self._engine.dispose()
                # Typically a database already migrated by a newer gateway.
                raise StoreError(f"cannot bring the registry schema up to date: {error}") from error
            except BaseException:
                self._engine.dispose()
                raise
        self._driver = Driver(self._engine)
        self._postgres = self._engine.dialect.name == "postgresql"

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

    # the per-request way: compiled statements on the driver connection

    @contextmanager
    def _reading(self, action: str) -> Iterator[Transaction]:
        with translated(action), self._driver.reading() as transaction:
            yield transaction

    @contextmanager
    def _writing(
        self, action: str, *, durable: bool = True, each_statement_alone: bool = False
    ) -> Iterator[Transaction]:
        with translated(action), self._driver.writing(
            durable=durable, each_statement_alone=each_statement_alone
        ) as transaction:
            yield transaction

    # the occasional way: statements built per call on a SQLAlchemy Connection

    @contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        with translated(action), self._engine.connect() as connection:
            yield connection

    @contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
        with translated(action), self._writer.begin() as connection:
            yield connection

    # identities

    def get_identity(self, identity_id: str) -> IdentityRecord | None:
        with self._reading("reading an identity") as sql:
            row = sql.first(self._sql.identity, id=identity_id)
        return None if row is None else convert.identity_from_row(row)

    def find_by_birth_fingerprint(self, fingerprint: str) -> IdentityRecord | None:
        with self._reading("finding an identity by birth certificate") as sql:
            row = sql.first(self._sql.identity_by_birth, fingerprint=fingerprint)
        return None if row is None else convert.identity_from_row(row)

    def list_identities(
        self, kind: IdentityKind | None = None, state: IdentityState | None = None
    ) -> list[IdentityRecord]:
        query = select(IDENTITY).order_by(IDENTITY.c.id)
        if kind is not None:
            query = query.where(IDENTITY.c.kind == IdentityKind(kind).value)
        if state is not None:
            query = query.where(IDENTITY.c.state == IdentityState(state).value)
        with self._read("listing identities") as connection:
            return [convert.identity_from_row(row) for row in connection.execute(query).mappings()]

    def put_identity(self, record: IdentityRecord, audit: Sequence[AuditEntry] = ()) -> None:
        values = convert.identity_values(record)
        with self._writing("storing an identity") as sql:
            self._upsert_identity(sql, values)
            self._append(sql, audit)

    def touch(self, identity_id: str, seen_at: datetime) -> None:
        convert.require_aware_time(seen_at)
        with self._writing("recording when an identity was seen", durable=False) as sql:
            if sql.execute(self._sql.identity_touch, id=identity_id, last_seen_at=seen_at) == 0:
                raise KeyError(identity_id)

    def touch_many(self, seen: Mapping[str, datetime]) -> int:
        for seen_at in seen.values():
            convert.require_aware_time(seen_at)
        if not seen:
            return 0
        updated = 0
        with self._writing("recording when identities were seen", durable=False) as sql:
            for identity_id, seen_at in seen.items():
                updated += sql.execute(
                    self._sql.identity_touch, id=identity_id, last_seen_at=seen_at
                )
        return updated

    # nonces

    def put_nonce(self, nonce: NonceRecord) -> None:
        values = convert.nonce_values(nonce)
        with self._writing("storing a nonce", durable=False) as sql:
            sql.execute(self._sql.nonce_insert, **values)

    def consume_nonce(self, value: bytes, device_id: str, now: datetime) -> NonceCheck:
        key = convert.nonce_key(value)
        convert.require_aware_time(now)
        with self._writing(
            "consuming a nonce", durable=False, each_statement_alone=True
        ) as sql:
            return _consume(
                sql, self._sql.nonce_consume, self._sql.nonce, NonceCheck, device_id, now, value=key
            )

    # bootstrap tokens

    def put_token(self, token: TokenRecord, audit: Sequence[AuditEntry] = ()) -> None:
        values = convert.token_values(token)
        with self._writing("storing a bootstrap token") as sql:
            sql.execute(self._sql.token_insert, **values)
            self._append(sql, audit)

    def consume_token(self, token_hash: str, device_id: str, now: datetime) -> TokenCheck:
        convert.require_aware_time(now)
        with self._writing("consuming a bootstrap token", each_statement_alone=True) as sql:
            return _consume(
                sql,
                self._sql.token_consume,
                self._sql.token,
                TokenCheck,
                device_id,
                now,
                token_hash=token_hash,
            )

    # certificates

    def certificates_for(self, identity_id: str) -> list[CertificateRecord]:
        query = (
            select(CERTIFICATE)
            .where(CERTIFICATE.c.identity_id == identity_id)
            .order_by(CERTIFICATE.c.issued_at, CERTIFICATE.c.serial)
        )
        with self._read("listing certificates") as connection:
            rows = connection.execute(query).mappings()
            return [convert.certificate_from_row(row) for row in rows]

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        key = convert.serial_key(serial)
        with self._read("reading a certificate") as connection:
            query = select(CERTIFICATE).where(CERTIFICATE.c.serial == key)
            row = connection.execute(query).mappings().first()
            return None if row is None else convert.certificate_from_row(row)

    def key_fingerprint_used(self, fingerprint: str) -> bool:
        with self._reading("looking up a public key") as sql:
            return sql.first(self._sql.key_used, fingerprint=fingerprint) is not None

    def revoked_certificates(self) -> list[CertificateRecord]:
        query = (
            select(CERTIFICATE)
            .where(CERTIFICATE.c.status == CertificateStatus.REVOKED.value)
            .order_by(CERTIFICATE.c.serial)
        )
        with self._read("listing revoked certificates") as connection:
            rows = connection.execute(query).mappings()
            return [convert.certificate_from_row(row) for row in rows]

    def active_certificates(self) -> list[CertificateRecord]:
        query = (
            select(CERTIFICATE)
            .where(CERTIFICATE.c.status == CertificateStatus.ACTIVE.value)
            .order_by(CERTIFICATE.c.identity_id)
        )
        with self._read("listing active certificates") as connection:
            rows = connection.execute(query).mappings()
            return [convert.certificate_from_row(row) for row in rows]

    # idempotency

    def get_response(self, identity_id: str, request_id: str) -> StoredResponse | None:
        with self._reading("reading a stored response") as sql:
            row = sql.first(self._sql.response, identity_id=identity_id, request_id=request_id)
        return None if row is None else convert.response_from_row(row)

    def record_outcome(
        self,
        *,
        response: StoredResponse,
        identity: IdentityRecord | None = None,
        certificate: CertificateRecord | None = None,
        audit: Sequence[AuditEntry] = (),
        nonce: NonceRecord | None = None,
    ) -> None:
        response_values = convert.response_values(response)
        nonce_values = None if nonce is None else convert.nonce_values(nonce)
        identity_values = None if identity is None else convert.identity_values(identity)
        certificate_values = (
            None if certificate is None else convert.certificate_values(certificate)
        )
        owner_given = (
            certificate is not None
            and identity is not None
            and identity.id == certificate.identity_id
        )
        statements = self._sql
        # A stored challenge alone may be lost (see the module docstring); anything that
        # decides about an identity, issues or is audited is synced before the answer goes out.
        durable = identity is not None or certificate is not None or bool(audit)
        with self._writing("recording an outcome", durable=durable) as sql:
            if nonce_values is not None:
                sql.execute(statements.nonce_insert, **nonce_values)
            if certificate is not None and not owner_given:
                # Lock the owner (PostgreSQL) as the identity upsert below would: concurrent
                # outcomes for one identity queue here, so the later one supersedes the
                # certificate the earlier one added instead of meeting it in the index.
                owner = sql.first(statements.identity_for_update, id=certificate.identity_id)
                if owner is None:
                    raise KeyError(certificate.identity_id)
            previous = sql.first(
                statements.response_outcome,
                identity_id=response.identity_id,
                request_id=response.request_id,
            )
            if previous is not None and previous["outcome"] != "pending":
                raise DuplicateError(
                    f"request {response.request_id!r} of {response.identity_id!r} already answered"
                )
            if identity_values is not None:
                self._upsert_identity(sql, identity_values)
            if certificate is not None and certificate_values is not None:
                # Supersede first: one 'active' certificate per identity is a unique index.
                sql.execute(statements.certificates_supersede, identity_id=certificate.identity_id)
                sql.execute(statements.certificate_insert, **certificate_values)
            if previous is None:
                sql.execute(statements.response_insert, **response_values)
            else:
                # A pending answer is replaced once the operator has approved and the device
                # retries the same request.
                sql.execute(statements.response_replace, **response_values)
            self._append(sql, audit)

    # retention: a batch per call, so a sweep never holds the writer lock for long

    def prune_responses(
        self, answered_before: datetime, pending_before: datetime, limit: int
    ) -> int:
        final = convert.require_aware_time(answered_before, "answered_before")
        pending = convert.require_aware_time(pending_before, "pending_before")
        if check_limit(limit) == 0:
            return 0
        c = RESPONSE.c
        old = or_(
            and_(c.outcome != "pending", c.at < final),
            and_(c.outcome == "pending", c.at < pending),
        )
        # The first condition alone is a range of the index on ``at``; the second picks.
        doomed = select(c.identity_id, c.request_id).where(c.at < max(final, pending), old)
        doomed = doomed.order_by(c.at).limit(limit)
        statement = delete(RESPONSE).where(tuple_(c.identity_id, c.request_id).in_(doomed))
        with self._write("pruning stored answers") as connection:
            return connection.execute(statement).rowcount

    def prune_nonces(self, expired_before: datetime, limit: int) -> int:
        cutoff = convert.require_aware_time(expired_before, "expired_before")
        if check_limit(limit) == 0:
            return 0
        c = NONCE.c
        doomed = select(c.value).where(c.expires_at < cutoff).order_by(c.expires_at).limit(limit)
        statement = delete(NONCE).where(c.value.in_(doomed))
        with self._write("pruning nonces") as connection:
            return connection.execute(statement).rowcount

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
        with self._writing("changing an identity's state") as sql:
            row = sql.first(self._sql.identity_for_update, id=identity_id)
            if row is None:
                raise KeyError(identity_id)
            current = convert.identity_from_row(row)
            check_transition(current.state, wanted)
            sql.execute(self._sql.identity_state, id=identity_id, state=wanted.value, updated_at=at)
            if wanted is IdentityState.REVOKED:
                sql.execute(
                    self._sql.certificates_revoke,
                    identity_id=identity_id,
                    status=CertificateStatus.REVOKED.value,
                    revoked_at=at,
                    revocation_reason=revocation_reason,
                )
            self._append(sql, audit)
        return convert.identity_from_row({**row, "state": wanted.value, "updated_at": at})

    # audit trail

    def append_audit(self, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        with self._writing("appending to the audit trail") as sql:
            return self._append(sql, entries)

    def audit_records(self, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        query = select(AUDIT).where(AUDIT.c.seq > after_seq).order_by(AUDIT.c.seq)
        if limit is not None:
            query = query.limit(limit)
        with self._read("reading the audit trail") as connection:
            return [convert.audit_from_row(row) for row in connection.execute(query).mappings()]

    def audit_head(self) -> AuditRecord | None:
        # The primary key index read backwards: one row, whatever the trail's length.
        query = select(AUDIT).order_by(AUDIT.c.seq.desc()).limit(1)
        with self._read("reading the audit head") as connection:
            row = connection.execute(query).mappings().first()
            return None if row is None else convert.audit_from_row(row)

    def put_checkpoint(self, checkpoint: AuditCheckpoint) -> None:
        values = convert.checkpoint_values(checkpoint)
        with self._write("storing an audit checkpoint") as connection:
            connection.execute(insert(CHECKPOINT).values(**values))

    def checkpoints(self) -> list[AuditCheckpoint]:
        with self._read("reading audit checkpoints") as connection:
            rows = connection.execute(select(CHECKPOINT).order_by(CHECKPOINT.c.seq)).mappings()
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
        with self._write("recording refused connections") as connection:
            connection.execute(statement, rows)

    def refusals(self, limit: int = 500, since: datetime | None = None) -> list[RefusalRecord]:
        check_limit(limit)
        query = (
            select(REFUSAL)
            .order_by(REFUSAL.c.last_seen.desc(), REFUSAL.c["key"].desc())
            .limit(limit)
        )
        if since is not None:
            query = query.where(REFUSAL.c.last_seen >= convert.require_aware_time(since, "since"))
        with self._read("reading refused connections") as connection:
            return [convert.refusal_from_row(row) for row in connection.execute(query).mappings()]

    # helpers, inside the caller's transaction

    def _upsert_identity(self, sql: Transaction, values: dict[str, Any]) -> None:
        # UPDATE then INSERT is portable (no dialect-specific ON CONFLICT) and one statement in
        # the common case. On PostgreSQL the UPDATE also locks the row until the commit.
        if sql.execute(self._sql.identity_update, **values) == 0:
            sql.execute(self._sql.identity_insert, **values)

    def _append(self, sql: Transaction, entries: Sequence[AuditEntry]) -> list[AuditRecord]:
        if not entries:
            return []
        if self._postgres:
            # Appenders must queue before reading the head. SELECT ... ORDER BY seq DESC LIMIT 1
            # FOR UPDATE does not do it: the second appender waits on the same head row and,
            # once the first commits, still holds that old head (the ORDER BY was evaluated
            # before the wait), so both insert the same seq. SQLite needs nothing: BEGIN
            # IMMEDIATE already serialises writers.
            sql.first(self._sql.audit_lock)
        head_row = sql.first(self._sql.audit_head)
        head = None if head_row is None else convert.audit_from_row(head_row)
        records = chain(head, list(entries))
        sql.execute_many(self._sql.audit_insert, [convert.audit_values(r) for r in records])
        return records
