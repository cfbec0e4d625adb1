"""Pending enrollments and operator approval, bootstrap tokens, quarantined and revoked
devices."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest

from gateway.enrollment import (
    ApprovalRule,
    token_hash,
)
from gateway.enrollment.testing import LoopbackGateway, build_enroll, hello_for
from gateway.operations import OperationError, OperationRefusal
from gateway.protocol import (
    Error,
    IssuedCertificate,
    Pending,
    ReasonCode,
    Response,
    TokenEnroll,
    encode,
    topics,
)
from gateway.store import IdentityState, NonceCheck
from pki.csr import make_csr
from pki.keys import LocalSigner


def reason(answer: Response) -> str:
    assert isinstance(answer, Error), answer
    return answer.reason


@pytest.fixture
def gw() -> LoopbackGateway:
    return LoopbackGateway(auto_approve=(ApprovalRule(manufacturer="Acme*", model="camera-*"),))


# -- pending and approval ----------------------------------------------------------------------


def test_a_device_no_rule_approves_waits_pending(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1", "sensor-v1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask("dev-1", request)
    assert answer == Pending(id="enroll-1", retry_after=10)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None and identity.state is IdentityState.PENDING
    assert gw.store.certificates_for("dev-1") == []
    entry = gw.store.audit_records()[-1].entry
    assert (entry.action, entry.outcome) == ("enroll", "pending")


def test_a_matching_rule_approves_at_once(gw: LoopbackGateway) -> None:
    credential = gw.mint("cam-1", "camera-hd")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("cam-1", request), IssuedCertificate)


def test_pending_then_approve_then_the_same_request_is_issued(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    topic = topics.enroll_request("dev-1")
    (first,) = gw.service.handle(topic, encode(request))
    audit_after_pending = len(gw.store.audit_records())

    # Polling while pending: the same bytes, nothing recorded.
    gw.clock.advance(10)
    (again,) = gw.service.handle(topic, encode(request))
    assert again == first
    assert len(gw.store.audit_records()) == audit_after_pending

    # An operator approves; ten minutes later (nonce long expired, device clock long out of
    # the skew window for that request) the retry is issued without consuming the nonce again.
    gw.clock.advance(600)
    approved = gw.approve("dev-1", actor="operator:alice")
    assert approved.state is IdentityState.ACTIVE
    (issued,) = gw.service.handle(topic, encode(request))
    answer = gw.ask("dev-1", request)
    assert isinstance(answer, IssuedCertificate)
    assert issued.payload != first.payload
    # The pending answer was replaced: a further retry replays the certificate.
    assert gw.service.handle(topic, encode(request)) == [issued]
    assert len(gw.store.certificates_for("dev-1")) == 1
    actions = [r.entry.action for r in gw.store.audit_records()]
    assert actions[-2:] == ["approve", "enroll"]
    assert gw.store.audit_records()[-2].entry.actor == "operator:alice"
    # The nonce is spent once and for all.
    assert gw.store.consume_nonce(challenge.nonce, "dev-1", gw.clock.now()) is NonceCheck.REUSED


def test_an_approved_retry_gets_the_lifetime_the_pending_request_asked_for(
    gw: LoopbackGateway,
) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), lifetime=90)
    assert isinstance(gw.ask("dev-1", request), Pending)
    gw.clock.advance(600)
    gw.approve("dev-1")
    answer = gw.ask("dev-1", request)
    assert isinstance(answer, IssuedCertificate), answer
    assert answer.not_after - gw.now() == 90


def test_a_pending_device_revoked_before_approval_is_refused_on_retry(
    gw: LoopbackGateway,
) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("dev-1", request), Pending)
    gw.store.change_state("dev-1", IdentityState.REVOKED, gw.clock.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.DEVICE_REVOKED
    # The refusal replaced the pending answer for good.
    assert reason(gw.ask("dev-1", request)) == ReasonCode.DEVICE_REVOKED


def test_approve_refuses_unknown_and_non_pending_identities(gw: LoopbackGateway) -> None:
    with pytest.raises(OperationError) as caught:
        gw.approve("nobody", actor="operator:alice")
    assert caught.value.reason is OperationRefusal.UNKNOWN_IDENTITY
    credential = gw.mint("cam-1", "camera-x")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("cam-1", request), IssuedCertificate)
    with pytest.raises(OperationError) as caught:
        gw.approve("cam-1", actor="operator:alice")
    assert caught.value.reason is OperationRefusal.NOT_PENDING


# -- quarantine and revocation -----------------------------------------------------------------


def enrolled(gw: LoopbackGateway, serial: str = "cam-1") -> object:
    credential = gw.mint(serial, "camera-x")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask(serial, request), IssuedCertificate)
    return credential


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (IdentityState.REVOKED, ReasonCode.DEVICE_REVOKED),
        (IdentityState.QUARANTINED, ReasonCode.DEVICE_QUARANTINED),
    ],
)
def test_revoked_and_quarantined_devices_cannot_re_enroll(
    gw: LoopbackGateway, state: IdentityState, code: ReasonCode
) -> None:
    credential = enrolled(gw)
    challenge = gw.challenge(credential, "h2")  # type: ignore[arg-type]
    gw.store.change_state("cam-1", state, gw.clock.now())
    # Refused at hello...
    assert reason(gw.ask("cam-1", hello_for(credential, "h3"))) == code  # type: ignore[arg-type]
    # ...and at enroll, with a nonce obtained before the state changed.
    request, _ = build_enroll(
        credential,  # type: ignore[arg-type]
        challenge.nonce,
        time=gw.now(),
        request_id="e2",
    )
    assert reason(gw.ask("cam-1", request)) == code
    assert len(gw.store.certificates_for("cam-1")) == 1


# -- bootstrap tokens -------------------------------------------------------------------------


def token_request(
    gw: LoopbackGateway, token: str, request_id: str = "t1", **kw: object
) -> TokenEnroll:
    return TokenEnroll(
        id=request_id,
        token=token,
        csr=make_csr(LocalSigner.generate(), "tok-1"),
        time=gw.now(),
        **kw,  # type: ignore[arg-type]
    )


def test_a_token_enrolls_a_device_without_birth_certificate(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="operator:alice")
    assert len(token) >= 22  # at least 128 bits, url-safe
    answer = gw.ask("tok-1", token_request(gw, token))
    assert isinstance(answer, IssuedCertificate)
    identity = gw.store.get_identity("tok-1")
    assert identity is not None and identity.state is IdentityState.ACTIVE
    assert identity.birth_fingerprint is None
    actions = [(r.entry.actor, r.entry.action) for r in gw.store.audit_records()]
    assert actions == [("operator:alice", "token_create"), ("device:tok-1", "enroll")]


def test_a_token_device_may_ask_for_a_shorter_certificate(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    answer = gw.ask("tok-1", token_request(gw, token, lifetime=300))
    assert isinstance(answer, IssuedCertificate), answer
    assert answer.not_after - gw.now() == 300


def test_only_the_hash_of_a_token_is_stored(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    assert token_hash(token) == hashlib.sha256(token.encode()).hexdigest()
    # The store knows the hash: consuming by hash works, and the token itself appears nowhere.
    assert token not in repr(gw.store.__dict__)


def test_a_token_works_once(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    assert isinstance(gw.ask("tok-1", token_request(gw, token, "t1")), IssuedCertificate)
    assert reason(gw.ask("tok-1", token_request(gw, token, "t2"))) == ReasonCode.TOKEN_REUSED


def test_an_expired_token(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    gw.clock.advance(timedelta(minutes=10))
    assert reason(gw.ask("tok-1", token_request(gw, token))) == ReasonCode.TOKEN_EXPIRED


def test_a_token_for_another_device(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-2", ttl=timedelta(minutes=10), actor="cli:root")
    assert reason(gw.ask("tok-1", token_request(gw, token))) == ReasonCode.TOKEN_OTHER_DEVICE


def test_an_unknown_token(gw: LoopbackGateway) -> None:
    assert reason(gw.ask("tok-1", token_request(gw, "x" * 32))) == ReasonCode.TOKEN_UNKNOWN


def test_a_refused_token_request_does_not_burn_the_token(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    skewed = TokenEnroll(
        id="t1", token=token, csr=make_csr(LocalSigner.generate(), "x"), time=gw.now() + 3600
    )
    assert reason(gw.ask("tok-1", skewed)) == ReasonCode.CLOCK_SKEW
    assert isinstance(gw.ask("tok-1", token_request(gw, token, "t2")), IssuedCertificate)


def test_a_token_survives_a_registry_outage_during_the_commit(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    request = token_request(gw, token)
    original = gw.store.record_outcome

    def down(**kwargs: object) -> None:
        from gateway.store import StoreError

        raise StoreError("disk full")

    gw.store.record_outcome = down  # type: ignore[method-assign]
    assert reason(gw.ask("tok-1", request)) == ReasonCode.UNAVAILABLE
    gw.store.record_outcome = original  # type: ignore[method-assign]
    # The token was consumed by the first try of this very request: the retry is issued.
    assert isinstance(gw.ask("tok-1", request), IssuedCertificate)


def test_tokens_cannot_enroll_revoked_devices(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    assert isinstance(gw.ask("tok-1", token_request(gw, token)), IssuedCertificate)
    gw.store.change_state("tok-1", IdentityState.REVOKED, gw.clock.now())
    with pytest.raises(OperationError) as caught:
        gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    assert caught.value.reason is OperationRefusal.DEVICE_REVOKED


@pytest.mark.parametrize(
    ("device_id", "ttl", "actor"),
    [
        ("bad/id", timedelta(minutes=1), "cli:root"),
        ("tok-1", timedelta(0), "cli:root"),
        ("tok-1", timedelta(days=31), "cli:root"),
        ("tok-1", timedelta(minutes=1), ""),
    ],
)
def test_create_token_validates_its_arguments(
    gw: LoopbackGateway, device_id: str, ttl: timedelta, actor: str
) -> None:
    with pytest.raises(ValueError):
        gw.create_token(device_id, ttl=ttl, actor=actor)


def test_token_devices_are_held_to_the_firmware_policy() -> None:
    gw = LoopbackGateway(require_known_firmware=True)
    token = gw.create_token("tok-1", ttl=timedelta(minutes=10), actor="cli:root")
    assert reason(gw.ask("tok-1", token_request(gw, token))) == ReasonCode.FIRMWARE_NOT_ALLOWED
