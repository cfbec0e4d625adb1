"""The retention sweep: answers and nonces past the protocol's use go, in bounded batches, and a
request retried after its answer went is judged afresh without a second certificate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.protocol import Advice, ReasonCode, decode_response
from gateway.protocol.device import Enrolled, Rejected, Send
from gateway.protocol.messages import Error, IssuedCertificate
from gateway.registry import SqlStore
from gateway.retention import (
    NONCE_MARGIN,
    PENDING_HORIZON,
    RETRY_HORIZON,
    Swept,
    sweep,
)
from gateway.store import NonceCheck, NonceRecord, Store, StoredResponse, StoreError
from gateway.store_memory import MemoryStore
from pki.clock import FakeClock

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    with SqlStore(f"sqlite:///{tmp_path / 'registry.db'}") as sql:
        yield sql


def answer(store: Store, request_id: str, at: datetime, outcome: str = "issued") -> None:
    store.record_outcome(
        response=StoredResponse(
            identity_id="dev-1",
            request_id=request_id,
            kind="enroll",
            outcome=outcome,
            payload=b"{}",
            at=at,
            request_digest="ab" * 32,
        )
    )


def kept(store: Store, *request_ids: str) -> list[str]:
    return [r for r in request_ids if store.get_response("dev-1", r) is not None]


def test_answers_go_after_the_retry_horizon_and_pending_ones_after_a_week(store: Store) -> None:
    now = T0 + PENDING_HORIZON + timedelta(days=1)
    answer(store, "old", now - RETRY_HORIZON - SECOND)
    answer(store, "recent", now - RETRY_HORIZON + SECOND)
    answer(store, "old-refusal", now - RETRY_HORIZON - SECOND, "rejected")
    answer(store, "waiting", now - PENDING_HORIZON + SECOND, "pending")
    answer(store, "abandoned", now - PENDING_HORIZON - SECOND, "pending")
    swept = sweep(store, FakeClock(now))
    assert swept == Swept(answers=3, nonces=0, complete=True)
    assert kept(store, "old", "recent", "old-refusal", "waiting", "abandoned") == [
        "recent",
        "waiting",
    ]


def test_nonces_go_one_retry_horizon_after_they_expire(store: Store) -> None:
    now = T0 + timedelta(days=1)

    def nonce(value: bytes, expires_at: datetime) -> NonceRecord:
        issued_at = expires_at - 60 * SECOND
        return NonceRecord(value, "dev-1", issued_at=issued_at, expires_at=expires_at)

    store.put_nonce(nonce(b"\x01" * 32, now - NONCE_MARGIN - SECOND))
    store.put_nonce(nonce(b"\x02" * 32, now - NONCE_MARGIN + SECOND))
    assert sweep(store, FakeClock(now)) == Swept(answers=0, nonces=1, complete=True)
    assert store.consume_nonce(b"\x01" * 32, "dev-1", now) is NonceCheck.UNKNOWN
    # the other is past its expiry but within the margin: still known as expired
    assert store.consume_nonce(b"\x02" * 32, "dev-1", now) is NonceCheck.EXPIRED


def test_a_backlog_is_worked_off_in_bounded_batches_over_several_runs(store: Store) -> None:
    now = T0 + timedelta(days=1)
    for n in range(5):
        answer(store, f"req-{n}", T0 + n * SECOND)
    clock = FakeClock(now)
    assert sweep(store, clock, batch=2, max_batches=2) == Swept(4, 0, complete=False)
    assert kept(store, *(f"req-{n}" for n in range(5))) == ["req-4"]  # the oldest went first
    assert sweep(store, clock, batch=2, max_batches=2) == Swept(1, 0, complete=True)
    assert sweep(store, clock, batch=2, max_batches=2) == Swept(0, 0, complete=True)


@pytest.mark.parametrize("arguments", [{"batch": 0}, {"max_batches": 0}, {"batch": True}])
def test_bad_batch_settings_are_refused(arguments: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        sweep(MemoryStore(), FakeClock(T0), **arguments)


class BrokenStore(MemoryStore):
    def prune_nonces(self, expired_before: datetime, limit: int) -> int:
        raise StoreError("database is locked")


def test_a_registry_error_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = BrokenStore()
    answer(store, "old", T0)
    swept = sweep(store, FakeClock(T0 + timedelta(days=1)))
    assert swept == Swept(answers=1, nonces=0, complete=False)
    assert "database is locked" in caplog.text


# -- what a device sees ---------------------------------------------------------------------


def lost_enroll_answer(gw: LoopbackGateway) -> tuple[Send, bytes]:
    """A device's enroll whose certificate answer never reached it; returns the request (the
    device still holds it) and the bytes of the lost answer."""
    client = gw.device("dev-1")
    (hello,) = client.start()
    assert isinstance(hello, Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    (enroll,) = client.receive(challenge.topic, challenge.payload)
    assert isinstance(enroll, Send)
    (lost,) = gw.service.handle(enroll.topic, enroll.payload)
    assert isinstance(decode_response(lost.payload), IssuedCertificate)
    return enroll, lost.payload


def test_a_copy_within_the_horizon_still_gets_the_same_answer() -> None:
    gw = LoopbackGateway()
    enroll, lost = lost_enroll_answer(gw)
    gw.clock.advance(RETRY_HORIZON - SECOND)
    assert sweep(gw.store, gw.clock).answers == 0
    (replayed,) = gw.service.handle(enroll.topic, enroll.payload)
    assert replayed.payload == lost
    assert len(gw.store.certificates_for("dev-1")) == 1


def test_a_copy_after_the_horizon_is_refused_with_a_restart_code_and_no_certificate() -> None:
    gw = LoopbackGateway()
    enroll, lost = lost_enroll_answer(gw)
    gw.clock.advance(RETRY_HORIZON + SECOND)
    swept = sweep(gw.store, gw.clock)
    assert swept.answers == 2 and swept.nonces == 0  # the challenge and the certificate
    (again,) = gw.service.handle(enroll.topic, enroll.payload)
    assert again.payload != lost
    refusal = decode_response(again.payload)
    # Judged afresh: its time is an hour old (were it not, its key was certified already).
    assert isinstance(refusal, Error) and refusal.reason == ReasonCode.CLOCK_SKEW
    assert len(gw.store.certificates_for("dev-1")) == 1


def test_a_device_whose_answer_was_pruned_recovers_by_itself() -> None:
    gw = LoopbackGateway()
    client = gw.device("dev-1")
    (hello,) = client.start()
    assert isinstance(hello, Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    (enroll,) = client.receive(challenge.topic, challenge.payload)
    assert isinstance(enroll, Send)
    gw.service.handle(enroll.topic, enroll.payload)  # answered; the answer is lost
    gw.clock.advance(RETRY_HORIZON + SECOND)  # the device was cut off for over an hour
    sweep(gw.store, gw.clock)
    (resent,) = client.timeout()
    assert resent == enroll
    events = gw.exchange(client, [resent])
    rejected = events[0]
    assert isinstance(rejected, Rejected) and rejected.advice is Advice.RESTART
    deadline = client.next_deadline()
    assert deadline is not None
    gw.clock.set(deadline)
    assert isinstance(gw.exchange(client, client.timeout())[-1], Enrolled)
    statuses = sorted(c.status.value for c in gw.store.certificates_for("dev-1"))
    assert statuses == ["active", "superseded"]  # the undelivered one, superseded


def test_an_expired_nonce_is_known_as_expired_until_the_sweep_and_unknown_after() -> None:
    gw = LoopbackGateway()
    credential = gw.mint("dev-1")
    nonce = gw.challenge(credential).nonce
    gw.clock.advance(gw.policy.nonce_ttl + NONCE_MARGIN - SECOND)

    def enroll_now(request_id: str) -> str:
        request, _ = build_enroll(credential, nonce, time=gw.now(), request_id=request_id)
        refusal = gw.ask("dev-1", request)
        assert isinstance(refusal, Error)
        return refusal.reason

    assert sweep(gw.store, gw.clock).nonces == 0
    assert enroll_now("e-1") == ReasonCode.NONCE_EXPIRED
    gw.clock.advance(2 * SECOND)
    assert sweep(gw.store, gw.clock).nonces == 1
    assert enroll_now("e-2") == ReasonCode.NONCE_UNKNOWN
    assert gw.store.certificates_for("dev-1") == []


def test_the_horizons_the_protocol_page_promises_are_the_ones_swept() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    text = " ".join(page.split())  # the page wraps its lines anywhere
    # a horizon changed here without the page fails at the lookup
    said = {timedelta(hours=1): ("one hour", "an hour"), timedelta(days=7): ("a week",)}
    assert f"answer for the **retry horizon of {said[RETRY_HORIZON][0]}**" in text
    assert f"and a `pending` answer for {said[PENDING_HORIZON][0]}" in text
    assert f"Nonces are deleted {said[NONCE_MARGIN][-1]} after they expired" in text
