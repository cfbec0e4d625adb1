"""EnrollmentService: the happy path, idempotent retries, commit-before-publish, store outages,
topics, audit and metrics."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.enrollment import EnrollmentService, Publish
from gateway.enrollment.testing import LoopbackGateway, build_enroll, hello_for
from gateway.protocol import (
    Challenge,
    Error,
    Hello,
    IssuedCertificate,
    ReasonCode,
    decode_response,
    encode,
    topics,
)
from gateway.protocol.topics import Channel
from gateway.store import CertificateStatus, IdentityState, StoreError
from gateway.store_memory import MemoryStore
from pki.csr import public_key_fingerprint
from pki.issue import DEFAULT_BACKDATE
from pki.keys import LocalSigner


@pytest.fixture
def gw() -> LoopbackGateway:
    return LoopbackGateway()


class FailingStore(MemoryStore):
    """A MemoryStore whose chosen methods raise StoreError, as a database outage would."""

    def __init__(self) -> None:
        super().__init__()
        self.failing: set[str] = set()

    def __getattribute__(self, name: str) -> Any:
        if name in object.__getattribute__(self, "failing"):
            raise StoreError(f"{name}: database is locked")
        return object.__getattribute__(self, name)


def enroll_once(gw: LoopbackGateway, serial: str = "dev-1") -> tuple[Any, IssuedCertificate, Any]:
    credential = gw.mint(serial)
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask(serial, request)
    assert isinstance(answer, IssuedCertificate), answer
    return credential, answer, key


# -- the happy path ------------------------------------------------------------------------------


def test_hello_gets_a_fresh_single_device_nonce(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    first = gw.challenge(credential, "h1")
    second = gw.challenge(credential, "h2")
    assert len(first.nonce) == 32
    assert first.nonce != second.nonce
    assert first.expires_at == gw.now() + 60


def test_enrollment_issues_a_certificate_shaped_by_the_registry(gw: LoopbackGateway) -> None:
    _, answer, key = enroll_once(gw)
    cert = x509.load_der_x509_certificate(answer.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.test/device/dev-1"
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    chain = [x509.load_der_x509_certificate(der) for der in answer.chain]
    assert chain == [gw.issuing_ca.certificate, gw.root_ca.certificate]
    cert.verify_directly_issued_by(chain[0])
    assert answer.not_after == int(cert.not_valid_after_utc.timestamp())


def test_renew_after_is_two_thirds_of_the_lifetime_give_or_take_the_jitter(
    gw: LoopbackGateway,
) -> None:
    # Counted from the moment of issue: the one-minute backdate is not lifetime.
    for index in range(20):
        issued_at = gw.now()
        _, answer, _ = enroll_once(gw, f"dev-{index}")
        lifetime = answer.not_after - issued_at
        assert lifetime == 3600
        share = (answer.renew_after - issued_at) / lifetime
        assert 2 / 3 - 0.05 - 0.001 <= share <= 2 / 3 + 0.05 + 0.001


# -- a requested lifetime --------------------------------------------------------------------


def enroll_asking(
    gw: LoopbackGateway, serial: str, lifetime: int | None
) -> tuple[IssuedCertificate, x509.Certificate]:
    credential = gw.mint(serial)
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), lifetime=lifetime)
    answer = gw.ask(serial, request)
    assert isinstance(answer, IssuedCertificate), answer
    return answer, x509.load_der_x509_certificate(answer.certificate)


def test_a_device_asking_for_a_minute_gets_a_one_minute_certificate(gw: LoopbackGateway) -> None:
    assert gw.policy.cert_lifetime == timedelta(hours=1)
    issued_at = gw.now()
    answer, cert = enroll_asking(gw, "dev-1", 60)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(
        seconds=60
    ) + DEFAULT_BACKDATE
    assert answer.not_after == issued_at + 60
    # Two thirds of the minute it holds the certificate, +-5% of it (whole seconds).
    assert 40 - 3 <= answer.renew_after - issued_at <= 40 + 3
    (row,) = gw.store.certificates_for("dev-1")
    assert row.not_after == cert.not_valid_after_utc
    detail = gw.store.audit_records()[-1].entry.detail
    assert (detail["requested_lifetime"], detail["lifetime"]) == ("60", "60")


def test_renew_after_follows_the_granted_lifetime(gw: LoopbackGateway) -> None:
    for index in range(20):
        issued_at = gw.now()
        answer, _ = enroll_asking(gw, f"dev-{index}", 600)
        share = (answer.renew_after - issued_at) / 600
        assert 2 / 3 - 0.05 - 0.002 <= share <= 2 / 3 + 0.05 + 0.002


@pytest.mark.parametrize(
    ("policy_lifetime", "requested"),
    [(timedelta(hours=1), 7200), (timedelta(hours=1), 30 * 86400), (timedelta(hours=2), 7200)],
)
def test_asking_for_more_than_the_policy_gets_the_policy_lifetime(
    policy_lifetime: timedelta, requested: int
) -> None:
    gw = LoopbackGateway(cert_lifetime=policy_lifetime)
    issued_at = gw.now()
    answer, cert = enroll_asking(gw, "dev-1", requested)
    assert answer.not_after - issued_at == policy_lifetime.total_seconds()
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == (
        policy_lifetime + DEFAULT_BACKDATE
    )


def test_without_a_request_the_policy_lifetime_applies_and_is_not_audited(
    gw: LoopbackGateway,
) -> None:
    issued_at = gw.now()
    answer, _ = enroll_asking(gw, "dev-1", None)
    assert answer.not_after - issued_at == 3600
    assert "lifetime" not in gw.store.audit_records()[-1].entry.detail


def test_a_retry_with_a_lifetime_is_replayed_and_another_lifetime_is_another_request(
    gw: LoopbackGateway,
) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), lifetime=120)
    topic = topics.enroll_request("dev-1")
    (first,) = gw.service.handle(topic, encode(request))
    gw.clock.advance(30)
    assert gw.service.handle(topic, encode(request)) == [first]
    changed = dataclasses.replace(request, lifetime=60)
    answer = gw.ask("dev-1", changed)
    assert isinstance(answer, Error) and answer.reason == ReasonCode.REQUEST_ID_REUSED
    assert len(gw.store.certificates_for("dev-1")) == 1


def test_a_csr_asking_for_another_identity_or_ca_powers_is_refused(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    key = LocalSigner.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway-admin")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("spiffe://fleet.test/operator/root"),
                    x509.DNSName("evil.example"),
                ]
            ),
            critical=False,
        )
        .sign(key.private_key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), key=key, csr=csr)
    answer = gw.ask("dev-1", request)
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.CSR_OVERREACH
    assert gw.store.certificates_for("dev-1") == []


def test_the_registry_records_identity_certificate_and_audit(gw: LoopbackGateway) -> None:
    credential, answer, key = enroll_once(gw)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None
    assert identity.state is IdentityState.ACTIVE
    assert identity.birth_fingerprint == hashlib.sha256(
        credential.certificate.public_bytes(Encoding.DER)
    ).hexdigest()
    assert (identity.manufacturer, identity.model) == ("Acme Sensors", "sensor-v1")
    (row,) = gw.store.certificates_for("dev-1")
    assert row.serial == x509.load_der_x509_certificate(answer.certificate).serial_number
    assert row.public_key_fingerprint == public_key_fingerprint(key.public_key())
    assert row.request_id == "enroll-1"
    (entry,) = [r.entry for r in gw.store.audit_records()]
    assert (entry.actor, entry.action, entry.outcome) == ("device:dev-1", "enroll", "ok")
    assert entry.detail["serial"] == f"{row.serial:x}"


def test_the_certificate_row_is_committed_before_the_answer_is_returned() -> None:
    store = FailingStore()
    gw = LoopbackGateway(store=store)
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    store.failing.add("record_outcome")
    answer = gw.ask("dev-1", request)
    # The certificate was signed but could not be recorded: it is never sent.
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.UNAVAILABLE
    assert store.certificates_for("dev-1") == []
    # Once the registry is back, the same request (same id, same bytes) succeeds.
    store.failing.clear()
    answer = gw.ask("dev-1", request)
    assert isinstance(answer, IssuedCertificate)
    (row,) = store.certificates_for("dev-1")
    assert row.serial == x509.load_der_x509_certificate(answer.certificate).serial_number


# -- retries are answered from the store ------------------------------------------------------


def test_a_retried_enroll_gets_the_same_bytes_and_nothing_is_consumed_twice(
    gw: LoopbackGateway,
) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    topic = topics.enroll_request("dev-1")
    first = gw.service.handle(topic, encode(request))
    audit_before = len(gw.store.audit_records())
    gw.clock.advance(120)  # the nonce has expired meanwhile: a retry must not care
    second = gw.service.handle(topic, encode(request))
    assert second == first
    assert len(gw.store.certificates_for("dev-1")) == 1
    assert len(gw.store.audit_records()) == audit_before
    assert gw.service.metrics["replayed"] == 1
    assert gw.service.metrics["issued"] == 1


def test_a_retried_hello_gets_the_same_challenge(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    assert gw.challenge(credential, "h1") == gw.challenge(credential, "h1")
    assert gw.service.metrics["challenges"] == 1


def test_a_retried_rejection_is_the_same_rejection(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    request, _ = build_enroll(credential, bytes(32), time=gw.now())
    first = gw.ask("dev-1", request)
    assert isinstance(first, Error) and first.reason == ReasonCode.NONCE_UNKNOWN
    assert gw.ask("dev-1", request) == first
    assert gw.service.metrics["rejected.nonce_unknown"] == 1


def test_same_request_id_with_other_bytes_is_refused(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    gw.challenge(credential, "shared-id")
    longer_chain = (*hello_for(credential).chain, gw.factory.root.public_bytes(Encoding.DER))
    other = gw.ask("dev-1", Hello(id="shared-id", chain=longer_chain))
    assert isinstance(other, Error)
    assert other.reason == ReasonCode.REQUEST_ID_REUSED
    assert other.id == "shared-id"


def test_request_ids_are_per_device(gw: LoopbackGateway) -> None:
    one, two = gw.mint("dev-1"), gw.mint("dev-2")
    assert gw.challenge(one, "same").nonce != gw.challenge(two, "same").nonce


# -- store outages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "at_hello"),
    [
        ("get_response", False),
        ("get_identity", True),
        ("record_outcome", True),  # the challenge and its nonce
        ("record_outcome", False),
        ("consume_nonce", False),
    ],
)
def test_a_store_error_is_answered_unavailable(method: str, at_hello: bool) -> None:
    store = FailingStore()
    gw = LoopbackGateway(store=store)
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential, "h0")
    store.failing.add(method)
    if at_hello:
        answer = gw.ask("dev-1", hello_for(credential, "h1"))
    else:
        request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
        answer = gw.ask("dev-1", request)
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.UNAVAILABLE
    assert gw.service.metrics["rejected.unavailable"] == 1


def test_a_rejection_that_cannot_be_audited_is_answered_unavailable() -> None:
    store = FailingStore()
    gw = LoopbackGateway(store=store)
    store.failing.add("append_audit")
    answer = gw.ask("dev-1", b"not json")
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.UNAVAILABLE


def test_an_unexpected_bug_is_contained(gw: LoopbackGateway, monkeypatch: Any) -> None:
    def explode(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(gw.service._decider, "hello", explode)
    answer = gw.ask("dev-1", hello_for(gw.mint("dev-1")))
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.UNAVAILABLE
    assert gw.service.metrics["errors.internal"] == 1


# -- topics, decoding errors, audit of refusals -------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "fg/v1/enroll/dev-1/resp",
        "fg/v1/dev/dev-1/telemetry",
        "fg/v1/enroll/+/req",
        "other/topic",
        "fg/v1/enroll/a/b/req",
    ],
)
def test_topics_that_are_not_request_topics_are_ignored_and_counted(
    gw: LoopbackGateway, topic: str
) -> None:
    assert gw.service.handle(topic, encode(hello_for(gw.mint("dev-1")))) == []
    assert gw.service.metrics["ignored.topic"] == 1


def test_a_request_on_the_wrong_listener_is_an_unknown_type(gw: LoopbackGateway) -> None:
    answer = gw.ask("dev-1", hello_for(gw.mint("dev-1")), Channel.RENEW)
    assert isinstance(answer, Error)
    assert answer.reason == ReasonCode.UNKNOWN_TYPE
    assert answer.id == "hello-1"


def test_decoding_errors_are_answered_and_audited(gw: LoopbackGateway) -> None:
    answer = gw.ask("dev-9", b'{"v":2,"type":"hello","id":"abc"}')
    assert isinstance(answer, Error)
    assert (answer.reason, answer.id) == (ReasonCode.UNSUPPORTED_VERSION, "abc")
    (entry,) = [r.entry for r in gw.store.audit_records()]
    assert (entry.actor, entry.action, entry.subject) == ("device:dev-9", "reject", "dev-9")
    assert entry.reasons == ("unsupported_version",)
    assert gw.service.metrics["rejected.unsupported_version"] == 1


def test_an_unreadable_request_gets_an_error_with_a_null_id(gw: LoopbackGateway) -> None:
    (reply,) = gw.service.handle(topics.enroll_request("dev-1"), b"\x00\x01")
    assert json.loads(reply.payload)["id"] is None
    assert reply.qos == 1 and reply.retain is False


def test_metrics_count_requests_by_type(gw: LoopbackGateway) -> None:
    enroll_once(gw)
    assert gw.service.metrics["requests.hello"] == 1
    assert gw.service.metrics["requests.enroll"] == 1
    assert gw.service.metrics["challenges"] == 1
    assert gw.service.metrics["issued"] == 1


def test_the_service_refuses_a_policy_of_the_wrong_type(gw: LoopbackGateway) -> None:
    with pytest.raises(TypeError):
        EnrollmentService(gw.store, gw.issuer, {"trust_domain": "x"}, gw.clock)  # type: ignore[arg-type]


# -- nothing a device sends can break the service ----------------------------------------------

_SERVICE = LoopbackGateway()
_CHAIN = [base64.b64encode(der).decode() for der in hello_for(_SERVICE.mint("fuzz-dev")).chain]

TOPICS = st.sampled_from(
    [
        "fg/v1/enroll/fuzz-dev/req",
        "fg/v1/dev/fuzz-dev/renew/req",
        "fg/v1/enroll/other/req",
        "fg/v1/dev/x/telemetry",
        "garbage",
    ]
) | st.text(max_size=40)
PAYLOADS = st.binary(max_size=300) | st.builds(
    lambda kind, rid, fields: json.dumps({"v": 1, "type": kind, "id": rid, **fields}).encode(),
    st.sampled_from(["hello", "enroll", "token_enroll", "renew", "pending"]),
    st.sampled_from(["a", "b", "c"]),
    st.fixed_dictionaries(
        {},
        optional={
            "chain": st.just(_CHAIN),
            "csr": st.sampled_from(["", "AAAA", "MAA="]),
            "nonce": st.sampled_from(["A" * 44, "AAAA"]),
            "time": st.integers(-5, 2**64),
            "token": st.text(max_size=40),
            "signature": st.just("AAAA"),
        },
    ),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TOPICS, PAYLOADS)
def test_any_input_gives_nothing_or_exactly_one_answer_to_the_device(
    topic: str, payload: bytes
) -> None:
    replies = _SERVICE.service.handle(topic, payload)
    parsed = topics.parse_request_topic(topic)
    if parsed is None:
        assert replies == []
        return
    (reply,) = replies
    assert isinstance(reply, Publish)
    assert reply.topic == parsed.response
    answer = decode_response(reply.payload)
    assert isinstance(answer, Error | Challenge | IssuedCertificate)


def test_certificates_of_a_reattested_device_supersede_the_old_one(gw: LoopbackGateway) -> None:
    credential, first, _ = enroll_once(gw)
    challenge = gw.challenge(credential, "hello-2")
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="enroll-2")
    second = gw.ask("dev-1", request)
    assert isinstance(second, IssuedCertificate)
    rows = {r.serial: r.status for r in gw.store.certificates_for("dev-1")}
    assert rows == {
        x509.load_der_x509_certificate(first.certificate).serial_number: (
            CertificateStatus.SUPERSEDED
        ),
        x509.load_der_x509_certificate(second.certificate).serial_number: CertificateStatus.ACTIVE,
    }


def test_time_moves_only_with_the_clock(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    gw.clock.advance(timedelta(seconds=59))
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)


def test_the_whole_conversation_on_the_sql_registry(tmp_path: Any) -> None:
    from gateway.protocol.device import AwaitingApproval, Enrolled
    from gateway.registry import SqlStore

    store = SqlStore(f"sqlite:///{tmp_path / 'registry.db'}")
    try:
        gw = LoopbackGateway(store=store, auto_approve=())
        client = gw.device("dev-1")
        (waiting,) = gw.enroll(client)
        assert isinstance(waiting, AwaitingApproval)
        gw.approve("dev-1", actor="operator:alice")
        gw.clock.set(waiting.retry_at)
        (enrolled,) = gw.exchange(client, client.timeout())
        assert isinstance(enrolled, Enrolled)
        gw.clock.set(enrolled.renew_at)
        (renewed,) = gw.exchange(client, client.timeout())
        assert isinstance(renewed, Enrolled) and renewed.renewal
        statuses = sorted(r.status.value for r in store.certificates_for("dev-1"))
        assert statuses == ["active", "superseded"]
    finally:
        store.close()


# -- two workers answering at once (several gateways share one registry) ----------------------


def stale_once(monkeypatch: pytest.MonkeyPatch, store: Any, method: str, value: Any) -> None:
    """The next call of ``store.method`` returns ``value``: what a worker reads just before
    another worker commits."""
    real = getattr(store, method)
    calls = {"n": 0}

    def stale(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return value if calls["n"] == 1 else real(*args, **kwargs)

    monkeypatch.setattr(store, method, stale)


def test_a_worker_that_loses_the_race_publishes_the_winners_answer(
    gw: LoopbackGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    credential = gw.mint("dev-1")
    hello = encode(hello_for(credential))
    topic = topics.enroll_request("dev-1")
    other_worker = EnrollmentService(gw.store, gw.issuer, gw.policy, gw.clock)
    (winner,) = other_worker.handle(topic, hello)
    stale_once(monkeypatch, gw.store, "get_response", None)
    assert gw.service.handle(topic, hello) == [winner]


def test_a_refusal_that_loses_the_race_publishes_the_winners_answer(
    gw: LoopbackGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    topic = topics.enroll_request("dev-1")
    other_worker = EnrollmentService(gw.store, gw.issuer, gw.policy, gw.clock)
    (winner,) = other_worker.handle(topic, encode(request))
    stale_once(monkeypatch, gw.store, "get_response", None)
    # This worker finds the nonce spent and refuses, but the request already has an answer.
    assert gw.service.handle(topic, encode(request)) == [winner]
    assert isinstance(decode_response(winner.payload), IssuedCertificate)


def test_a_key_certified_by_another_worker_meanwhile_is_key_reuse(
    gw: LoopbackGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = LocalSigner.generate()
    first, second = gw.mint("dev-1"), gw.mint("dev-2")
    challenge_1, challenge_2 = gw.challenge(first), gw.challenge(second)
    request_1, _ = build_enroll(first, challenge_1.nonce, time=gw.now(), key=key)
    request_2, _ = build_enroll(second, challenge_2.nonce, time=gw.now(), key=key)
    assert isinstance(gw.ask("dev-1", request_1), IssuedCertificate)
    stale_once(monkeypatch, gw.store, "key_fingerprint_used", False)
    answer = gw.ask("dev-2", request_2)
    assert isinstance(answer, Error) and answer.reason == ReasonCode.KEY_REUSED
    assert gw.store.certificates_for("dev-2") == []
