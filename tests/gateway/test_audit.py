"""The audit chain notices every kind of tampering it promises to, in memory and in the database
file an attacker could edit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.audit import (
    CHECKPOINT_DOMAIN,
    GENESIS_HASH,
    AuditWriter,
    ChainVerdict,
    canonical_bytes,
    chain,
    checkpoint_message,
    make_checkpoint,
    record_hash,
    verify_chain,
    verify_checkpoint,
)
from gateway.registry import SqlStore
from gateway.store import AuditCheckpoint, AuditEntry, AuditRecord
from gateway.store_memory import MemoryStore
from pki.clock import FakeClock
from pki.csr import public_key_fingerprint
from pki.keys import KeyType, LocalSigner

T0 = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
SIGNER = LocalSigner.generate(KeyType.P256)
KEY = SIGNER.public_key()


def entry(n: int) -> AuditEntry:
    return AuditEntry(
        actor="gateway",
        action="issue",
        subject=f"dev-{n}",
        outcome="ok",
        at=T0 + timedelta(seconds=n),
        reasons=("auto_approved",),
        detail={"serial": f"{n:x}"},
    )


def trail(count: int = 50, every: int = 20) -> tuple[list[AuditRecord], list[AuditCheckpoint]]:
    records = chain(None, [entry(n) for n in range(1, count + 1)])
    checkpoints = [
        make_checkpoint(SIGNER, record, T0) for record in records if record.seq % every == 0
    ]
    return records, checkpoints


def rehash(records: list[AuditRecord], start: int) -> list[AuditRecord]:
    """What an attacker who knows the scheme does after an edit: recompute every later hash."""
    fixed = records[:start]
    prev = fixed[-1] if fixed else None
    return fixed + chain(prev, [record.entry for record in records[start:]])


# canonical bytes and hashes


def test_canonical_bytes_are_sorted_compact_json_in_utc() -> None:
    plus_one = timezone(timedelta(hours=1))
    record = AuditEntry(
        actor="operator:zoë",
        action="revoke",
        subject="dev-7",
        outcome="ok",
        at=datetime(2026, 2, 3, 5, 5, 6, tzinfo=plus_one),
        reasons=("key_compromise",),
        detail={"b": "2", "a": "1"},
    )
    expected = (
        '{"action":"revoke","actor":"operator:zoë","at":"2026-02-03T04:05:06.000000Z",'
        '"detail":{"a":"1","b":"2"},"outcome":"ok","reasons":["key_compromise"],'
        '"seq":7,"subject":"dev-7"}'
    ).encode()
    assert canonical_bytes(7, record) == expected
    same_instant_in_utc = dataclasses.replace(record, at=record.at.astimezone(UTC))
    assert canonical_bytes(7, same_instant_in_utc) == expected


def test_record_hash_covers_previous_hash_and_record() -> None:
    expected = hashlib.sha256(GENESIS_HASH.encode() + canonical_bytes(1, entry(1))).hexdigest()
    assert record_hash(GENESIS_HASH, 1, entry(1)) == expected
    assert record_hash(GENESIS_HASH, 2, entry(1)) != expected
    assert record_hash("1" * 64, 1, entry(1)) != expected


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"at": datetime(2026, 1, 1)}, ValueError),
        ({"at": "2026-01-01T00:00:00Z"}, TypeError),
        ({"actor": 7}, TypeError),
        ({"reasons": ("ok", 3)}, TypeError),
        ({"reasons": "not-a-tuple"}, TypeError),
        ({"detail": {"n": 1}}, TypeError),
        ({"detail": [("a", "b")]}, TypeError),
    ],
)
def test_entries_that_cannot_be_hashed_exactly_are_refused(
    change: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        canonical_bytes(1, dataclasses.replace(entry(1), **change))  # type: ignore[arg-type]


@pytest.mark.parametrize(("seq", "error"), [(0, ValueError), ("1", TypeError), (True, TypeError)])
def test_bad_sequence_numbers_are_refused(seq: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonical_bytes(seq, entry(1))  # type: ignore[arg-type]


@pytest.mark.parametrize("prev", ["", "0" * 63, "G" * 64, "A" * 64])
def test_malformed_previous_hash_is_refused(prev: str) -> None:
    with pytest.raises(ValueError):
        record_hash(prev, 1, entry(1))


def test_chain_numbers_and_links_records() -> None:
    first = chain(None, [entry(1), entry(2)])
    assert [(r.seq, r.prev_hash) for r in first] == [(1, GENESIS_HASH), (2, first[0].hash)]
    more = chain(first[-1], [entry(3)])
    assert more[0].seq == 3 and more[0].prev_hash == first[-1].hash
    assert chain(None, []) == []


# checkpoints


def test_checkpoint_message_is_domain_separated() -> None:
    message = checkpoint_message(40, "ab" * 32)
    assert message == CHECKPOINT_DOMAIN + b"40:" + b"ab" * 32
    assert checkpoint_message(41, "ab" * 32) != message
    with pytest.raises(ValueError):
        checkpoint_message(40, "not-a-hash")


def test_checkpoint_is_signed_by_the_audit_key() -> None:
    records, _ = trail(5)
    checkpoint = make_checkpoint(SIGNER, records[-1], T0)
    assert (checkpoint.seq, checkpoint.hash, checkpoint.at) == (5, records[-1].hash, T0)
    assert checkpoint.key_id == public_key_fingerprint(KEY)
    assert verify_checkpoint(checkpoint, KEY)
    assert not verify_checkpoint(checkpoint, LocalSigner.generate().public_key())
    assert not verify_checkpoint(dataclasses.replace(checkpoint, seq=4), KEY)


def test_ed25519_audit_key_works_too() -> None:
    signer = LocalSigner.generate(KeyType.ED25519)
    records, _ = trail(3)
    checkpoint = make_checkpoint(signer, records[-1], T0)
    assert verify_chain(records, [checkpoint], signer.public_key()).ok


def test_checkpoint_time_must_be_aware() -> None:
    records, _ = trail(1)
    with pytest.raises(ValueError):
        make_checkpoint(SIGNER, records[0], datetime(2026, 1, 1))


# verify_chain on lists


def test_untouched_trail_verifies() -> None:
    records, checkpoints = trail()
    assert verify_chain(records, checkpoints, KEY) == ChainVerdict(
        ok=True, first_bad_seq=None, problem="", checked=50, last_checkpoint_seq=40
    )


def test_empty_trail_verifies() -> None:
    assert verify_chain([], [], KEY).ok


def test_checkpoints_need_the_public_key() -> None:
    records, checkpoints = trail()
    with pytest.raises(TypeError):
        verify_chain(records, checkpoints)


def assert_verdict(verdict: ChainVerdict, first_bad: int, problem: str) -> None:
    assert not verdict.ok
    assert verdict.problem == problem
    assert verdict.first_bad_seq == first_bad
    assert verdict.checked == first_bad - 1


def test_edited_record_is_found() -> None:
    records, checkpoints = trail()
    records[16] = dataclasses.replace(
        records[16], entry=dataclasses.replace(records[16].entry, outcome="rejected")
    )
    assert_verdict(verify_chain(records, checkpoints, KEY), 17, "record 17 was edited")


def test_edited_hash_field_is_found() -> None:
    records, checkpoints = trail()
    records[16] = dataclasses.replace(records[16], hash="f" * 64)
    assert_verdict(verify_chain(records, checkpoints, KEY), 17, "record 17 was edited")


def test_deleted_record_is_found() -> None:
    records, checkpoints = trail()
    del records[17]
    assert_verdict(verify_chain(records, checkpoints, KEY), 18, "record 18 is missing")


def test_several_deleted_records_are_found() -> None:
    records, checkpoints = trail()
    del records[17:20]
    assert_verdict(verify_chain(records, checkpoints, KEY), 18, "records 18 to 20 are missing")


def test_deleted_and_renumbered_record_is_found() -> None:
    records, checkpoints = trail()
    del records[17]
    records[17:] = [dataclasses.replace(r, seq=r.seq - 1) for r in records[17:]]
    assert_verdict(verify_chain(records, checkpoints, KEY), 18, "record 18 is missing")


def test_deleted_first_record_is_found() -> None:
    records, _ = trail(5)
    assert_verdict(verify_chain(records[1:], [], KEY), 1, "record 1 is missing")


def test_inserted_record_with_a_repeated_number_is_found() -> None:
    records, checkpoints = trail()
    forged = chain(records[7], [entry(99)])[0]  # a well-formed seq 9 after record 8
    records.insert(8, forged)
    assert_verdict(verify_chain(records, checkpoints, KEY), 9, "record 9 was inserted")


def test_inserted_and_renumbered_record_is_found() -> None:
    records, checkpoints = trail()
    forged = chain(records[7], [entry(99)])[0]
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in records[8:]]
    assert_verdict(
        verify_chain([*records[:8], forged, *shifted], checkpoints, KEY),
        9,
        "record 9 was inserted",
    )


def test_inserted_garbage_record_is_found() -> None:
    records, checkpoints = trail()
    garbage = AuditRecord(seq=9, entry=entry(99), prev_hash="1" * 64, hash="2" * 64)
    shifted = [dataclasses.replace(r, seq=r.seq + 1) for r in records[8:]]
    assert_verdict(
        verify_chain([*records[:8], garbage, *shifted], checkpoints, KEY),
        9,
        "record 9 was inserted",
    )


def test_reordered_records_are_found() -> None:
    records, checkpoints = trail()
    records[19], records[20] = records[20], records[19]
    assert_verdict(
        verify_chain(records, checkpoints, KEY), 20, "records 20 and 21 are out of order"
    )


def test_records_that_traded_numbers_are_found() -> None:
    records, checkpoints = trail()
    twenty, twenty_one = records[19], records[20]
    records[19] = dataclasses.replace(twenty_one, seq=20)
    records[20] = dataclasses.replace(twenty, seq=21)
    assert_verdict(
        verify_chain(records, checkpoints, KEY), 20, "records 20 and 21 are out of order"
    )


def test_tail_truncated_behind_a_checkpoint_is_found() -> None:
    records, checkpoints = trail()
    assert_verdict(
        verify_chain(records[:30], checkpoints, KEY),
        31,
        "checkpoint at 40 names a record that is gone (tail truncated)",
    )


def test_tail_after_the_last_checkpoint_can_be_truncated_unnoticed() -> None:
    # The documented limit: nothing signed vouches for records 41-50 yet.
    records, checkpoints = trail()
    verdict = verify_chain(records[:45], checkpoints, KEY)
    assert verdict.ok and verdict.checked == 45 and verdict.last_checkpoint_seq == 40


def test_consistently_rewritten_chain_is_caught_by_the_checkpoint() -> None:
    records, checkpoints = trail()
    records[24] = dataclasses.replace(
        records[24], entry=dataclasses.replace(records[24].entry, subject="someone-else")
    )
    rewritten = rehash(records, 24)
    assert verify_chain(rewritten, [], KEY).ok  # a bare hash chain cannot tell
    verdict = verify_chain(rewritten, checkpoints, KEY)
    assert_verdict(
        verdict, 21, "checkpoint at 40 does not match record 40 (records 21 to 40 were rewritten)"
    )
    assert verdict.last_checkpoint_seq == 20


def test_checkpoint_signed_by_another_key_is_found() -> None:
    records, checkpoints = trail(30)
    forged = make_checkpoint(LocalSigner.generate(), records[-1], T0)
    verdict = verify_chain(records, [*checkpoints, forged], KEY)
    assert not verdict.ok
    assert verdict.first_bad_seq == 30
    assert "checkpoint signature invalid" in verdict.problem


def test_checkpoint_moved_to_another_head_is_found() -> None:
    records, checkpoints = trail(50)
    moved = dataclasses.replace(checkpoints[-1], seq=30, hash=records[29].hash)
    verdict = verify_chain(records[:30], [checkpoints[0], moved], KEY)
    assert not verdict.ok and "checkpoint signature invalid" in verdict.problem


def test_verdict_rejects_contradictions() -> None:
    with pytest.raises(ValueError):
        ChainVerdict(ok=True, first_bad_seq=3, problem="", checked=1, last_checkpoint_seq=None)
    with pytest.raises(ValueError):
        ChainVerdict(ok=False, first_bad_seq=3, problem="", checked=1, last_checkpoint_seq=None)


# the writer


def test_writer_checkpoints_every_n_records_and_on_demand() -> None:
    store = MemoryStore()
    clock = FakeClock(T0)
    writer = AuditWriter(store, SIGNER, clock, every=10)
    for n in range(1, 26):
        clock.advance(1)
        writer.log([entry(n)])
    assert [cp.seq for cp in store.checkpoints()] == [10, 20]
    assert store.checkpoints()[0].at == T0 + timedelta(seconds=10)
    final = writer.checkpoint()
    assert final is not None and final.seq == 25
    assert writer.checkpoint() is None  # the head is already signed
    assert verify_chain(store.audit_records(), store.checkpoints(), KEY).ok


def test_writer_catches_up_with_records_the_store_appended() -> None:
    store = MemoryStore()
    writer = AuditWriter(store, SIGNER, FakeClock(T0), every=10)
    store.append_audit([entry(n) for n in range(1, 10)])
    assert writer.maybe_checkpoint() is None
    store.append_audit([entry(10), entry(11)])
    made = writer.maybe_checkpoint()
    assert made is not None and made.seq == 11
    assert writer.maybe_checkpoint() is None


def test_writer_on_an_empty_trail_signs_nothing() -> None:
    store = MemoryStore()
    assert AuditWriter(store, SIGNER, FakeClock(T0)).checkpoint() is None
    assert store.checkpoints() == []


def test_writer_resumes_after_a_restart() -> None:
    store = MemoryStore()
    AuditWriter(store, SIGNER, FakeClock(T0), every=5).log([entry(n) for n in range(1, 8)])
    restarted = AuditWriter(store, SIGNER, FakeClock(T0), every=5)
    assert restarted.checkpoint() is None  # seq 7 was signed by the first writer
    restarted.log([entry(8)])
    assert [cp.seq for cp in store.checkpoints()] == [7]


def test_two_writers_on_one_store_do_not_fail() -> None:
    store = MemoryStore()
    first = AuditWriter(store, SIGNER, FakeClock(T0), every=100)
    second = AuditWriter(store, SIGNER, FakeClock(T0), every=100)
    first.log([entry(1)])
    assert second.maybe_checkpoint() is None  # it now believes nothing is signed yet
    assert first.checkpoint() is not None
    assert second.checkpoint() is None
    assert [cp.seq for cp in store.checkpoints()] == [1]


class HeadOnlyStore(MemoryStore):
    """A store that counts head reads and refuses to page the trail: the writer must manage
    with the head alone, however long the trail is."""

    def __init__(self) -> None:
        super().__init__()
        self.head_reads = 0

    def audit_head(self) -> AuditRecord | None:
        self.head_reads += 1
        return super().audit_head()

    def audit_records(self, after_seq: int = 0, limit: int | None = None) -> list[AuditRecord]:
        raise AssertionError("the writer paged the audit trail")


def test_writer_reads_only_the_chain_head() -> None:
    store = HeadOnlyStore()
    writer = AuditWriter(store, SIGNER, FakeClock(T0), every=100)
    store.append_audit([entry(n) for n in range(1, 251)])
    made = writer.maybe_checkpoint()
    assert made is not None and made.seq == 250
    writer.log([entry(251)])
    assert writer.maybe_checkpoint() is None
    final = writer.checkpoint()
    assert final is not None and final.seq == 251
    assert store.head_reads == 4  # one per maybe_checkpoint, log and checkpoint call
    assert [cp.seq for cp in store.checkpoints()] == [250, 251]


def test_writer_on_the_sql_registry_signs_its_head(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'registry.db'}") as store:
        writer = AuditWriter(store, SIGNER, FakeClock(T0), every=3)
        store.append_audit([entry(n) for n in range(1, 3)])
        assert writer.maybe_checkpoint() is None
        writer.log([entry(3), entry(4)])
        head = store.audit_head()
        assert head is not None and head.seq == 4
        assert [(cp.seq, cp.hash) for cp in store.checkpoints()] == [(4, head.hash)]
        assert verify_chain(store.audit_records(), store.checkpoints(), KEY).ok


@pytest.mark.parametrize(("every", "error"), [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_writer_interval_must_be_a_positive_int(every: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        AuditWriter(MemoryStore(), SIGNER, FakeClock(T0), every=every)  # type: ignore[arg-type]


# tampering with the SQLite file itself


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A registry with 50 audit records and checkpoints at 20 and 40."""
    path = tmp_path / "registry.db"
    with SqlStore(f"sqlite:///{path}") as store:
        writer = AuditWriter(store, SIGNER, FakeClock(T0), every=20)
        for start in range(1, 51, 5):
            writer.log([entry(n) for n in range(start, start + 5)])
    return path


def verify_file(path: Path) -> ChainVerdict:
    with SqlStore(f"sqlite:///{path}") as store:
        return verify_chain(store.audit_records(), store.checkpoints(), KEY)


def tamper(path: Path, *statements: str, rows: list[tuple[object, ...]] | None = None) -> None:
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)
        if rows:
            connection.executemany(
                "INSERT INTO audit_event (seq, prev_hash, hash, actor, action, subject, outcome,"
                " at, reasons, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )


def row_of(record: AuditRecord) -> tuple[object, ...]:
    e = record.entry
    return (
        record.seq,
        record.prev_hash,
        record.hash,
        e.actor,
        e.action,
        e.subject,
        e.outcome,
        e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"),
        json.dumps(list(e.reasons)),
        json.dumps(e.detail),
    )


def read_records(path: Path) -> list[AuditRecord]:
    with SqlStore(f"sqlite:///{path}") as store:
        return store.audit_records()


def test_untampered_database_verifies(database: Path) -> None:
    verdict = verify_file(database)
    assert verdict.ok and verdict.checked == 50 and verdict.last_checkpoint_seq == 40


SqlTamper = Callable[[Path], None]


def _edit(path: Path) -> None:
    tamper(path, """UPDATE audit_event SET detail = '{"serial": "ffff"}' WHERE seq = 17""")


def _edit_time(path: Path) -> None:
    tamper(path, "UPDATE audit_event SET at = '2020-01-01 00:00:00.000000' WHERE seq = 17")


def _delete(path: Path) -> None:
    tamper(path, "DELETE FROM audit_event WHERE seq = 18")


def _reorder(path: Path) -> None:
    tamper(
        path,
        "UPDATE audit_event SET seq = -1 WHERE seq = 20",
        "UPDATE audit_event SET seq = 20 WHERE seq = 21",
        "UPDATE audit_event SET seq = 21 WHERE seq = -1",
    )


def _truncate(path: Path) -> None:
    tamper(path, "DELETE FROM audit_event WHERE seq > 30")


@pytest.mark.parametrize(
    ("attack", "first_bad", "problem"),
    [
        (_edit, 17, "record 17 was edited"),
        (_edit_time, 17, "record 17 was edited"),
        (_delete, 18, "record 18 is missing"),
        (_reorder, 20, "records 20 and 21 are out of order"),
        (_truncate, 31, "checkpoint at 40 names a record that is gone (tail truncated)"),
    ],
)
def test_tampered_database_is_caught(
    database: Path, attack: SqlTamper, first_bad: int, problem: str
) -> None:
    attack(database)
    assert_verdict(verify_file(database), first_bad, problem)


def test_row_slipped_into_the_database_is_caught(database: Path) -> None:
    records = read_records(database)
    forged = chain(records[7], [entry(99)])[0]
    tamper(
        database,
        "UPDATE audit_event SET seq = seq + 1000 WHERE seq >= 9",
        "UPDATE audit_event SET seq = seq - 999 WHERE seq >= 1009",
        rows=[row_of(forged)],
    )
    assert_verdict(verify_file(database), 9, "record 9 was inserted")


def test_rewritten_database_chain_is_caught_by_its_checkpoint(database: Path) -> None:
    records = read_records(database)
    records[24] = dataclasses.replace(
        records[24], entry=dataclasses.replace(records[24].entry, outcome="rejected")
    )
    rewritten = rehash(records, 24)
    tamper(
        database,
        "DELETE FROM audit_event WHERE seq >= 25",
        rows=[row_of(record) for record in rewritten[24:]],
    )
    verdict = verify_file(database)
    assert not verdict.ok and verdict.first_bad_seq == 21
    assert verdict.problem.startswith("checkpoint at 40 does not match record 40")


def test_truncation_covered_by_a_forged_checkpoint_is_caught(database: Path) -> None:
    records = read_records(database)
    forged = make_checkpoint(LocalSigner.generate(), records[29], T0)
    tamper(database, "DELETE FROM audit_event WHERE seq > 30", "DELETE FROM audit_checkpoint")
    with sqlite3.connect(database) as connection:
        connection.execute(
            "INSERT INTO audit_checkpoint (seq, hash, at, signature, key_id)"
            " VALUES (?, ?, ?, ?, ?)",
            (forged.seq, forged.hash, "2026-02-03 04:05:06.000000", forged.signature,
             forged.key_id),
        )
    verdict = verify_file(database)
    assert not verdict.ok and "checkpoint signature invalid" in verdict.problem


def test_checkpoint_signature_edited_in_the_database_is_caught(database: Path) -> None:
    with sqlite3.connect(database) as connection:
        connection.execute(
            "UPDATE audit_checkpoint SET signature = ? WHERE seq = 20", (b"\x30\x00",)
        )
    verdict = verify_file(database)
    assert not verdict.ok and verdict.first_bad_seq == 20
    assert "checkpoint signature invalid" in verdict.problem
