"""The device-side state machine, driven without sockets: every transition, every refusal, lost
messages and expiry."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from gateway.enrollment.testing import DEFAULT_FIRMWARE, LoopbackGateway
from gateway.protocol import (
    Advice,
    Challenge,
    Error,
    IssuedCertificate,
    Pending,
    ReasonCode,
    Response,
    decode_request,
    encode,
    topics,
)
from gateway.protocol.device import (
    AwaitingApproval,
    DeviceClient,
    DeviceState,
    Enrolled,
    Event,
    Rejected,
    Send,
)
from gateway.protocol.topics import Channel
from pki.keys import LocalSigner


@pytest.fixture
def gw() -> LoopbackGateway:
    return LoopbackGateway()


E = TypeVar("E", Send, Enrolled, Rejected, AwaitingApproval)


def only(events: list[Event], kind: type[E]) -> E:
    (event,) = events
    assert isinstance(event, kind), events
    return event


def state(client: DeviceClient) -> DeviceState:
    # A function call, so that type checkers do not narrow the attribute across transitions.
    return client.state


def request_id(send: Send) -> str:
    return str(json.loads(send.payload)["id"])


def answer(client: DeviceClient, send: Send, response: Response) -> list[Event]:
    """Reply to ``send`` as the gateway would, with a hand-made response."""
    channel = send.channel
    return client.receive(topics.response_topic(channel, client.device_id), encode(response))


def enrolled_client(gw: LoopbackGateway, serial: str = "dev-1", **kw: object) -> DeviceClient:
    client = gw.device(serial, **kw)  # type: ignore[arg-type]
    only(gw.enroll(client), Enrolled)
    return client


# -- construction --------------------------------------------------------------------------


def test_a_device_needs_a_credential_or_a_token(gw: LoopbackGateway) -> None:
    with pytest.raises(ValueError):
        DeviceClient(None, firmware=DEFAULT_FIRMWARE, clock=gw.clock, device_id="x")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device_id": "bad/id"},
        {"retry_after": 0},
        {"retry_after": 500.0},
        {"response_timeout": 0},
        {"renew_jitter": 0.6},
    ],
)
def test_bad_settings_are_refused(gw: LoopbackGateway, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        gw.device("dev-1", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("lifetime", [0, 59, 30 * 86400 + 1, True, "60", 60.0])
def test_a_bad_lifetime_is_refused(gw: LoopbackGateway, lifetime: object) -> None:
    with pytest.raises((TypeError, ValueError), match="lifetime"):
        gw.device("dev-1", lifetime=lifetime)


def test_firmware_must_be_a_firmware(gw: LoopbackGateway) -> None:
    with pytest.raises(TypeError):
        DeviceClient(gw.mint("dev-1"), firmware="1.0", clock=gw.clock)  # type: ignore[arg-type]


def test_subscriptions_are_the_response_topics(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    assert client.subscriptions() == ["fg/v1/enroll/dev-1/resp", "fg/v1/dev/dev-1/renew/resp"]
    assert client.subscriptions(Channel.RENEW) == ["fg/v1/dev/dev-1/renew/resp"]
    assert state(client) is DeviceState.IDLE
    assert client.next_deadline() is None
    assert client.timeout() == []


# -- enrollment -------------------------------------------------------------------------------


def test_start_sends_a_hello_on_the_enrollment_listener(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    send = only(client.start(), Send)
    assert (send.topic, send.channel, send.qos) == ("fg/v1/enroll/dev-1/req", Channel.ENROLL, 1)
    assert decode_request(send.payload).TYPE == "hello"
    assert state(client) is DeviceState.HELLO_SENT
    assert client.next_deadline() == gw.clock.now() + timedelta(seconds=10)
    with pytest.raises(RuntimeError):
        client.start()


def test_a_challenge_is_answered_with_an_attested_enroll(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (reply,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(reply.topic, reply.payload), Send)
    message = decode_request(enroll.payload)
    assert message.TYPE == "enroll"
    assert state(client) is DeviceState.ENROLL_SENT


def test_a_full_enrollment_installs_certificate_and_key(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    enrolled = only(gw.enroll(client), Enrolled)
    assert state(client) is DeviceState.ENROLLED
    assert client.current == enrolled
    assert enrolled.renewal is False
    assert enrolled.certificate.public_key() == enrolled.key.public_key()
    leaf, issuing = x509.load_pem_x509_certificates(enrolled.certificate_pem)
    assert leaf == enrolled.certificate and issuing == gw.issuing_ca.certificate
    assert x509.load_pem_x509_certificate(enrolled.root_pem) == gw.root_ca.certificate
    key = load_pem_private_key(enrolled.private_key_pem, None)
    assert key.public_key() == enrolled.key.public_key()
    assert enrolled.not_after == enrolled.certificate.not_valid_after_utc
    assert client.next_deadline() == enrolled.renew_at


def test_renew_at_is_the_gateways_renew_after_with_a_little_device_jitter(
    gw: LoopbackGateway,
) -> None:
    for index in range(10):
        client = gw.device(f"dev-{index}", random=random.Random(index))
        issued_at = gw.clock.now()
        enrolled = only(gw.enroll(client), Enrolled)
        assert isinstance(enrolled, Enrolled)
        lifetime = (enrolled.not_after - issued_at).total_seconds()
        share = (enrolled.renew_at - issued_at).total_seconds() / lifetime
        assert 2 / 3 - 0.05 - 0.02 - 0.001 <= share <= 2 / 3 + 0.05 + 0.02 + 0.001


def test_a_lost_request_is_sent_again_byte_for_byte(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    gw.clock.advance(9)
    assert client.timeout() == []  # too early
    gw.clock.advance(1)
    again = only(client.timeout(), Send)
    assert again == hello
    assert state(client) is DeviceState.HELLO_SENT
    # Backoff: the next resend waits twice as long (give or take 10%).
    wait = (client.next_deadline() - gw.clock.now()).total_seconds()  # type: ignore[operator]
    assert 18 <= wait <= 22


def test_a_lost_answer_is_recovered_from_the_gateways_store(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    (lost,) = gw.service.handle(enroll.topic, enroll.payload)  # the answer never arrives
    gw.clock.advance(10)
    resent = only(client.timeout(), Send)
    assert resent == enroll
    (replayed,) = gw.service.handle(resent.topic, resent.payload)
    assert replayed == lost
    only(client.receive(replayed.topic, replayed.payload), Enrolled)
    assert len(gw.store.certificates_for("dev-1")) == 1


def test_late_duplicates_and_foreign_messages_are_ignored(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    other_id = Challenge(id="not-ours", nonce=bytes(32), expires_at=1)
    assert answer(client, hello, other_id) == []
    assert client.receive("fg/v1/enroll/dev-2/resp", encode(other_id)) == []
    assert client.receive("fg/v1/enroll/dev-1/resp", b"garbage") == []
    # A response type that makes no sense in this state is ignored too.
    assert answer(client, hello, Pending(id=request_id(hello), retry_after=1)) == []
    assert state(client) is DeviceState.HELLO_SENT


def test_pending_waits_then_sends_the_same_request_again() -> None:
    gw = LoopbackGateway(auto_approve=())
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    waiting = only(gw.exchange(client, [enroll]), AwaitingApproval)
    assert waiting.retry_at == gw.clock.now() + timedelta(seconds=10)
    assert state(client) is DeviceState.PENDING
    assert client.next_deadline() == waiting.retry_at
    gw.clock.advance(5)
    assert client.timeout() == []
    gw.clock.advance(5)
    retry = only(client.timeout(), Send)
    assert retry == enroll
    assert state(client) is DeviceState.ENROLL_SENT
    only(gw.exchange(client, [retry]), AwaitingApproval)
    gw.approve("dev-1", actor="operator:alice")
    deadline = client.next_deadline()
    assert deadline is not None
    gw.clock.set(deadline)
    only(gw.exchange(client, client.timeout()), Enrolled)


# -- renewal and expiry ----------------------------------------------------------------------


def test_renewal_at_renew_at_over_the_operational_listener(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    first = client.current
    assert first is not None
    gw.clock.set(first.renew_at)
    send = only(client.timeout(), Send)
    assert (send.topic, send.channel) == ("fg/v1/dev/dev-1/renew/req", Channel.RENEW)
    assert state(client) is DeviceState.RENEW_SENT
    renewed = only(gw.exchange(client, [send]), Enrolled)
    assert renewed.renewal is True
    assert renewed.key.public_key() != first.key.public_key()
    assert state(client) is DeviceState.ENROLLED


def test_an_expired_certificate_re_attests_from_hello(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    assert client.current is not None
    gw.clock.set(client.current.not_after + timedelta(seconds=1))
    hello = only(client.renew(), Send)
    assert decode_request(hello.payload).TYPE == "hello"
    assert state(client) is DeviceState.HELLO_SENT
    assert client.current is None
    only(gw.exchange(client, [hello]), Enrolled)
    assert len(gw.store.certificates_for("dev-1")) == 2


def test_a_device_that_slept_past_expiry_re_attests_on_timeout(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    gw.clock.advance(timedelta(days=2))
    hello = only(client.timeout(), Send)
    assert hello.channel is Channel.ENROLL
    only(gw.exchange(client, [hello]), Enrolled)


def test_a_renewal_refused_as_expired_re_attests(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    renew = only(client.renew(), Send)
    refusal = Error(id=request_id(renew), reason=ReasonCode.CERTIFICATE_EXPIRED)
    rejected, hello = answer(client, renew, refusal)
    assert isinstance(rejected, Rejected)
    assert rejected.advice is Advice.REATTEST
    assert not rejected.final
    assert isinstance(hello, Send) and decode_request(hello.payload).TYPE == "hello"
    only(gw.exchange(client, [hello]), Enrolled)


def test_a_renewal_gone_unanswered_past_expiry_re_attests(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    assert client.current is not None
    only(client.renew(), Send)  # lost
    gw.clock.set(client.current.not_after)
    hello = only(client.timeout(), Send)
    assert isinstance(hello, Send) and hello.channel is Channel.ENROLL


def test_a_quarantined_device_keeps_its_certificate_and_asks_again_later(
    gw: LoopbackGateway,
) -> None:
    client = enrolled_client(gw)
    current = client.current
    renew = only(client.renew(), Send)
    rejected = only(
        answer(client, renew, Error(id=request_id(renew), reason="device_quarantined")), Rejected
    )
    assert rejected.advice is Advice.RESTART
    assert state(client) is DeviceState.ENROLLED
    assert client.current == current
    gw.clock.set(client.next_deadline())  # type: ignore[arg-type]
    again = only(client.timeout(), Send)
    assert decode_request(again.payload).TYPE == "renew"
    assert request_id(again) != request_id(renew)


def test_renew_needs_a_certificate(gw: LoopbackGateway) -> None:
    with pytest.raises(RuntimeError):
        gw.device("dev-1").renew()


# -- refusals --------------------------------------------------------------------------------


def test_unavailable_means_the_same_request_again_after_a_pause(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    rejected = only(
        answer(client, hello, Error(id=request_id(hello), reason="unavailable")), Rejected
    )
    assert rejected.advice is Advice.RETRY
    assert state(client) is DeviceState.HELLO_SENT
    wait = (client.next_deadline() - gw.clock.now()).total_seconds()  # type: ignore[operator]
    assert 4.5 <= wait <= 5.5
    gw.clock.advance(wait)
    assert only(client.timeout(), Send) == hello


def test_a_final_refusal_ends_the_conversation(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    refusal = Error(id=request_id(hello), reason="device_revoked", detail="gone")
    rejected = only(answer(client, hello, refusal), Rejected)
    assert rejected == Rejected("device_revoked", "gone", Advice.GIVE_UP)
    assert rejected.final
    assert state(client) is DeviceState.FAILED
    assert client.next_deadline() is None
    gw.clock.advance(3600)
    assert client.timeout() == []
    assert answer(client, hello, refusal) == []


def test_a_stale_nonce_means_start_again_after_a_pause(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    gw.clock.advance(61)  # the nonce expires before the enroll arrives
    rejected = only(gw.exchange(client, [enroll]), Rejected)
    assert isinstance(rejected, Rejected)
    assert (rejected.reason, rejected.advice) == ("nonce_expired", Advice.RESTART)
    assert state(client) is DeviceState.IDLE
    gw.clock.set(client.next_deadline())  # type: ignore[arg-type]
    new_hello = only(client.timeout(), Send)
    assert request_id(new_hello) != request_id(hello)
    only(gw.exchange(client, [new_hello]), Enrolled)


def test_a_certificate_for_someone_elses_key_is_not_installed(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    (real,) = gw.service.handle(enroll.topic, enroll.payload)
    issued = json.loads(real.payload)
    stranger = enrolled_client(gw, "dev-2").current
    assert stranger is not None
    forged = IssuedCertificate(
        id=issued["id"],
        certificate=stranger.certificate.public_bytes(Encoding.DER),
        chain=(gw.issuing_ca.certificate.public_bytes(Encoding.DER),),
        not_after=issued["not_after"],
        renew_after=issued["renew_after"],
    )
    rejected = only(answer(client, enroll, forged), Rejected)
    assert rejected.advice is Advice.RESTART
    assert client.current is None
    assert state(client) is DeviceState.IDLE


def test_an_unknown_reason_code_is_treated_as_try_again_later(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    rejected = only(
        answer(client, hello, Error(id=request_id(hello), reason="from_the_future")), Rejected
    )
    assert rejected.advice is Advice.RESTART
    assert state(client) is DeviceState.IDLE


def test_restart_backoff_grows_and_is_capped(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1", retry_after=5.0, max_retry_after=60.0)
    waits = []
    hello = only(client.start(), Send)
    for _ in range(8):
        answer(client, hello, Error(id=request_id(hello), reason="nonce_unknown"))
        deadline = client.next_deadline()
        assert deadline is not None
        waits.append((deadline - gw.clock.now()).total_seconds())
        gw.clock.set(deadline)
        hello = only(client.timeout(), Send)
    assert waits[0] == pytest.approx(5, rel=0.11)
    assert waits[1] == pytest.approx(10, rel=0.11)
    assert waits[2] == pytest.approx(20, rel=0.11)
    assert max(waits) <= 66


# -- bootstrap tokens ------------------------------------------------------------------------


def test_a_token_device_enrolls_without_hello(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=5), actor="cli:root")
    client = gw.device(None, device_id="tok-1", token=token)
    send = only(client.start(), Send)
    assert decode_request(send.payload).TYPE == "token_enroll"
    assert state(client) is DeviceState.ENROLL_SENT
    only(gw.exchange(client, [send]), Enrolled)
    # Its token is spent: after expiry there is nothing left to re-enroll with.
    gw.clock.advance(timedelta(days=1))
    rejected = only(gw.exchange(client, client.timeout()), Rejected)
    assert rejected.reason == "token_reused"
    assert state(client) is DeviceState.FAILED


# -- a requested lifetime --------------------------------------------------------------------


def sent_lifetime(send: Send) -> object:
    return json.loads(send.payload).get("lifetime")


def test_a_device_asks_for_its_lifetime_in_enroll_and_renew(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1", lifetime=60)
    hello = only(client.start(), Send)
    assert sent_lifetime(hello) is None  # a hello asks for no certificate
    (reply,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(reply.topic, reply.payload), Send)
    assert sent_lifetime(enroll) == 60
    issued_at = gw.clock.now()
    enrolled = only(gw.exchange(client, [enroll]), Enrolled)
    assert enrolled.not_after - issued_at == timedelta(seconds=60)
    assert issued_at < enrolled.renew_at < enrolled.not_after
    gw.clock.set(enrolled.renew_at)
    renew = only(client.timeout(), Send)
    assert sent_lifetime(renew) == 60
    renewed_at = gw.clock.now().replace(microsecond=0)  # certificates keep whole seconds
    renewed = only(gw.exchange(client, [renew]), Enrolled)
    assert renewed.renewal is True
    assert renewed.not_after - renewed_at == timedelta(seconds=60)


def test_a_token_device_asks_for_its_lifetime(gw: LoopbackGateway) -> None:
    token = gw.create_token("tok-1", ttl=timedelta(minutes=5), actor="cli:root")
    client = gw.device(None, device_id="tok-1", token=token, lifetime=300)
    send = only(client.start(), Send)
    assert sent_lifetime(send) == 300
    issued_at = gw.clock.now()
    enrolled = only(gw.exchange(client, [send]), Enrolled)
    assert enrolled.not_after - issued_at == timedelta(seconds=300)


def test_a_device_that_asks_nothing_sends_no_lifetime(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (reply,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(reply.topic, reply.payload), Send)
    assert "lifetime" not in json.loads(enroll.payload)
    enrolled = only(gw.exchange(client, [enroll]), Enrolled)
    gw.clock.set(enrolled.renew_at)
    assert "lifetime" not in json.loads(only(client.timeout(), Send).payload)


# -- a lossy broker --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_enrollment_and_renewal_survive_a_broker_that_drops_messages(seed: int) -> None:
    gw = LoopbackGateway(seed=seed)
    client = gw.device("dev-1", random=random.Random(seed))
    drops = random.Random(seed)
    certificates: list[Enrolled] = []
    events = client.start()
    for _ in range(200):
        for event in events:
            if isinstance(event, Enrolled):
                certificates.append(event)
        sends = [e for e in events if isinstance(e, Send) and drops.random() > 0.4]
        events = []
        for send in sends:
            for reply in gw.service.handle(send.topic, send.payload):
                if drops.random() > 0.4:
                    events.extend(client.receive(reply.topic, reply.payload))
        if not events:
            deadline = client.next_deadline()
            assert deadline is not None
            gw.clock.set(max(deadline, gw.clock.now()))
            events = client.timeout()
        if len(certificates) >= 3:
            break
    assert len(certificates) >= 3
    assert state(client) in (DeviceState.ENROLLED, DeviceState.RENEW_SENT)
    rows = gw.store.certificates_for("dev-1")
    # Every certificate the device installed has its row; none was issued twice for a retry.
    assert {c.certificate.serial_number for c in certificates} <= {r.serial for r in rows}
    assert len({r.public_key_fingerprint for r in rows}) == len(rows)


def test_a_device_never_learns_a_new_key_from_a_response() -> None:
    # Enrolled.key is always the key the device generated itself.
    gw = LoopbackGateway()
    client = gw.device("dev-1")
    enrolled = only(gw.enroll(client), Enrolled)
    assert isinstance(enrolled.key, LocalSigner)
    assert enrolled.key.public_key() == enrolled.certificate.public_key()


def test_pending_answers_are_ignored_while_renewing(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    renew = only(client.renew(), Send)
    assert answer(client, renew, Pending(id=request_id(renew), retry_after=5)) == []
    assert state(client) is DeviceState.RENEW_SENT


def test_a_certificate_that_does_not_parse_is_not_installed(gw: LoopbackGateway) -> None:
    client = gw.device("dev-1")
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    junk = IssuedCertificate(
        id=request_id(enroll), certificate=b"junk", chain=(b"junk",), not_after=2, renew_after=1
    )
    rejected = only(answer(client, enroll, junk), Rejected)
    assert rejected.advice is Advice.RESTART
    assert state(client) is DeviceState.IDLE


# -- refusals in every waiting state ------------------------------------------------------


def enroll_sent(gw: LoopbackGateway, serial: str = "dev-1") -> tuple[DeviceClient, Send]:
    """A device whose enroll is on its way (hello and challenge done)."""
    client = gw.device(serial)
    hello = only(client.start(), Send)
    (challenge,) = gw.service.handle(hello.topic, hello.payload)
    enroll = only(client.receive(challenge.topic, challenge.payload), Send)
    assert state(client) is DeviceState.ENROLL_SENT
    return client, enroll


def wait_of(client: DeviceClient, gw: LoopbackGateway) -> float:
    deadline = client.next_deadline()
    assert deadline is not None
    return (deadline - gw.clock.now()).total_seconds()


def refuse(client: DeviceClient, send: Send, reason: str) -> list[Event]:
    return answer(client, send, Error(id=request_id(send), reason=reason))


@pytest.mark.parametrize("reason", ["unavailable", "rate_limited"])
def test_an_enroll_answered_retry_is_sent_again_byte_for_byte_after_a_pause(
    gw: LoopbackGateway, reason: str
) -> None:
    client, enroll = enroll_sent(gw)
    rejected = only(refuse(client, enroll, reason), Rejected)
    assert rejected.advice is Advice.RETRY
    assert state(client) is DeviceState.ENROLL_SENT
    assert 4.5 <= wait_of(client, gw) <= 5.5
    gw.clock.advance(wait_of(client, gw))
    again = only(client.timeout(), Send)
    assert again == enroll  # the same id and bytes: the nonce it carries is still good
    only(gw.exchange(client, [again]), Enrolled)


def test_an_enroll_answered_reattest_starts_over_from_hello_after_a_pause(
    gw: LoopbackGateway,
) -> None:
    client, enroll = enroll_sent(gw)
    rejected = only(refuse(client, enroll, "reattestation_required"), Rejected)
    assert rejected.advice is Advice.REATTEST
    # No operational certificate to drop: a new attempt, after the backoff (straight back
    # to hello would loop without a pause should a gateway answer enrolls that way).
    assert state(client) is DeviceState.IDLE
    assert client.current is None
    assert 4.5 <= wait_of(client, gw) <= 5.5
    gw.clock.advance(wait_of(client, gw))
    hello = only(client.timeout(), Send)
    assert decode_request(hello.payload).TYPE == "hello"
    assert request_id(hello) != request_id(enroll)
    only(gw.exchange(client, [hello]), Enrolled)


def test_a_renewal_answered_give_up_fails_for_good(gw: LoopbackGateway) -> None:
    client = enrolled_client(gw)
    current = client.current
    assert current is not None
    renew = only(client.renew(), Send)
    rejected = only(refuse(client, renew, "device_revoked"), Rejected)
    assert rejected.final and rejected.advice is Advice.GIVE_UP
    assert state(client) is DeviceState.FAILED
    assert client.next_deadline() is None
    # Nothing more, not even re-attestation once the certificate has expired.
    gw.clock.set(current.not_after + timedelta(days=1))
    assert client.timeout() == []
    assert refuse(client, renew, "device_revoked") == []
    with pytest.raises(RuntimeError):
        client.renew()


@pytest.mark.parametrize("reason", ["unavailable", "rate_limited"])
def test_a_renewal_answered_retry_keeps_the_certificate_and_resends(
    gw: LoopbackGateway, reason: str
) -> None:
    client = enrolled_client(gw)
    current = client.current
    renew = only(client.renew(), Send)
    rejected = only(refuse(client, renew, reason), Rejected)
    assert rejected.advice is Advice.RETRY
    assert state(client) is DeviceState.RENEW_SENT
    assert client.current == current
    assert 4.5 <= wait_of(client, gw) <= 5.5
    gw.clock.advance(wait_of(client, gw))
    again = only(client.timeout(), Send)
    assert again == renew and again.channel is Channel.RENEW
    renewed = only(gw.exchange(client, [again]), Enrolled)
    assert renewed.renewal


def pending_client() -> tuple[LoopbackGateway, DeviceClient, Send]:
    gw = LoopbackGateway(auto_approve=())
    client, enroll = enroll_sent(gw)
    only(gw.exchange(client, [enroll]), AwaitingApproval)
    assert state(client) is DeviceState.PENDING
    return gw, client, enroll


def test_pending_then_revoked_gives_up() -> None:
    # A second copy of the enroll (sent before the pending answer came) is answered after an
    # operator revoked the device.
    gw, client, enroll = pending_client()
    rejected = only(refuse(client, enroll, "device_revoked"), Rejected)
    assert rejected.final
    assert state(client) is DeviceState.FAILED
    assert client.next_deadline() is None
    gw.clock.advance(3600)
    assert client.timeout() == []


def test_pending_then_unavailable_keeps_waiting_and_sends_the_same_enroll() -> None:
    gw, client, enroll = pending_client()
    rejected = only(refuse(client, enroll, "unavailable"), Rejected)
    assert rejected.advice is Advice.RETRY
    assert state(client) is DeviceState.PENDING
    assert 4.5 <= wait_of(client, gw) <= 5.5
    gw.clock.advance(wait_of(client, gw))
    again = only(client.timeout(), Send)
    assert again == enroll
    assert state(client) is DeviceState.ENROLL_SENT
    gw.approve("dev-1")
    only(gw.exchange(client, [again]), Enrolled)


def test_pending_then_a_restart_code_begins_a_new_attempt_after_a_pause() -> None:
    gw, client, enroll = pending_client()
    rejected = only(refuse(client, enroll, "device_quarantined"), Rejected)
    assert rejected.advice is Advice.RESTART
    assert state(client) is DeviceState.IDLE
    assert 4.5 <= wait_of(client, gw) <= 5.5
    gw.clock.advance(wait_of(client, gw))
    hello = only(client.timeout(), Send)
    assert decode_request(hello.payload).TYPE == "hello"


def test_a_certificate_that_arrives_while_pending_is_installed() -> None:
    # Two copies of the enroll were in flight: the first was answered pending, then an
    # operator approved, and the second is answered with the certificate.
    gw, client, enroll = pending_client()
    gw.approve("dev-1")
    (issued,) = gw.service.handle(enroll.topic, enroll.payload)
    enrolled = only(client.receive(issued.topic, issued.payload), Enrolled)
    assert state(client) is DeviceState.ENROLLED
    assert client.next_deadline() == enrolled.renew_at


def test_restart_backoff_grows_while_enrollments_are_refused(gw: LoopbackGateway) -> None:
    # A device refused at enroll time after time (here: its clock is off) waits longer each
    # time, although every attempt gets a fresh challenge first.
    client = gw.device("dev-1", retry_after=5.0, max_retry_after=60.0)
    waits = []
    events = client.start()
    for _ in range(6):
        hello = only(events, Send)
        (challenge,) = gw.service.handle(hello.topic, hello.payload)
        enroll = only(client.receive(challenge.topic, challenge.payload), Send)
        only(refuse(client, enroll, "clock_skew"), Rejected)
        waits.append(wait_of(client, gw))
        gw.clock.advance(waits[-1])
        events = client.timeout()
    assert waits[0] == pytest.approx(5, rel=0.11)
    assert waits[1] == pytest.approx(10, rel=0.11)
    assert waits[2] == pytest.approx(20, rel=0.11)
    assert 54 <= max(waits) <= 66
    # A certificate ends the streak: the next refusal waits the first pause again.
    only(gw.exchange(client, events), Enrolled)
    renew = only(client.renew(), Send)
    only(refuse(client, renew, "device_quarantined"), Rejected)
    assert 4.5 <= wait_of(client, gw) <= 5.5
