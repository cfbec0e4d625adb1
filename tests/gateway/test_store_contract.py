"""The rules every ``Store`` keeps, checked against the in-memory store and the SQL registry."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.audit import GENESIS_HASH, verify_chain
from gateway.lifecycle import TransitionError
from gateway.registry import SqlStore
from gateway.registry.sql_store import refusal_upsert
from gateway.store import (
    MAX_REFUSAL_COUNT,
    AuditCheckpoint,
    AuditEntry,
    CertificateRecord,
    CertificateStatus,
    DuplicateError,
    IdentityRecord,
    IdentityState,
    NonceCheck,
    NonceRecord,
    RefusalRecord,
    Store,
    StoredResponse,
    StoreError,
    TokenCheck,
    TokenRecord,
    refusal_key,
)
from gateway.store_memory import MemoryStore
from pki.profile import IdentityKind

T0 = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
BIG_SERIAL = (1 << 158) + 12345  # 159 bits, like the serials pki.issue draws


POSTGRES_ENV = "FLEETGATE_TEST_POSTGRES_URL"


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty database on the PostgreSQL server ``$FLEETGATE_TEST_POSTGRES_URL``
    names (CI starts one in .ci/run), dropped afterwards; the test is skipped without one."""
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        pytest.skip(f"no PostgreSQL server: set ${POSTGRES_ENV}")
    import psycopg

    admin = server.replace("postgresql+psycopg://", "postgresql://")
    name = f"fg_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "postgresql":
        with fresh_postgres_database() as url, SqlStore(url) as sql:
            yield sql
        return
    sql = SqlStore(f"sqlite:///{tmp_path / 'registry.db'}")
    yield sql
    sql.close()


def identity(
    name: str = "dev-1",
    state: IdentityState = IdentityState.ACTIVE,
    *,
    kind: IdentityKind = IdentityKind.DEVICE,
    birth: str | None = None,
) -> IdentityRecord:
    return IdentityRecord(
        id=name,
        kind=kind,
        state=state,
        created_at=T0,
        updated_at=T0,
        manufacturer="Acme",
        model="TH-1",
        firmware_version="1.2.3",
        firmware_digest="ab" * 32,
        birth_fingerprint=birth if birth is not None else f"birth-{name}",
    )


def certificate(
    serial: int, owner: str = "dev-1", key: str | None = None, issued: datetime = T0
) -> CertificateRecord:
    return CertificateRecord(
        serial=serial,
        identity_id=owner,
        public_key_fingerprint=key if key is not None else f"key-{serial:x}",
        not_before=issued - timedelta(seconds=60),
        not_after=issued + timedelta(hours=1),
        issued_at=issued,
        pem=f"-----BEGIN CERTIFICATE-----\n{serial:x}\n-----END CERTIFICATE-----\n",
        request_id=f"req-{serial:x}",
    )


def response(
    owner: str = "dev-1", request_id: str = "req-1", outcome: str = "issued"
) -> StoredResponse:
    return StoredResponse(
        identity_id=owner,
        request_id=request_id,
        kind="enroll",
        outcome=outcome,
        payload=b'{"type":"' + outcome.encode() + b'"}',
        at=T0,
        request_digest="cd" * 32,
        reason=None if outcome != "rejected" else "nonce_expired",
    )


def entry(action: str = "enroll", subject: str = "dev-1", **detail: str) -> AuditEntry:
    return AuditEntry(
        actor=f"device:{subject}",
        action=action,
        subject=subject,
        outcome="ok",
        at=T0,
        reasons=("r1",) if detail else (),
        detail=detail,
    )


def snapshot(store: Store) -> tuple[object, ...]:
    """Everything a refused call must leave untouched."""
    return (
        store.list_identities(),
        store.certificates_for("dev-1"),
        store.certificates_for("dev-2"),
        store.get_response("dev-1", "req-1"),
        store.get_response("dev-1", "req-2"),
        store.audit_records(),
    )


# identities


def test_identity_round_trips_every_field(store: Store) -> None:
    record = dataclasses.replace(
        identity(), role=None, last_seen_at=T0 + timedelta(microseconds=7), reattest_required=True
    )
    store.put_identity(record)
    assert store.get_identity("dev-1") == record
    assert store.get_identity("nobody") is None


def test_put_identity_replaces_by_id(store: Store) -> None:
    store.put_identity(identity(state=IdentityState.PENDING))
    store.put_identity(dataclasses.replace(identity(), firmware_version="2.0.0"))
    assert store.get_identity("dev-1") == dataclasses.replace(identity(), firmware_version="2.0.0")
    assert len(store.list_identities()) == 1


def test_times_in_other_zones_come_back_as_the_same_instant(store: Store) -> None:
    plus_two = datetime(2026, 3, 1, 14, 0, tzinfo=UTC).astimezone(timezone(timedelta(hours=2)))
    store.put_identity(dataclasses.replace(identity(), created_at=plus_two))
    got = store.get_identity("dev-1")
    assert got is not None
    assert got.created_at == plus_two
    assert got.created_at.utcoffset() == timedelta(0)


def test_list_identities_filters_by_kind_and_state(store: Store) -> None:
    store.put_identity(identity("b-dev", IdentityState.ACTIVE))
    store.put_identity(identity("a-dev", IdentityState.PENDING))
    store.put_identity(identity("alice", IdentityState.ACTIVE, kind=IdentityKind.OPERATOR))
    assert [i.id for i in store.list_identities()] == ["a-dev", "alice", "b-dev"]
    assert [i.id for i in store.list_identities(kind=IdentityKind.DEVICE)] == ["a-dev", "b-dev"]
    assert [i.id for i in store.list_identities(state=IdentityState.ACTIVE)] == ["alice", "b-dev"]
    assert [
        i.id for i in store.list_identities(kind=IdentityKind.DEVICE, state=IdentityState.PENDING)
    ] == ["a-dev"]
    assert store.list_identities(state=IdentityState.REVOKED) == []


def test_find_by_birth_fingerprint(store: Store) -> None:
    store.put_identity(identity("dev-1", birth="f1"))
    found = store.find_by_birth_fingerprint("f1")
    assert found is not None and found.id == "dev-1"
    assert store.find_by_birth_fingerprint("f2") is None


def test_birth_certificate_cannot_belong_to_two_identities(store: Store) -> None:
    store.put_identity(identity("dev-1", birth="f1"), [entry()])
    before = snapshot(store)
    with pytest.raises(DuplicateError):
        store.put_identity(identity("dev-2", birth="f1"), [entry(subject="dev-2")])
    assert snapshot(store) == before


def test_put_identity_appends_its_audit_events(store: Store) -> None:
    store.put_identity(identity(), [entry("enroll"), entry("approve")])
    assert [r.entry.action for r in store.audit_records()] == ["enroll", "approve"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"created_at": datetime(2026, 1, 1)}, ValueError),  # naive: its zone would be a guess
        ({"kind": "robot"}, ValueError),
        ({"state": "sleeping"}, ValueError),
    ],
)
def test_bad_identity_is_refused_and_nothing_written(
    store: Store, change: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        store.put_identity(dataclasses.replace(identity(), **change), [entry()])  # type: ignore[arg-type]
    assert store.list_identities() == []
    assert store.audit_records() == []


def test_touch_sets_last_seen_only(store: Store) -> None:
    store.put_identity(identity())
    seen = T0 + timedelta(minutes=5)
    store.touch("dev-1", seen)
    assert store.get_identity("dev-1") == dataclasses.replace(identity(), last_seen_at=seen)
    assert store.audit_records() == []


def test_touch_unknown_identity_is_a_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        store.touch("ghost", T0)


def test_touch_with_naive_time_is_refused(store: Store) -> None:
    store.put_identity(identity())
    with pytest.raises(ValueError):
        store.touch("dev-1", datetime(2026, 1, 1))
    assert store.get_identity("dev-1") == identity()


def test_touch_many_writes_the_known_and_skips_the_unknown(store: Store) -> None:
    store.put_identity(identity())
    store.put_identity(identity("dev-2"))
    first, second = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    assert store.touch_many({"dev-1": first, "dev-2": second, "ghost": second}) == 2
    assert store.get_identity("dev-1") == dataclasses.replace(identity(), last_seen_at=first)
    assert store.get_identity("dev-2").last_seen_at == second  # type: ignore[union-attr]
    assert store.get_identity("ghost") is None
    assert store.touch_many({}) == 0
    assert store.audit_records() == []


def test_touch_many_with_a_naive_time_writes_nothing(store: Store) -> None:
    store.put_identity(identity())
    with pytest.raises(ValueError):
        store.touch_many({"dev-1": datetime(2026, 1, 1)})
    assert store.get_identity("dev-1") == identity()


# nonces


def nonce(value: bytes = b"\x01" * 16, device: str = "dev-1", ttl: float = 30) -> NonceRecord:
    return NonceRecord(
        value=value, device_id=device, issued_at=T0, expires_at=T0 + timedelta(seconds=ttl)
    )


def test_nonce_is_single_use(store: Store) -> None:
    store.put_nonce(nonce())
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0 + timedelta(seconds=1)) is NonceCheck.OK
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0 + timedelta(seconds=2)) is (
        NonceCheck.REUSED
    )


def test_a_challenge_and_its_nonce_are_stored_together_or_not_at_all(store: Store) -> None:
    challenge = response(request_id="hello-1", outcome="challenge")
    store.record_outcome(response=challenge, nonce=nonce())
    assert store.get_response("dev-1", "hello-1") == challenge
    # a nonce drawn twice (or a challenge stored twice): nothing of the second is written
    again = response(request_id="hello-2", outcome="challenge")
    with pytest.raises(DuplicateError):
        store.record_outcome(response=again, nonce=nonce())
    assert store.get_response("dev-1", "hello-2") is None
    with pytest.raises(DuplicateError):
        store.record_outcome(response=challenge, nonce=nonce(b"\x02" * 16))
    assert store.consume_nonce(b"\x02" * 16, "dev-1", T0) is NonceCheck.UNKNOWN
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK


def test_unknown_nonce(store: Store) -> None:
    assert store.consume_nonce(b"\x09" * 16, "dev-1", T0) is NonceCheck.UNKNOWN


def test_nonce_expires_at_its_deadline(store: Store) -> None:
    store.put_nonce(nonce(ttl=30))
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0 + timedelta(seconds=30)) is (
        NonceCheck.EXPIRED
    )


def test_nonce_of_another_device_is_refused_and_stays_usable(store: Store) -> None:
    store.put_nonce(nonce(device="dev-1"))
    assert store.consume_nonce(b"\x01" * 16, "dev-2", T0) is NonceCheck.OTHER_DEVICE
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK


def test_nonce_cannot_be_issued_twice(store: Store) -> None:
    store.put_nonce(nonce(device="dev-1"))
    with pytest.raises(DuplicateError):
        store.put_nonce(nonce(device="dev-2"))
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK


@pytest.mark.parametrize(
    ("value", "error"), [("0101", TypeError), (b"", ValueError), (b"x" * 65, ValueError)]
)
def test_bad_nonce_value_is_refused(store: Store, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        store.put_nonce(dataclasses.replace(nonce(), value=value))  # type: ignore[arg-type]
    with pytest.raises(error):
        store.consume_nonce(value, "dev-1", T0)  # type: ignore[arg-type]


def test_consume_nonce_with_naive_time_is_refused(store: Store) -> None:
    store.put_nonce(nonce())
    with pytest.raises(ValueError):
        store.consume_nonce(b"\x01" * 16, "dev-1", datetime(2026, 3, 1, 12))
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK


def test_concurrent_consumers_of_one_nonce_get_exactly_one_ok(store: Store) -> None:
    store.put_nonce(nonce())
    results: list[NonceCheck] = []
    barrier = threading.Barrier(6)

    def consume() -> None:
        barrier.wait()
        results.append(store.consume_nonce(b"\x01" * 16, "dev-1", T0))

    threads = [threading.Thread(target=consume) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted([NonceCheck.OK] + [NonceCheck.REUSED] * 5)


# bootstrap tokens


def token(token_hash: str = "ee" * 32, device: str = "dev-9", ttl: float = 3600) -> TokenRecord:
    return TokenRecord(
        token_hash=token_hash,
        device_id=device,
        created_at=T0,
        expires_at=T0 + timedelta(seconds=ttl),
        created_by="cli:root",
    )


def test_token_is_single_use_and_audited(store: Store) -> None:
    store.put_token(token(), [entry("token_create", "dev-9")])
    assert [r.entry.action for r in store.audit_records()] == ["token_create"]
    assert store.consume_token("ee" * 32, "dev-9", T0) is TokenCheck.OK
    assert store.consume_token("ee" * 32, "dev-9", T0) is TokenCheck.REUSED


def test_token_unknown_expired_other_device(store: Store) -> None:
    store.put_token(token(ttl=10))
    assert store.consume_token("ff" * 32, "dev-9", T0) is TokenCheck.UNKNOWN
    assert store.consume_token("ee" * 32, "dev-8", T0) is TokenCheck.OTHER_DEVICE
    assert store.consume_token("ee" * 32, "dev-9", T0 + timedelta(seconds=10)) is (
        TokenCheck.EXPIRED
    )


def test_token_cannot_be_created_twice(store: Store) -> None:
    store.put_token(token(), [entry("token_create", "dev-9")])
    with pytest.raises(DuplicateError):
        store.put_token(token(device="dev-7"), [entry("token_create", "dev-7")])
    assert len(store.audit_records()) == 1
    assert store.consume_token("ee" * 32, "dev-7", T0) is TokenCheck.OTHER_DEVICE


def test_token_with_naive_expiry_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.put_token(dataclasses.replace(token(), expires_at=datetime(2027, 1, 1)))
    assert store.consume_token("ee" * 32, "dev-9", T0) is TokenCheck.UNKNOWN


# certificates and outcomes


def issue(store: Store, serial: int, request_id: str, **kwargs: object) -> None:
    store.record_outcome(
        response=response(request_id=request_id),
        identity=identity(),
        certificate=certificate(serial, **kwargs),  # type: ignore[arg-type]
        audit=[entry("issue", serial=f"{serial:x}")],
    )


def test_record_outcome_stores_everything_in_one_go(store: Store) -> None:
    issue(store, BIG_SERIAL, "req-1")
    assert store.get_identity("dev-1") == identity()
    assert store.get_certificate(BIG_SERIAL) == certificate(BIG_SERIAL)
    assert store.certificates_for("dev-1") == [certificate(BIG_SERIAL)]
    assert store.get_response("dev-1", "req-1") == response()
    assert store.key_fingerprint_used(f"key-{BIG_SERIAL:x}")
    assert not store.key_fingerprint_used("key-other")
    assert [r.entry.detail for r in store.audit_records()] == [{"serial": f"{BIG_SERIAL:x}"}]


def test_largest_and_smallest_serials_round_trip(store: Store) -> None:
    store.put_identity(identity())
    for number, serial in enumerate((1, 2**160 - 1)):
        store.record_outcome(
            response=response(request_id=f"req-{number}"), certificate=certificate(serial)
        )
    assert store.get_certificate(1) is not None
    assert store.get_certificate(2**160 - 1) is not None


@pytest.mark.parametrize(
    ("serial", "error"),
    [(0, ValueError), (-5, ValueError), (2**160, ValueError), (True, TypeError)],
)
def test_bad_serial_is_refused_and_nothing_written(
    store: Store, serial: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        store.record_outcome(
            response=response(), identity=identity(), certificate=certificate(serial)
        )
    assert snapshot(store) == ([], [], [], None, None, [])


def test_new_certificate_supersedes_the_active_one(store: Store) -> None:
    store.put_identity(identity("dev-2", birth="b2"))
    store.record_outcome(
        response=response("dev-2", "r"), certificate=certificate(7, owner="dev-2")
    )
    issue(store, 10, "req-1")
    issue(store, 11, "req-2", issued=T0 + timedelta(minutes=40))
    statuses = [(c.serial, c.status) for c in store.certificates_for("dev-1")]
    assert statuses == [(10, CertificateStatus.SUPERSEDED), (11, CertificateStatus.ACTIVE)]
    assert store.certificates_for("dev-2")[0].status is CertificateStatus.ACTIVE


def test_active_certificates_lists_the_one_in_force_per_identity(store: Store) -> None:
    issue(store, 10, "req-1")
    issue(store, 11, "req-2", issued=T0 + timedelta(minutes=40))  # supersedes 10
    for name, serial in (("dev-2", 20), ("dev-3", 30)):
        store.put_identity(identity(name, birth=f"b-{name}"))
        store.record_outcome(response=response(name, "r"), certificate=certificate(serial, name))
    store.change_state("dev-3", IdentityState.REVOKED, T0, [entry("revoke", "dev-3")])
    active = store.active_certificates()
    assert [(c.identity_id, c.serial) for c in active] == [("dev-1", 11), ("dev-2", 20)]
    assert active[0] == store.certificates_for("dev-1")[-1]


def test_a_certificate_without_its_identity_still_supersedes(store: Store) -> None:
    issue(store, 10, "req-1")
    store.record_outcome(response=response(request_id="req-2"), certificate=certificate(11))
    statuses = [(c.serial, c.status) for c in store.certificates_for("dev-1")]
    assert statuses == [(10, CertificateStatus.SUPERSEDED), (11, CertificateStatus.ACTIVE)]


@pytest.mark.parametrize("with_identity", [True, False], ids=["with-identity", "certificate-only"])
def test_concurrent_renewals_leave_one_active_certificate(
    store: Store, with_identity: bool
) -> None:
    """Renewals of one device racing each other (two gateways, two workers) all succeed, and
    exactly one certificate stays active: each outcome waits for the one before it and
    supersedes what that one added."""
    issue(store, 0x100, "enroll-1")
    workers = 6
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []

    def renew(n: int) -> None:
        try:
            barrier.wait()
            store.record_outcome(
                response=response(request_id=f"renew-{n}"),
                identity=identity() if with_identity else None,
                certificate=certificate(0x200 + n, issued=T0 + timedelta(seconds=n)),
                audit=[entry("renew")],
            )
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=renew, args=(n,)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    statuses = [c.status for c in store.certificates_for("dev-1")]
    assert len(statuses) == workers + 1
    assert statuses.count(CertificateStatus.ACTIVE) == 1
    assert verify_chain(store.audit_records(), []).ok


def test_response_without_certificate_for_unknown_device(store: Store) -> None:
    store.record_outcome(
        response=response("stranger", "hello-1", "rejected"),
        audit=[entry("reject", "stranger")],
    )
    assert store.get_response("stranger", "hello-1") == response("stranger", "hello-1", "rejected")
    assert store.get_identity("stranger") is None


def test_get_response_unknown_is_none(store: Store) -> None:
    assert store.get_response("dev-1", "nope") is None


@pytest.mark.parametrize("clash", ["serial", "key"])
def test_duplicate_certificate_writes_nothing(store: Store, clash: str) -> None:
    issue(store, 10, "req-1")
    before = snapshot(store)
    changed = dataclasses.replace(identity(), firmware_version="9.9.9")
    duplicate = (
        certificate(10, key="key-fresh") if clash == "serial" else certificate(99, key="key-a")
    )
    with pytest.raises(DuplicateError):
        store.record_outcome(
            response=response(request_id="req-2"),
            identity=changed,
            certificate=duplicate,
            audit=[entry("issue")],
        )
    assert snapshot(store) == before
    assert store.get_certificate(10) == certificate(10)


def test_duplicate_key_fingerprint_across_identities(store: Store) -> None:
    issue(store, 10, "req-1", key="shared")
    store.put_identity(identity("dev-2", birth="b2"))
    before = snapshot(store)
    with pytest.raises(DuplicateError):
        store.record_outcome(
            response=response("dev-2", "req-1"), certificate=certificate(20, "dev-2", "shared")
        )
    assert snapshot(store) == before


def test_answered_request_cannot_be_answered_again(store: Store) -> None:
    issue(store, 10, "req-1")
    before = snapshot(store)
    with pytest.raises(DuplicateError):
        store.record_outcome(response=response(outcome="rejected"), audit=[entry("reject")])
    assert snapshot(store) == before


def test_pending_answer_is_replaced_when_the_approved_request_is_retried(store: Store) -> None:
    store.record_outcome(
        response=response(outcome="pending"),
        identity=identity(state=IdentityState.PENDING),
        audit=[entry("enroll")],
    )
    store.change_state("dev-1", IdentityState.ACTIVE, T0, [entry("approve")])
    store.record_outcome(response=response(), certificate=certificate(10), audit=[entry("issue")])
    assert store.get_response("dev-1", "req-1") == response()
    assert [c.serial for c in store.certificates_for("dev-1")] == [10]
    with pytest.raises(DuplicateError):
        store.record_outcome(response=response(outcome="pending"))


# retention: answers and nonces past the protocol's use are pruned, a bounded batch at a time


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def answered(store: Store, request_id: str, at: datetime, outcome: str = "issued") -> None:
    given = dataclasses.replace(response(request_id=request_id, outcome=outcome), at=at)
    store.record_outcome(response=given)


def kept_answers(store: Store, request_ids: list[str]) -> list[str]:
    return [r for r in request_ids if store.get_response("dev-1", r) is not None]


def test_answers_older_than_the_cutoff_are_pruned_oldest_first_in_bounded_batches(
    store: Store,
) -> None:
    ids = [f"req-{n}" for n in range(8)]
    for n, outcome in enumerate(["issued", "challenge", "rejected", "issued"] * 2):
        answered(store, ids[n], minutes(n), outcome)
    cutoff = minutes(5)  # req-0 .. req-4 are older
    assert store.prune_responses(cutoff, cutoff, limit=3) == 3
    assert kept_answers(store, ids) == ids[3:]
    assert store.prune_responses(cutoff, cutoff, limit=3) == 2
    assert store.prune_responses(cutoff, cutoff, limit=3) == 0
    assert kept_answers(store, ids) == ids[5:]
    # an answer given exactly at the cutoff is not older than it
    assert store.prune_responses(minutes(5), minutes(5), limit=10) == 0


def test_a_pending_answer_is_kept_until_its_own_cutoff(store: Store) -> None:
    answered(store, "waiting", minutes(0), "pending")
    answered(store, "done", minutes(1), "issued")
    assert store.prune_responses(minutes(60), minutes(0), limit=10) == 1
    assert kept_answers(store, ["waiting", "done"]) == ["waiting"]
    assert store.prune_responses(minutes(60), minutes(1), limit=10) == 1
    assert kept_answers(store, ["waiting", "done"]) == []


def test_a_pruned_request_is_judged_afresh(store: Store) -> None:
    issue(store, 10, "req-1")
    assert store.prune_responses(minutes(1), minutes(1), limit=10) == 1
    assert store.get_response("dev-1", "req-1") is None
    # the same (device, request id) can be answered again; the certificate row stays
    store.record_outcome(response=response(outcome="rejected"), audit=[entry("reject")])
    assert store.get_response("dev-1", "req-1") == response(outcome="rejected")
    assert [c.serial for c in store.certificates_for("dev-1")] == [10]


def test_nonces_past_the_cutoff_are_pruned_used_or_not(store: Store) -> None:
    values = [bytes([n]) * 16 for n in range(1, 6)]
    for n, value in enumerate(values):
        store.put_nonce(nonce(value, ttl=60 * (n + 1)))  # expire at T0 + 1 .. 5 minutes
    assert store.consume_nonce(values[0], "dev-1", T0) is NonceCheck.OK
    assert store.prune_nonces(minutes(3.5), limit=2) == 2  # the two that expired first
    assert store.prune_nonces(minutes(3.5), limit=2) == 1
    assert store.prune_nonces(minutes(3.5), limit=2) == 0
    # a pruned nonce is unknown, never usable again; the others keep their rules
    assert store.consume_nonce(values[0], "dev-1", T0) is NonceCheck.UNKNOWN
    assert store.consume_nonce(values[1], "dev-1", T0) is NonceCheck.UNKNOWN
    assert store.consume_nonce(values[3], "dev-1", T0) is NonceCheck.OK
    assert store.consume_nonce(values[4], "dev-1", minutes(5)) is NonceCheck.EXPIRED


def test_pruning_answers_leaves_nonces_and_the_audit_trail_alone(store: Store) -> None:
    challenge = response(request_id="hello-1", outcome="challenge")
    store.record_outcome(response=challenge, nonce=nonce(ttl=3600))
    issue(store, 10, "req-2")
    audit = store.audit_records()
    assert store.prune_responses(minutes(1), minutes(1), limit=10) == 2
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK
    assert store.prune_nonces(minutes(1), limit=10) == 0  # expires in an hour
    assert store.audit_records() == audit
    assert store.get_identity("dev-1") is not None


def test_a_limit_of_zero_prunes_nothing(store: Store) -> None:
    answered(store, "req-1", T0)
    store.put_nonce(nonce(ttl=1))
    assert store.prune_responses(minutes(9), minutes(9), limit=0) == 0
    assert store.prune_nonces(minutes(9), limit=0) == 0
    assert store.get_response("dev-1", "req-1") is not None


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.prune_responses(datetime(2026, 1, 1), T0, 10), ValueError),
        (lambda s: s.prune_responses(T0, datetime(2026, 1, 1), 10), ValueError),
        (lambda s: s.prune_nonces(datetime(2026, 1, 1), 10), ValueError),
        (lambda s: s.prune_responses(T0, T0, -1), ValueError),
        (lambda s: s.prune_nonces(T0, -1), ValueError),
        (lambda s: s.prune_nonces(T0, "10"), TypeError),
        (lambda s: s.prune_responses("2026-01-01", T0, 10), TypeError),
    ],
)
def test_bad_prune_arguments_are_refused_and_nothing_deleted(
    store: Store, call: Callable[[Store], int], error: type[Exception]
) -> None:
    answered(store, "req-1", T0)
    store.put_nonce(nonce(ttl=1))
    with pytest.raises(error):
        call(store)
    assert store.get_response("dev-1", "req-1") is not None
    assert store.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK


def test_certificate_for_unknown_identity_is_a_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        store.record_outcome(
            response=response("ghost"), certificate=certificate(5, "ghost"), audit=[entry()]
        )
    assert store.get_response("ghost", "req-1") is None
    assert store.audit_records() == []


def test_bad_audit_entry_rolls_back_the_whole_outcome(store: Store) -> None:
    naive = dataclasses.replace(entry(), at=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        store.record_outcome(
            response=response(), identity=identity(), certificate=certificate(5), audit=[naive]
        )
    assert snapshot(store) == ([], [], [], None, None, [])
    assert not store.key_fingerprint_used("key-5")


def test_audit_detail_must_be_text(store: Store) -> None:
    with pytest.raises(TypeError):
        store.append_audit([dataclasses.replace(entry(), detail={"count": 3})])  # type: ignore[dict-item]
    assert store.audit_records() == []


# lifecycle


def test_change_state_returns_the_updated_identity(store: Store) -> None:
    store.put_identity(identity(state=IdentityState.PENDING))
    later = T0 + timedelta(minutes=1)
    changed = store.change_state("dev-1", IdentityState.ACTIVE, later, [entry("approve")])
    assert changed == dataclasses.replace(identity(), state=IdentityState.ACTIVE, updated_at=later)
    assert store.get_identity("dev-1") == changed
    assert [r.entry.action for r in store.audit_records()] == ["approve"]


def test_quarantine_and_release(store: Store) -> None:
    store.put_identity(identity())
    store.change_state("dev-1", IdentityState.QUARANTINED, T0)
    store.change_state("dev-1", IdentityState.ACTIVE, T0)
    got = store.get_identity("dev-1")
    assert got is not None and got.state is IdentityState.ACTIVE


@pytest.mark.parametrize(
    ("start", "wanted"),
    [
        (IdentityState.ACTIVE, IdentityState.PENDING),
        (IdentityState.ACTIVE, IdentityState.ACTIVE),
        (IdentityState.REVOKED, IdentityState.ACTIVE),
        (IdentityState.QUARANTINED, IdentityState.PENDING),
    ],
)
def test_forbidden_transition_changes_nothing(
    store: Store, start: IdentityState, wanted: IdentityState
) -> None:
    store.put_identity(identity(state=start))
    with pytest.raises(TransitionError):
        store.change_state("dev-1", wanted, T0 + timedelta(hours=1), [entry("approve")])
    assert store.get_identity("dev-1") == identity(state=start)
    assert store.audit_records() == []


def test_change_state_of_unknown_identity_is_a_key_error(store: Store) -> None:
    with pytest.raises(KeyError):
        store.change_state("ghost", IdentityState.REVOKED, T0, [entry("revoke", "ghost")])
    assert store.audit_records() == []


def test_revoke_marks_every_certificate_revoked(store: Store) -> None:
    issue(store, 10, "req-1")
    issue(store, 11, "req-2")
    store.put_identity(identity("dev-2", birth="b2"))
    store.record_outcome(response=response("dev-2", "r"), certificate=certificate(20, "dev-2"))
    when = T0 + timedelta(minutes=3)
    store.change_state(
        "dev-1", IdentityState.REVOKED, when, [entry("revoke")], revocation_reason="key_compromise"
    )
    revoked = store.revoked_certificates()
    assert [c.serial for c in revoked] == [10, 11]
    assert all(
        c.status is CertificateStatus.REVOKED
        and c.revoked_at == when
        and c.revocation_reason == "key_compromise"
        for c in revoked
    )
    assert store.get_certificate(20) == certificate(20, "dev-2")


# audit trail


def test_audit_is_chained_across_every_kind_of_call(store: Store) -> None:
    store.put_identity(identity(state=IdentityState.PENDING), [entry("enroll")])
    store.change_state("dev-1", IdentityState.ACTIVE, T0, [entry("approve")])
    store.record_outcome(
        response=response(), certificate=certificate(10), audit=[entry("issue"), entry("note")]
    )
    store.put_token(token(), [entry("token_create", "dev-9")])
    appended = store.append_audit([entry("login", "alice")])
    records = store.audit_records()
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    assert appended == records[-1:]
    assert verify_chain(records, []).ok


def test_audit_records_pages(store: Store) -> None:
    store.append_audit([entry(str(n)) for n in range(5)])
    assert [r.seq for r in store.audit_records(after_seq=2)] == [3, 4, 5]
    assert [r.seq for r in store.audit_records(after_seq=1, limit=2)] == [2, 3]
    assert store.audit_records(after_seq=5) == []
    assert store.audit_records(limit=0) == []
    with pytest.raises(ValueError):
        store.audit_records(limit=-1)


def test_audit_head_is_the_newest_record(store: Store) -> None:
    assert store.audit_head() is None
    store.put_identity(identity(state=IdentityState.PENDING), [entry("enroll")])
    assert store.audit_head() == store.audit_records()[-1]
    store.change_state("dev-1", IdentityState.ACTIVE, T0, [entry("approve"), entry("note")])
    head = store.audit_head()
    assert head is not None and (head.seq, head.entry.action) == (3, "note")
    assert head == store.audit_records()[-1]


def test_audit_head_moves_with_every_audited_change_only(store: Store) -> None:
    store.put_identity(identity(), [entry("enroll")])
    before = store.audit_head()
    store.touch("dev-1", T0 + timedelta(minutes=1))
    store.put_nonce(nonce())
    assert store.audit_head() == before
    store.record_outcome(response=response(), certificate=certificate(10), audit=[entry("issue")])
    after = store.audit_head()
    assert after is not None and before is not None and after.seq == before.seq + 1


def test_audit_head_is_not_moved_by_a_refused_change(store: Store) -> None:
    store.put_identity(identity(), [entry("enroll")])
    before = store.audit_head()
    with pytest.raises(TransitionError):
        store.change_state("dev-1", IdentityState.PENDING, T0, [entry("oops")])
    assert store.audit_head() == before


def test_audit_head_cannot_be_changed_through_its_dict(store: Store) -> None:
    store.append_audit([entry(note="a")])
    head = store.audit_head()
    assert head is not None
    head.entry.detail["note"] = "changed after read"
    assert store.audit_records()[0].entry.detail == {"note": "a"}


def test_append_nothing_is_a_no_op(store: Store) -> None:
    assert store.append_audit([]) == []
    assert store.audit_records() == []


def test_audit_entries_round_trip_exactly(store: Store) -> None:
    unusual = AuditEntry(
        actor="operator:zoë",
        action="quarantine",
        subject="dev-1",
        outcome="ok",
        at=T0,
        reasons=("firmware_not_allowed", "manual"),
        detail={"note": 'quotes " and \\ and ünïcode', "ticket": "42"},
    )
    stored = store.append_audit([unusual])
    assert store.audit_records() == stored
    assert stored[0].entry == unusual


def test_stored_audit_cannot_be_changed_through_a_returned_dict(store: Store) -> None:
    original = entry(note="a")
    store.append_audit([original])
    original.detail["note"] = "changed after append"
    store.audit_records()[0].entry.detail["note"] = "changed after read"
    assert store.audit_records()[0].entry.detail == {"note": "a"}


def test_checkpoints_are_kept_in_order_and_unique(store: Store) -> None:
    first = AuditCheckpoint(seq=5, hash="aa" * 32, at=T0, signature=b"sig5", key_id="k" * 64)
    second = dataclasses.replace(first, seq=2, signature=b"sig2")
    store.put_checkpoint(first)
    store.put_checkpoint(second)
    assert store.checkpoints() == [second, first]
    with pytest.raises(DuplicateError):
        store.put_checkpoint(dataclasses.replace(first, signature=b"other"))
    assert store.checkpoints() == [second, first]


def test_checkpoint_with_naive_time_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        store.put_checkpoint(
            AuditCheckpoint(seq=1, hash="aa" * 32, at=datetime(2026, 1, 1), signature=b"s",
                            key_id="k")
        )
    assert store.checkpoints() == []


def test_concurrent_writers_keep_one_unbroken_chain(store: Store) -> None:
    store.put_identity(identity(state=IdentityState.PENDING))
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(5):
                store.append_audit([entry(f"w{worker}-{n}")])
                store.record_outcome(
                    response=response(request_id=f"w{worker}-{n}", outcome="rejected"),
                    audit=[entry("reject")],
                )
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    records = store.audit_records()
    assert len(records) == 40
    assert verify_chain(records, []).ok


# refused connections

FP_A = "a1" * 32
FP_B = "b2" * 32
CA_ISSUER = "CN=Someone Else's CA,O=Elsewhere"


def refusal(
    fingerprint: str | None = FP_A,
    *,
    at: datetime = T0,
    first: datetime | None = None,
    client: str | None = "dev-x",
    remote: str = "10.0.0.7:50001",
    reason: str = "unknown_ca",
    listener: str = "operational",
    count: int = 1,
) -> RefusalRecord:
    # Aggregated per certificate when there is one, else per client id (the gateway's rule).
    return RefusalRecord(
        key=refusal_key(listener, reason, fingerprint, None if fingerprint else client),
        listener=listener,
        reason=reason,
        client_id=client,
        cert_subject=None if fingerprint is None else f"CN={client}",
        cert_issuer=None if fingerprint is None else CA_ISSUER,
        cert_fingerprint=fingerprint,
        remote=remote,
        first_seen=at if first is None else first,
        last_seen=at,
        count=count,
    )


def seconds(n: float) -> datetime:
    return T0 + timedelta(seconds=n)


def test_refusal_round_trips_every_field(store: Store) -> None:
    plus_two = timezone(timedelta(hours=2))
    record = RefusalRecord(
        key=refusal_key("operational", "unknown_ca", FP_A, None),
        listener="operational",
        reason="unknown_ca",
        client_id="capteur-zoë/7 \"quoted\"",
        cert_subject="CN=capteur-zoë,O=Acme\\, Inc.",
        cert_issuer=CA_ISSUER,
        cert_fingerprint=FP_A,
        remote="[2001:db8::17]:50001",
        first_seen=seconds(-30).astimezone(plus_two),
        last_seen=seconds(0).astimezone(plus_two),
        count=41,
    )
    store.record_refusals([record])
    got = store.refusals()
    assert got == [record]
    assert got[0].first_seen.utcoffset() == timedelta(0)
    assert got[0].last_seen.utcoffset() == timedelta(0)


def test_refusals_with_nothing_identifying_round_trip(store: Store) -> None:
    bare = refusal(None, client=None, reason="no_client_certificate")
    store.record_refusals([bare])
    assert store.refusals() == [bare]


def test_repeated_refusals_of_one_source_are_one_row(store: Store) -> None:
    store.record_refusals([refusal(at=seconds(0), remote="10.0.0.7:50001", count=2)])
    store.record_refusals([refusal(at=seconds(5), remote="10.0.0.7:50002")])
    store.record_refusals([refusal(at=seconds(9), remote="10.0.0.8:40000", count=5)])
    assert store.refusals() == [
        dataclasses.replace(
            refusal(at=seconds(9), remote="10.0.0.8:40000"), first_seen=seconds(0), count=8
        )
    ]


def test_an_older_sighting_adds_to_the_count_without_rewinding(store: Store) -> None:
    # Two gateways flushing out of order: the row still spans both and names the newest.
    store.record_refusals([refusal(at=seconds(10), remote="10.0.0.1:1", client="newest")])
    store.record_refusals(
        [refusal(at=seconds(5), first=seconds(-5), remote="10.0.0.2:2", client="older")]
    )
    [row] = store.refusals()
    assert (row.first_seen, row.last_seen, row.count) == (seconds(-5), seconds(10), 2)
    assert (row.remote, row.client_id) == ("10.0.0.1:1", "newest")


def test_the_newest_sighting_names_who_and_where(store: Store) -> None:
    store.record_refusals([refusal(at=seconds(1), client="first-name")])
    store.record_refusals([refusal(at=seconds(2), client="second-name", remote="10.9.9.9:9")])
    [row] = store.refusals()
    assert (row.client_id, row.cert_subject, row.remote) == (
        "second-name",
        "CN=second-name",
        "10.9.9.9:9",
    )


def test_a_key_repeated_within_one_batch_is_folded(store: Store) -> None:
    store.record_refusals(
        [
            refusal(at=seconds(3), remote="10.0.0.1:3"),
            refusal(FP_B, at=seconds(1)),
            refusal(at=seconds(1), remote="10.0.0.1:1", count=4),
            refusal(at=seconds(2), remote="10.0.0.1:2"),
        ]
    )
    rows = {row.cert_fingerprint: row for row in store.refusals()}
    assert rows[FP_A] == dataclasses.replace(
        refusal(at=seconds(3), remote="10.0.0.1:3"), first_seen=seconds(1), count=6
    )
    assert rows[FP_B] == refusal(FP_B, at=seconds(1))


def test_reasons_and_listeners_are_kept_apart(store: Store) -> None:
    store.record_refusals(
        [
            refusal(at=seconds(1), reason="unknown_ca"),
            refusal(at=seconds(2), reason="certificate_revoked"),
            refusal(at=seconds(3), listener="enrollment"),
        ]
    )
    assert [(r.listener, r.reason) for r in store.refusals()] == [
        ("enrollment", "unknown_ca"),
        ("operational", "certificate_revoked"),
        ("operational", "unknown_ca"),
    ]


def test_refusals_are_newest_first_and_limited(store: Store) -> None:
    clients = [f"stranger-{n}" for n in range(6)]
    times = [seconds(4), seconds(1), seconds(6), seconds(2), seconds(5), seconds(3)]
    store.record_refusals(
        [refusal(None, client=c, at=t) for c, t in zip(clients, times, strict=True)]
    )
    newest_first = [r.client_id for r in store.refusals()]
    assert newest_first == [
        "stranger-2", "stranger-4", "stranger-0", "stranger-5", "stranger-3", "stranger-1"
    ]
    assert [r.client_id for r in store.refusals(limit=2)] == ["stranger-2", "stranger-4"]
    assert store.refusals(limit=0) == []
    assert len(store.refusals(limit=500)) == 6


def test_refusals_seen_at_the_same_instant_come_in_a_stable_order(store: Store) -> None:
    tied = [refusal(None, client=f"c{n}", at=T0) for n in range(4)]
    store.record_refusals(tied)
    expected = sorted(tied, key=lambda record: record.key, reverse=True)
    assert store.refusals() == expected
    assert store.refusals(limit=2) == expected[:2]


def test_refusals_since_keeps_those_last_seen_at_or_after_it(store: Store) -> None:
    store.record_refusals(
        [refusal(None, client=f"c{n}", at=seconds(n), first=seconds(-100)) for n in range(5)]
    )
    assert [r.client_id for r in store.refusals(since=seconds(2))] == ["c4", "c3", "c2"]
    plus_five = timezone(timedelta(hours=5))
    assert [r.client_id for r in store.refusals(since=seconds(3).astimezone(plus_five))] == [
        "c4",
        "c3",
    ]
    assert [r.client_id for r in store.refusals(limit=1, since=seconds(0))] == ["c4"]
    assert store.refusals(since=seconds(4.5)) == []


def test_a_refusal_seen_again_shows_up_since_its_new_sighting(store: Store) -> None:
    store.record_refusals([refusal(at=seconds(0))])
    assert store.refusals(since=seconds(60)) == []
    store.record_refusals([refusal(at=seconds(61))])
    [row] = store.refusals(since=seconds(60))
    assert (row.first_seen, row.count) == (seconds(0), 2)


@pytest.mark.parametrize(
    ("limit", "error"), [(-1, ValueError), ("5", TypeError), (True, TypeError)]
)
def test_bad_refusal_limit_is_refused(store: Store, limit: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        store.refusals(limit=limit)  # type: ignore[arg-type]


def test_refusals_since_a_naive_time_is_refused(store: Store) -> None:
    store.record_refusals([refusal()])
    with pytest.raises(ValueError, match="timezone-aware"):
        store.refusals(since=datetime(2026, 3, 1, 12))


def test_recording_no_refusals_is_a_no_op(store: Store) -> None:
    store.record_refusals([])
    assert store.refusals() == []


def test_refusals_leave_the_audit_trail_alone(store: Store) -> None:
    # A flood must not grow the hash chain, nor make the gateway's change signal fire.
    store.append_audit([entry()])
    head = store.audit_head()
    store.record_refusals([refusal(), refusal(FP_B)])
    assert store.audit_head() == head


def _smuggled(**changes: object) -> RefusalRecord:
    """A record altered after construction, past its own validation."""
    record = refusal(FP_B, at=seconds(7))
    for name, value in changes.items():
        object.__setattr__(record, name, value)
    return record


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("not a record", TypeError),
        (_smuggled(last_seen=datetime(2026, 3, 1, 12)), ValueError),  # naive
        (_smuggled(count=0), ValueError),
        (_smuggled(count=2.5), TypeError),
        (_smuggled(key=""), ValueError),
        (_smuggled(client_id="nul\x00inside"), ValueError),
    ],
)
def test_a_batch_with_one_bad_record_writes_nothing(
    store: Store, bad: object, error: type[Exception]
) -> None:
    store.record_refusals([refusal(at=seconds(0))])
    before = store.refusals()
    with pytest.raises(error):
        store.record_refusals([refusal(at=seconds(5)), refusal(None, at=seconds(5)), bad])  # type: ignore[list-item]
    assert store.refusals() == before


def test_a_batch_whose_folded_count_would_overflow_writes_nothing(store: Store) -> None:
    huge = refusal(count=MAX_REFUSAL_COUNT)
    with pytest.raises(ValueError, match="count"):
        store.record_refusals([refusal(FP_B), huge, huge])
    assert store.refusals() == []


@pytest.mark.parametrize("batch", ["not a list", b"bytes", None, 7])
def test_refusals_must_come_as_a_sequence(store: Store, batch: object) -> None:
    with pytest.raises(TypeError):
        store.record_refusals(batch)  # type: ignore[arg-type]
    assert store.refusals() == []


def test_concurrent_batches_of_one_key_add_up(store: Store) -> None:
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def flush(worker: int) -> None:
        try:
            barrier.wait()
            for n in range(5):
                store.record_refusals([refusal(at=seconds(worker * 10 + n), count=3)])
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=flush, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    [row] = store.refusals()
    assert (row.count, row.first_seen, row.last_seen) == (60, seconds(0), seconds(34))


# refusal records and keys


def test_refusal_key_is_sha256_of_the_joined_fields() -> None:
    expected = hashlib.sha256(f"operational|unknown_ca|{FP_A}|".encode()).hexdigest()
    assert refusal_key("operational", "unknown_ca", FP_A, None) == expected
    assert refusal_key("operational", "unknown_ca", FP_A, "") == expected
    by_client = hashlib.sha256(b"enrollment|not_enrolled||dev-\xc3\xa9").hexdigest()
    assert refusal_key("enrollment", "not_enrolled", None, "dev-é") == by_client


def test_refusal_keys_differ_for_every_field() -> None:
    keys = {
        refusal_key("operational", "unknown_ca", FP_A, "c"),
        refusal_key("enrollment", "unknown_ca", FP_A, "c"),
        refusal_key("operational", "certificate_revoked", FP_A, "c"),
        refusal_key("operational", "unknown_ca", FP_B, "c"),
        refusal_key("operational", "unknown_ca", FP_A, "d"),
        refusal_key("operational", "unknown_ca", None, "c"),
    }
    assert len(keys) == 6


def test_a_client_id_with_the_separator_cannot_pose_as_another_source() -> None:
    assert refusal_key("operational", "unknown_ca", None, f"{FP_A}|x") != refusal_key(
        "operational", "unknown_ca", FP_A, "x"
    )
    assert refusal_key("operational", "unknown_ca", None, "a|b")  # the client id is free text


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("oper|ational", "unknown_ca", None, "c"), ValueError),
        (("operational", "unknown|ca", None, "c"), ValueError),
        (("operational", "unknown_ca", "a|b", "c"), ValueError),
        ((None, "unknown_ca", None, "c"), TypeError),
        (("operational", "unknown_ca", b"ab", "c"), TypeError),
        (("operational", "unknown_ca", None, 42), TypeError),
    ],
)
def test_bad_refusal_key_fields_are_refused(
    args: tuple[object, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        refusal_key(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"first_seen": datetime(2026, 3, 1, 12)}, ValueError),  # naive
        ({"last_seen": datetime(2026, 3, 1, 12)}, ValueError),
        ({"last_seen": "2026-03-01T12:00:00Z"}, TypeError),
        ({"first_seen": T0 + timedelta(seconds=1)}, ValueError),  # after last_seen
        ({"count": 0}, ValueError),
        ({"count": -3}, ValueError),
        ({"count": MAX_REFUSAL_COUNT + 1}, ValueError),
        ({"count": True}, TypeError),
        ({"count": 1.0}, TypeError),
        ({"key": ""}, ValueError),
        ({"key": "k" * 65}, ValueError),
        ({"key": None}, TypeError),
        ({"listener": ""}, ValueError),
        ({"listener": "l" * 65}, ValueError),
        ({"reason": ""}, ValueError),
        ({"reason": 7}, TypeError),
        ({"remote": ""}, ValueError),
        ({"remote": "r" * 256}, ValueError),
        ({"cert_fingerprint": "AB" * 32}, ValueError),
        ({"cert_fingerprint": "ab" * 31}, ValueError),
        ({"cert_fingerprint": ""}, ValueError),
        ({"client_id": b"dev"}, TypeError),
        ({"client_id": "dev\x00x"}, ValueError),  # PostgreSQL text cannot hold NUL
        ({"cert_subject": "CN=\ud800"}, ValueError),  # an unpaired surrogate is not text
        ({"cert_issuer": 3}, TypeError),
    ],
)
def test_bad_refusal_record_is_refused(change: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        dataclasses.replace(refusal(), **change)  # type: ignore[arg-type]


def test_long_client_supplied_text_is_accepted(store: Store) -> None:
    # Client id, subject and issuer come from the refused client: no width limit to trip over.
    long = refusal(client="c" * 5000)
    long = dataclasses.replace(long, cert_subject="CN=" + "s" * 5000, client_id="")
    store.record_refusals([long])
    assert store.refusals() == [long]


# the SQL registry only: durability and failures


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_sql_registry_keeps_everything_across_reopen(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "registry.db")
    with SqlStore(url) as first:
        issue(first, BIG_SERIAL, "req-1")
        first.put_nonce(nonce())
    with SqlStore.open(url) as second:
        assert second.get_certificate(BIG_SERIAL) == certificate(BIG_SERIAL)
        assert second.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK
        assert verify_chain(second.audit_records(), []).ok


def test_sql_registry_uses_wal_and_full_sync(tmp_path: Path) -> None:
    with SqlStore(sqlite_url(tmp_path / "registry.db")) as sql, sql.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_read_only_database_is_a_store_error(tmp_path: Path) -> None:
    """A database opened read-only (SQLite URI ``mode=ro``: the OS-level permission bits do not
    stop root, which the tests run as, but SQLite honours the mode for everyone) refuses every
    write with StoreError, still answers reads, and a writable opening works on the same file."""
    path = tmp_path / "registry.db"
    with SqlStore(sqlite_url(path)) as writable:
        writable.put_identity(identity())
    read_only = SqlStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(StoreError, match="read-only"):
            read_only.put_identity(identity("dev-2", birth="b2"), [entry()])
        with pytest.raises(StoreError, match="read-only"):
            read_only.append_audit([entry()])
        assert read_only.get_identity("dev-1") == identity()
    finally:
        read_only.close()
    with SqlStore(sqlite_url(path)) as writable:
        assert writable.get_identity("dev-2") is None
        writable.put_identity(identity("dev-2", birth="b2"))
        assert [i.id for i in writable.list_identities()] == ["dev-1", "dev-2"]


def test_locked_database_is_a_store_error_and_the_store_recovers(tmp_path: Path) -> None:
    """Another process holding SQLite's write lock (a backup, a stuck admin shell) makes writes
    fail once busy_timeout runs out; the same store works again as soon as the lock is gone."""
    path = tmp_path / "registry.db"
    sql = SqlStore(sqlite_url(path), busy_timeout_ms=50)
    try:
        sql.put_identity(identity())
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError, match="locked"):
                sql.change_state("dev-1", IdentityState.QUARANTINED, T0, [entry("quarantine")])
            with pytest.raises(StoreError, match="locked"):
                sql.put_nonce(nonce())
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert sql.change_state("dev-1", IdentityState.QUARANTINED, T0).state is (
            IdentityState.QUARANTINED
        )
        sql.put_nonce(nonce())
        assert sql.consume_nonce(b"\x01" * 16, "dev-1", T0) is NonceCheck.OK
    finally:
        sql.close()


def test_immutable_database_file_fails_writes_until_made_writable(tmp_path: Path) -> None:
    """The file-system's immutable flag (``chattr +i``) stops even root from writing, unlike
    permission bits. Writes fail with StoreError while it is set and succeed on the same store
    once it is cleared. Skipped where the file system or the container does not allow it."""
    import shutil
    import subprocess

    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr is not available")
    path = tmp_path / "registry.db"
    sql = SqlStore(sqlite_url(path))
    try:
        sql.put_identity(identity())
        sql.close()  # reconnect below under the immutable flag
        files = [p for p in (path, path.with_name("registry.db-wal"), tmp_path) if p.exists()]
        done = subprocess.run([chattr, "+i", *map(str, files)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run([chattr, "-i", *map(str, files)], capture_output=True, check=False)
            pytest.skip(f"chattr +i not permitted here: {done.stderr.decode().strip()}")
        try:
            with pytest.raises(StoreError):
                sql.put_identity(identity("dev-2", birth="b2"), [entry()])
        finally:
            subprocess.run([chattr, "-i", *map(str, files)], check=True)
        sql.put_identity(identity("dev-2", birth="b2"), [entry()])
        assert [i.id for i in sql.list_identities()] == ["dev-1", "dev-2"]
    finally:
        sql.close()



def statements_run(sql: SqlStore, action: Callable[[], object]) -> list[tuple[str, object]]:
    """The statements (with their parameters) ``action`` sends, transaction control aside."""
    seen: list[tuple[str, object]] = []

    def record(_conn: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        if not statement.startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            seen.append((statement, params))

    sa.event.listen(sql.engine, "before_cursor_execute", record)
    try:
        action()
    finally:
        sa.event.remove(sql.engine, "before_cursor_execute", record)
    return seen


def query_plan(sql: SqlStore, statement: tuple[str, object]) -> str:
    text, params = statement
    with sql.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {text}", params).all()  # type: ignore[arg-type]
    return " / ".join(str(row[-1]) for row in rows)


def test_sql_audit_head_is_one_query_that_sorts_nothing(tmp_path: Path) -> None:
    with SqlStore(sqlite_url(tmp_path / "registry.db")) as sql:
        sql.append_audit([entry(str(n)) for n in range(300)])
        statements = statements_run(sql, sql.audit_head)
        assert len(statements) == 1
        plan = query_plan(sql, statements[0])
        assert "TEMP B-TREE" not in plan  # read backwards along the primary key, stops at one


def test_sql_refusals_read_the_index_instead_of_sorting_the_table(tmp_path: Path) -> None:
    with SqlStore(sqlite_url(tmp_path / "registry.db")) as sql:
        sql.record_refusals([refusal(None, client=f"c{n}", at=seconds(n)) for n in range(50)])
        for since in (None, seconds(10)):
            statements = statements_run(sql, functools.partial(sql.refusals, 20, since))
            assert len(statements) == 1
            plan = query_plan(sql, statements[0])
            assert "ix_connection_refusal_last_seen_key" in plan
            assert "TEMP B-TREE" not in plan


def test_sql_pruning_reads_an_index_and_is_one_statement_per_batch(tmp_path: Path) -> None:
    with SqlStore(sqlite_url(tmp_path / "registry.db")) as sql:
        for n in range(50):
            answered(sql, f"req-{n}", minutes(n))
            sql.put_nonce(nonce(bytes([n + 1]) * 16, ttl=60 * n + 1))
        for prune, index in (
            (
                functools.partial(sql.prune_responses, minutes(30), minutes(30), 10),
                "ix_stored_response_at",
            ),
            (functools.partial(sql.prune_nonces, minutes(30), 10), "ix_nonce_expires_at"),
        ):
            statements = statements_run(sql, prune)
            assert len(statements) == 1
            plan = query_plan(sql, statements[0])
            assert index in plan
            assert "TEMP B-TREE" not in plan  # the oldest first, read along the index


def test_sql_refusal_batch_is_one_transaction(tmp_path: Path) -> None:
    with SqlStore(sqlite_url(tmp_path / "registry.db")) as sql:
        begins: list[str] = []

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            if statement.startswith("BEGIN"):
                begins.append(statement)

        sa.event.listen(sql.engine, "before_cursor_execute", record)
        try:
            sql.record_refusals([refusal(None, client=f"c{n}") for n in range(30)])
        finally:
            sa.event.remove(sql.engine, "before_cursor_execute", record)
        assert begins == ["BEGIN IMMEDIATE"]
        assert len(sql.refusals()) == 30


def test_sql_refusal_upsert_is_portable_to_postgresql() -> None:
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    text = str(refusal_upsert("postgresql").compile(dialect=dialect))
    assert "ON CONFLICT (key) DO UPDATE SET" in text
    assert "count = (connection_refusal.count + excluded.count)" in text
    with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
        refusal_upsert("mysql")


def test_sql_refusals_survive_reopen(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "registry.db")
    with SqlStore(url) as first:
        first.record_refusals([refusal(count=3)])
    with SqlStore(url) as second:
        second.record_refusals([refusal(at=seconds(1))])
        [row] = second.refusals()
        assert row.count == 4


def test_sql_refusals_on_a_read_only_database_are_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    with SqlStore(sqlite_url(path)) as writable:
        writable.record_refusals([refusal()])
    read_only = SqlStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with pytest.raises(StoreError, match="read-only"):
            read_only.record_refusals([refusal(at=seconds(1)), refusal(FP_B)])
        assert read_only.refusals() == [refusal()]
    finally:
        read_only.close()
