"""One active certificate per identity: migration 0003's partial unique index, on SQLite and
(with $FLEETGATE_TEST_POSTGRES_URL) PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from test_store_contract import fresh_postgres_database

from gateway.registry import METADATA, convert, current_revision, head_revision, upgrade
from gateway.registry.driver import Driver
from gateway.registry.engine import create_registry_engine, writer
from gateway.registry.errors import translated
from gateway.registry.migrate import alembic_config
from gateway.registry.statements import Statements
from gateway.registry.tables import ONE_ACTIVE_CERTIFICATE
from gateway.store import (
    CertificateRecord,
    CertificateStatus,
    DuplicateError,
    IdentityRecord,
    IdentityState,
)
from pki.profile import IdentityKind

BEFORE = "0002_connection_refusal"
AFTER = "0003_one_active_certificate"
T0 = datetime(2026, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)
CERTIFICATE = METADATA.tables["certificate"]
IDENTITY = METADATA.tables["identity"]
ACTIVE = CertificateStatus.ACTIVE
SUPERSEDED = CertificateStatus.SUPERSEDED
REVOKED = CertificateStatus.REVOKED


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    with fresh_postgres_database() as postgres:
        yield postgres


@pytest.fixture
def engine(url: str) -> Iterator[sa.Engine]:
    engine = create_registry_engine(url)
    yield engine
    engine.dispose()


def identity(name: str) -> IdentityRecord:
    return IdentityRecord(
        id=name,
        kind=IdentityKind.DEVICE,
        state=IdentityState.ACTIVE,
        created_at=T0,
        updated_at=T0,
        birth_fingerprint=f"birth-{name}",
    )


def certificate(
    serial: int, owner: str, status: CertificateStatus = ACTIVE, issued: datetime = T0
) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        identity_id=owner,
        public_key_fingerprint=f"{serial:064x}",
        not_before=issued,
        not_after=issued + timedelta(hours=1),
        issued_at=issued,
        pem=f"-----BEGIN CERTIFICATE-----\n{serial:x}\n-----END CERTIFICATE-----\n",
        status=status,
        request_id=f"req-{serial:x}",
        revoked_at=issued if status is REVOKED else None,
    )


def insert(engine: sa.Engine, *rows: IdentityRecord | CertificateRecord) -> None:
    """Rows written straight into the tables, as a pre-0003 registry (or a stray writer) could
    have them."""
    with writer(engine).begin() as connection:
        for row in rows:
            if isinstance(row, IdentityRecord):
                connection.execute(sa.insert(IDENTITY), [convert.identity_values(row)])
            else:
                connection.execute(sa.insert(CERTIFICATE), [convert.certificate_values(row)])


def certificates(engine: sa.Engine) -> dict[int, CertificateRecord]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(CERTIFICATE)).mappings()
        found = [convert.certificate_from_row(row) for row in rows]
    return {record.serial: record for record in found}


def schema_diffs(engine: sa.Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, METADATA))


def downgrade(engine: sa.Engine, revision: str) -> None:
    with writer(engine).begin() as connection:
        command.downgrade(alembic_config(connection), revision)


# the data a registry from before 0003 may hold

OLD_ROWS = (
    identity("dev-1"),
    identity("dev-2"),
    identity("dev-3"),
    # dev-1: two active certificates (issued an hour apart) and an old superseded one
    certificate(0x11, "dev-1", SUPERSEDED, issued=T0 - timedelta(hours=2)),
    certificate(0x12, "dev-1", issued=T0),
    certificate(0x13, "dev-1", issued=T0 + timedelta(hours=1)),
    # dev-2: one active, one revoked: nothing to repair
    certificate(0x21, "dev-2", REVOKED, issued=T0 - timedelta(hours=1)),
    certificate(0x22, "dev-2", issued=T0),
    # dev-3: two active issued at the same instant; the higher serial is the newer
    certificate(0x3B, "dev-3", issued=T0),
    certificate(0x3A, "dev-3", issued=T0),
)


def test_upgrading_keeps_the_newest_active_certificate_of_each_identity(
    engine: sa.Engine,
) -> None:
    upgrade(engine, BEFORE)
    insert(engine, *OLD_ROWS)
    before = certificates(engine)

    upgrade(engine)

    assert current_revision(engine) == head_revision()  # through AFTER and any later one
    after = certificates(engine)
    assert set(after) == set(before)
    changed = {serial for serial in after if after[serial] != before[serial]}
    assert changed == {0x12, 0x3A}  # the older duplicates, and nothing else
    for serial in changed:
        assert after[serial] == dataclasses.replace(before[serial], status=SUPERSEDED)
    active = sorted(serial for serial, record in after.items() if record.status is ACTIVE)
    assert active == [0x13, 0x22, 0x3B]
    assert schema_diffs(engine) == []


def test_before_the_upgrade_the_schema_lacks_the_index(engine: sa.Engine) -> None:
    # Guards the comparison above: without 0003 the models and the database differ.
    upgrade(engine, BEFORE)
    diffs = schema_diffs(engine)
    assert ("add_index", ONE_ACTIVE_CERTIFICATE) in [
        (d[0], d[1].name) for d in diffs if isinstance(d, tuple)
    ]


def test_a_second_active_certificate_is_refused_by_the_database(engine: sa.Engine) -> None:
    upgrade(engine)
    insert(engine, identity("dev-1"), identity("dev-2"), certificate(0x1, "dev-1"))
    with pytest.raises(sa.exc.IntegrityError):
        insert(engine, certificate(0x2, "dev-1"))
    # Any number of other statuses, and one active certificate for every identity.
    insert(
        engine,
        certificate(0x3, "dev-1", SUPERSEDED),
        certificate(0x4, "dev-1", SUPERSEDED),
        certificate(0x5, "dev-1", REVOKED),
        certificate(0x6, "dev-2"),
    )
    assert sorted(certificates(engine)) == [0x1, 0x3, 0x4, 0x5, 0x6]


def test_the_refusal_is_a_duplicate_error_on_both_ways_to_the_database(
    engine: sa.Engine,
) -> None:
    upgrade(engine)
    insert(engine, identity("dev-1"), certificate(0x1, "dev-1"))
    values = convert.certificate_values(certificate(0x2, "dev-1"))
    with pytest.raises(DuplicateError, match="adding a certificate"):  # noqa: SIM117
        with translated("adding a certificate"), writer(engine).begin() as connection:
            connection.execute(sa.insert(CERTIFICATE), [values])
    statements = Statements.compile(engine.dialect)
    with pytest.raises(DuplicateError, match="adding a certificate"):  # noqa: SIM117
        with translated("adding a certificate"), Driver(engine).writing() as sql:
            sql.execute(statements.certificate_insert, **values)
    assert sorted(certificates(engine)) == [0x1]


def test_downgrading_drops_only_the_index(engine: sa.Engine) -> None:
    upgrade(engine)
    insert(engine, identity("dev-1"), certificate(0x1, "dev-1"))

    downgrade(engine, BEFORE)

    assert current_revision(engine) == BEFORE
    assert sorted(certificates(engine)) == [0x1]
    insert(engine, certificate(0x2, "dev-1", issued=T0 + timedelta(seconds=1)))  # allowed again
    upgrade(engine)
    after = certificates(engine)
    assert (after[0x1].status, after[0x2].status) == (SUPERSEDED, ACTIVE)
    assert schema_diffs(engine) == []
