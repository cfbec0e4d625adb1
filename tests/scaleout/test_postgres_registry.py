"""The registry several gateways share, on PostgreSQL: gateways starting together migrate the
schema once, and concurrent writers extend one audit chain that verifies."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from gateway.audit import verify_chain
from gateway.registry import SqlStore
from gateway.registry.migrate import current_revision, head_revision
from gateway.store import AuditEntry

pytestmark = pytest.mark.slow

WRITERS = 3
APPENDS = 40


def test_gateways_starting_together_migrate_once(database_url: str) -> None:
    with ThreadPoolExecutor(WRITERS) as pool:
        stores = list(pool.map(lambda _: SqlStore(database_url), range(WRITERS)))
    try:
        assert current_revision(stores[0].engine) == head_revision()
    finally:
        for store in stores:
            store.close()


def test_concurrent_writers_extend_one_chain_that_verifies(database_url: str) -> None:
    stores = [SqlStore(database_url) for _ in range(WRITERS)]

    def append(writer: int) -> list[int]:
        seqs = []
        for n in range(APPENDS):
            entry = AuditEntry(
                actor=f"gateway:{writer}", action="enroll", subject=f"dev-{writer}-{n}",
                outcome="ok", at=datetime.now(UTC),
            )
            seqs += [record.seq for record in stores[writer].append_audit([entry])]
        return seqs

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            seqs = [seq for chunk in pool.map(append, range(WRITERS)) for seq in chunk]
        records = stores[0].audit_records()
        assert sorted(seqs) == list(range(1, WRITERS * APPENDS + 1))  # no seq given twice
        assert [r.seq for r in records] == sorted(seqs)
        verdict = verify_chain(records, [])
        assert verdict.ok, verdict
    finally:
        for store in stores:
            store.close()
