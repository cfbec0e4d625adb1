"""The registry's schema comes from its Alembic migrations, and they match the models."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from gateway.audit import chain, make_checkpoint, verify_chain
from gateway.registry import METADATA, SqlStore, convert, current_revision, head_revision, upgrade
from gateway.registry.engine import create_registry_engine, writer
from gateway.registry.migrate import MIGRATIONS_DIR, alembic_config
from gateway.store import (
    AuditEntry,
    CertificateRecord,
    IdentityRecord,
    IdentityState,
    NonceCheck,
    NonceRecord,
    RefusalRecord,
    StoredResponse,
    StoreError,
    TokenCheck,
    TokenRecord,
    refusal_key,
)
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind

TABLES = {
    "identity",
    "certificate",
    "stored_response",
    "nonce",
    "bootstrap_token",
    "audit_event",
    "audit_checkpoint",
    "connection_refusal",
}
FIRST_REVISION = "0001_initial"
T0 = datetime(2026, 3, 1, 12, 0, 0, 654321, tzinfo=UTC)


def tables_in(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


def test_opening_an_empty_file_creates_the_schema(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        assert current_revision(store.engine) == head_revision()
    assert tables_in(path) == TABLES | {"alembic_version"}


def test_opening_twice_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        schema = connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        version = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    with SqlStore(f"sqlite:///{path}") as store:
        assert current_revision(store.engine) == head_revision()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == (
            schema
        )
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == version


def test_upgrade_is_idempotent_on_an_engine(tmp_path: Path) -> None:
    engine = create_registry_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        upgrade(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def diffs_against(path: Path, metadata: sa.MetaData) -> list[object]:
    engine = create_registry_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    assert diffs_against(path, METADATA) == []


def test_the_comparison_does_notice_a_drift(tmp_path: Path) -> None:
    # Guards the test above: a model the migrations do not know about must show up.
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    drifted = sa.MetaData()
    for table in METADATA.tables.values():
        table.to_metadata(drifted)
    drifted.tables["nonce"].append_column(sa.Column("origin", sa.String(32), nullable=True))
    diffs = diffs_against(path, drifted)
    assert [diff[0] for diff in diffs if isinstance(diff, tuple)] == ["add_column"]


def test_migrations_ship_as_packages() -> None:
    # setuptools' find_packages only ships folders with __init__.py; the revision files and
    # env.py must be inside the wheel for an installed gateway to upgrade its database.
    assert (MIGRATIONS_DIR / "__init__.py").is_file()
    assert (MIGRATIONS_DIR / "versions" / "__init__.py").is_file()
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert (MIGRATIONS_DIR / "script.py.mako").is_file()


def test_serial_numbers_are_stored_as_fixed_width_hex() -> None:
    assert METADATA.tables["certificate"].c.serial.type.length == 40  # type: ignore[attr-defined]


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="not a registry database"):
        SqlStore(f"sqlite:///{path}")


def test_a_database_from_a_newer_gateway_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SqlStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    with pytest.raises(StoreError, match="schema"):
        SqlStore(f"sqlite:///{path}")


def test_a_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot be opened"):
        SqlStore(f"sqlite:///{tmp_path / 'nowhere' / 'registry.db'}")


def test_in_memory_registry_works_across_threads() -> None:
    import threading
    from datetime import UTC, datetime

    from gateway.store import AuditEntry

    with SqlStore("sqlite://") as store:
        at = datetime(2026, 1, 1, tzinfo=UTC)
        worker = threading.Thread(
            target=store.append_audit, args=([AuditEntry("a", "b", "c", "ok", at)],)
        )
        worker.start()
        worker.join()
        assert [r.seq for r in store.audit_records()] == [1]


# upgrading a registry that already holds data


def identity_record() -> IdentityRecord:
    return IdentityRecord(
        id="dev-1",
        kind=IdentityKind.DEVICE,
        state=IdentityState.ACTIVE,
        created_at=T0,
        updated_at=T0,
        manufacturer="Acme",
        model="TH-1",
        firmware_version="1.2.3",
        firmware_digest="ab" * 32,
        birth_fingerprint="cd" * 32,
        last_seen_at=T0 + timedelta(minutes=3),
    )


def certificate_record() -> CertificateRecord:
    return CertificateRecord(
        serial=(1 << 158) + 99,
        identity_id="dev-1",
        public_key_fingerprint="ef" * 32,
        not_before=T0,
        not_after=T0 + timedelta(days=30),
        issued_at=T0,
        pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        request_id="req-1",
    )


def response_record() -> StoredResponse:
    return StoredResponse(
        identity_id="dev-1",
        request_id="req-1",
        kind="enroll",
        outcome="issued",
        payload=b'{"type":"issued"}',
        at=T0,
        request_digest="12" * 32,
    )


def a_refusal(at: datetime = T0) -> RefusalRecord:
    fingerprint = "9a" * 32
    return RefusalRecord(
        key=refusal_key("operational", "unknown_ca", fingerprint, None),
        listener="operational",
        reason="unknown_ca",
        client_id="stranger",
        cert_subject="CN=stranger",
        cert_issuer="CN=Other CA",
        cert_fingerprint=fingerprint,
        remote="192.0.2.10:40001",
        first_seen=at,
        last_seen=at,
    )


AUDIT_SIGNER = LocalSigner.generate(KeyType.P256)


def fill_first_schema(engine: sa.Engine) -> None:
    """Rows in every table of the first revision, written the way SqlStore writes them."""
    records = chain(
        None,
        [
            AuditEntry("gateway", "enroll", "dev-1", "ok", T0, ("auto_approved",), {"n": "1"}),
            AuditEntry("operator:zoë", "approve", "dev-1", "ok", T0 + timedelta(seconds=1)),
        ],
    )
    rows = {
        "identity": [convert.identity_values(identity_record())],
        "certificate": [convert.certificate_values(certificate_record())],
        "stored_response": [convert.response_values(response_record())],
        "nonce": [
            convert.nonce_values(
                NonceRecord(b"\x07" * 16, "dev-1", T0, T0 + timedelta(days=3650))
            )
        ],
        "bootstrap_token": [
            convert.token_values(
                TokenRecord("34" * 32, "dev-2", T0, T0 + timedelta(days=3650), "cli:root")
            )
        ],
        "audit_event": [convert.audit_values(record) for record in records],
        "audit_checkpoint": [
            convert.checkpoint_values(make_checkpoint(AUDIT_SIGNER, records[-1], T0))
        ],
    }
    with writer(engine).begin() as connection:
        for table, values in rows.items():
            connection.execute(sa.insert(METADATA.tables[table]), values)


def test_upgrading_a_registry_with_data_keeps_every_row(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    engine = create_registry_engine(f"sqlite:///{path}")
    try:
        upgrade(engine, FIRST_REVISION)
        assert current_revision(engine) == FIRST_REVISION
        assert "connection_refusal" not in tables_in(path)
        fill_first_schema(engine)
    finally:
        engine.dispose()

    with SqlStore(f"sqlite:///{path}") as store:  # upgrades on open
        assert current_revision(store.engine) == head_revision() != FIRST_REVISION
        assert store.get_identity("dev-1") == identity_record()
        assert store.get_certificate(certificate_record().serial) == certificate_record()
        assert store.get_response("dev-1", "req-1") == response_record()
        assert store.consume_nonce(b"\x07" * 16, "dev-1", T0) is NonceCheck.OK
        assert store.consume_token("34" * 32, "dev-2", T0) is TokenCheck.OK
        records = store.audit_records()
        assert [r.entry.action for r in records] == ["enroll", "approve"]
        assert store.audit_head() == records[-1]
        checkpoints = store.checkpoints()
        assert [cp.seq for cp in checkpoints] == [2]
        assert verify_chain(records, checkpoints, AUDIT_SIGNER.public_key()).ok
        assert store.refusals() == []
        store.record_refusals([a_refusal()])
        assert store.refusals() == [a_refusal()]
    assert diffs_against(path, METADATA) == []


def test_downgrading_drops_the_refusals_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        store.put_identity(identity_record())
        store.record_refusals([a_refusal()])
        with writer(store.engine).begin() as connection:
            command.downgrade(alembic_config(connection), FIRST_REVISION)
        assert current_revision(store.engine) == FIRST_REVISION
        assert "connection_refusal" not in tables_in(path)
        assert store.get_identity("dev-1") == identity_record()
        upgrade(store.engine)
        assert store.refusals() == []
        store.record_refusals([a_refusal()])
        assert store.refusals() == [a_refusal()]
