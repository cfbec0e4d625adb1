"""Property tests for the decoder and both state machines: whatever arrives, in whatever order,
nothing raises, every request gets one decision, and the registry keeps its invariants.

tests/gateway/test_protocol_codec.py fuzzes ``decode_request`` with random bytes and random JSON
fields, and test_enrollment_service.py sends random payloads to ``handle``; these add mutated
*valid* messages, ``decode_response``, whole conversations against the gateway (a stateful test
with operators acting in between), and the device's machine on a hostile network.

The examples that touch DER parsing are derandomized: a run is repeatable, so a failure here
is a finding and never noise. ``gateway.bench_fuzz`` is the long, randomized search.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from gateway import operations
from gateway.audit import verify_chain
from gateway.enrollment.testing import LoopbackGateway, build_enroll, build_renew, hello_for
from gateway.protocol import (
    Challenge,
    Error,
    IssuedCertificate,
    Pending,
    ReasonCode,
    decode_request,
    decode_response,
    encode,
    topics,
)
from gateway.protocol.device import DeviceState, Enrolled, Rejected, Send
from gateway.protocol.errors import ProtocolError
from gateway.protocol.topics import Channel
from gateway.store import CertificateStatus, IdentityState
from pki.csr import public_key_fingerprint
from pki.keys import LocalSigner

_SETUP = LoopbackGateway()
_CREDENTIAL = _SETUP.mint("fuzz-1")
_CHALLENGE = _SETUP.challenge(_CREDENTIAL)
_ENROLL, _KEY = build_enroll(_CREDENTIAL, _CHALLENGE.nonce, time=_SETUP.now())
_ISSUED = _SETUP.ask("fuzz-1", _ENROLL)
assert isinstance(_ISSUED, IssuedCertificate)
_RENEW, _ = build_renew("fuzz-1", _KEY, time=_SETUP.now())
VALID_REQUESTS = [encode(hello_for(_CREDENTIAL)), encode(_ENROLL), encode(_RENEW)]
VALID_RESPONSES = [
    encode(_CHALLENGE),
    encode(_ISSUED),
    encode(Pending(id="p-1", retry_after=10)),
    encode(Error(id="e-1", reason=ReasonCode.NONCE_EXPIRED, detail="ask again")),
]


# Every draw below is made whatever the bytes are (positions are taken modulo the length), so
# the same choices replay the same way although keys, nonces and signatures differ per run.
POSITION = st.integers(0, 2**16)


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid message with a few bytes flipped, cut, inserted or removed."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        raw_position, bit = draw(POSITION), draw(st.integers(0, 7))
        extra, count = draw(st.binary(min_size=1, max_size=8)), draw(st.integers(1, 16))
        if not data:
            data = bytearray(extra)
            continue
        position = raw_position % len(data)
        match kind:
            case "flip":
                data[position] ^= 1 << bit
            case "cut":
                del data[position:]
            case "insert":
                data[position:position] = extra
            case _:
                del data[position : position + count]
    return bytes(data)


@st.composite
def der_mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid message whose base64 DER (certificates, CSR) was damaged inside, then encoded
    again: the X.509 parsers see the damage, not the base64 check."""
    original = draw(st.sampled_from(originals))
    which, slot = draw(POSITION), draw(POSITION)
    flips = [(draw(POSITION), draw(st.integers(0, 7))) for _ in range(draw(st.integers(1, 3)))]
    try:
        document = json.loads(original)
    except ValueError:
        return original
    if not isinstance(document, dict):
        return original
    fields = [k for k in ("certificate", "csr", "chain") if k in document]
    if not fields:
        return original
    name = fields[which % len(fields)]
    value = document[name]
    index = slot % len(value) if isinstance(value, list) and value else None
    try:
        der = bytearray(base64.b64decode(value[index] if index is not None else value))
    except (ValueError, TypeError):
        return original
    if not der:
        return original
    for position, bit in flips:
        der[position % len(der)] ^= 1 << bit
    encoded = base64.b64encode(bytes(der)).decode()
    if index is not None:
        value[index] = encoded
    else:
        document[name] = encoded
    return json.dumps(document).encode()


# -- the decoder -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(mutated(VALID_REQUESTS))
def test_mutated_requests_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        decode_request(payload)
    except ProtocolError as error:
        assert isinstance(error.code, ReasonCode)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | mutated(VALID_RESPONSES))
def test_any_response_bytes_raise_only_protocol_errors(payload: bytes) -> None:
    try:
        decode_response(payload)
    except ProtocolError as error:
        assert isinstance(error.code, ReasonCode)


# -- the gateway's machine, whole conversations ----------------------------------------------------


@dataclass
class Device:
    id: str
    credential: object
    nonce: bytes | None = None
    key: LocalSigner | None = None
    sent: list[tuple[str, bytes]] = field(default_factory=list)


class GatewayConversations(RuleBasedStateMachine):
    """Devices enroll, renew, retry, replay and garble while time passes and operators act.

    After every step: nothing was contained as an internal error, every certificate a device
    was sent has its row, no device has two active certificates, serials are unique, a revoked
    device never got a new certificate, and the audit chain verifies.
    """

    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.gw = LoopbackGateway(seed=7)
        self.devices = [Device(f"dev-{n}", self.gw.mint(f"dev-{n}")) for n in range(3)]
        self.first_answer: dict[tuple[str, bytes], bytes] = {}
        self.delivered: list[tuple[str, x509.Certificate]] = []
        self.revoked: set[str] = set()

    def send(self, device: Device, channel: Channel, payload: bytes) -> object:
        topic = topics.request_topic(channel, device.id)
        (reply,) = self.gw.service.handle(topic, payload)
        assert reply.topic == topics.response_topic(channel, device.id)
        answer = decode_response(reply.payload)
        key = (topic, payload)
        if key in self.first_answer:
            # The protocol's promise: the same request, the same answer, byte for byte.
            assert reply.payload == self.first_answer[key], answer
        self.first_answer.setdefault(key, reply.payload)
        device.sent.append(key)
        if isinstance(answer, IssuedCertificate):
            certificate = x509.load_der_x509_certificate(answer.certificate)
            assert device.id not in self.revoked or key in self.first_answer
            self.delivered.append((device.id, certificate))
        return answer

    @rule(target=requests, n=st.integers(0, 2))
    def hello(self, n: int) -> tuple[int, Channel, bytes]:
        device = self.devices[n]
        payload = encode(hello_for(device.credential, f"h{len(device.sent)}"))  # type: ignore[arg-type]
        answer = self.send(device, Channel.ENROLL, payload)
        if isinstance(answer, Challenge):
            device.nonce = answer.nonce
        return n, Channel.ENROLL, payload

    @rule(target=requests, n=st.integers(0, 2), lifetime=st.none() | st.integers(60, 7200))
    def enroll(self, n: int, lifetime: int | None) -> tuple[int, Channel, bytes]:
        device = self.devices[n]
        nonce = device.nonce or bytes(32)
        request, key = build_enroll(
            device.credential,  # type: ignore[arg-type]
            nonce,
            time=self.gw.now(),
            request_id=f"e{len(device.sent)}",
            lifetime=lifetime,
        )
        payload = encode(request)
        if isinstance(self.send(device, Channel.ENROLL, payload), IssuedCertificate):
            device.key = key
        return n, Channel.ENROLL, payload

    @precondition(lambda self: any(d.key is not None for d in self.devices))
    @rule(target=requests, n=st.integers(0, 2), reuse_key=st.booleans())
    def renew(self, n: int, reuse_key: bool) -> tuple[int, Channel, bytes]:
        device = next(d for d in self.devices[n:] + self.devices[:n] if d.key is not None)
        index = self.devices.index(device)
        assert device.key is not None
        request, key = build_renew(
            device.id,
            device.key,
            time=self.gw.now(),
            request_id=f"r{len(device.sent)}",
            key=device.key if reuse_key else None,
        )
        payload = encode(request)
        if isinstance(self.send(device, Channel.RENEW, payload), IssuedCertificate):
            device.key = key
        return index, Channel.RENEW, payload

    @rule(request=requests)
    def retry(self, request: tuple[int, Channel, bytes]) -> None:
        n, channel, payload = request
        self.send(self.devices[n], channel, payload)

    @rule(request=consumes(requests), data=st.data())
    def garble(self, request: tuple[int, Channel, bytes], data: st.DataObject) -> None:
        n, channel, payload = request
        damaged = data.draw(mutated([payload]) | der_mutated([payload]))
        other = data.draw(st.sampled_from([channel, Channel.ENROLL, Channel.RENEW]))
        self.send(self.devices[n], other, damaged)

    @rule(seconds=st.integers(0, 400))
    def time_passes(self, seconds: int) -> None:
        self.gw.clock.advance(timedelta(seconds=seconds))

    @rule(n=st.integers(0, 2), action=st.sampled_from(["quarantine", "release", "revoke"]))
    def operator(self, n: int, action: str) -> None:
        device = self.devices[n]
        state = {
            "quarantine": IdentityState.QUARANTINED,
            "release": IdentityState.ACTIVE,
            "revoke": IdentityState.REVOKED,
        }[action]
        try:
            operations.change_state(
                self.gw.store, device.id, state, action=action, actor="operator:fuzz",
                reason="fuzz", clock=self.gw.clock,
            )
        except operations.OperationError:
            return
        if state is IdentityState.REVOKED:
            self.revoked.add(device.id)

    @invariant()
    def nothing_was_contained(self) -> None:
        assert self.gw.service.metrics["errors.internal"] == 0

    @invariant()
    def every_delivered_certificate_has_its_row(self) -> None:
        for device_id, certificate in self.delivered:
            row = self.gw.store.get_certificate(certificate.serial_number)
            assert row is not None and row.identity_id == device_id
            assert row.public_key_fingerprint == public_key_fingerprint(certificate.public_key())

    @invariant()
    def one_active_certificate_and_unique_serials(self) -> None:
        serials = []
        for device in self.devices:
            rows = self.gw.store.certificates_for(device.id)
            active = [r for r in rows if r.status is CertificateStatus.ACTIVE]
            assert len(active) <= 1
            if device.id in self.revoked:
                assert not active
            serials.extend(r.serial for r in rows)
        assert len(serials) == len(set(serials))

    @invariant()
    def the_audit_chain_verifies(self) -> None:
        verdict = verify_chain(self.gw.store.audit_records(), [])
        assert verdict.ok, verdict.problem


GatewayConversations.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_gateway_conversations = GatewayConversations.TestCase


# -- the device's machine on a hostile network ----------------------------------------------------

NETWORK = st.lists(
    st.one_of(
        st.tuples(st.just("deliver"), st.integers(0, 5)),
        st.tuples(st.just("respond"), st.integers(0, 5)),
        st.tuples(st.just("duplicate"), st.integers(0, 5)),
        st.tuples(st.just("drop"), st.integers(0, 5)),
        st.tuples(st.just("garble"), st.integers(0, 5)),
        st.tuples(st.just("forge"), st.sampled_from(VALID_RESPONSES)),
        st.tuples(st.just("wait"), st.integers(0, 900)),
    ),
    max_size=30,
)


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(NETWORK, st.data())
def test_the_device_machine_survives_a_hostile_network_and_enrolls_on_a_clean_one(
    actions: list[tuple[str, object]], data: st.DataObject
) -> None:
    """Requests lost, answers lost, duplicated, reordered, garbled or forged: the device never
    raises, never sits without a deadline unless it gave up, never installs a certificate for a
    key it does not hold, and once the network behaves it ends enrolled (or it was told to give
    up by a forged final error)."""
    gw = LoopbackGateway(seed=3)
    client = gw.device("dev-1", random=random.Random(1))
    outbox: list[Send] = [e for e in client.start() if isinstance(e, Send)]
    inbox: list[tuple[str, bytes]] = []
    told_to_give_up = False

    def absorb(events: list[object]) -> None:
        nonlocal told_to_give_up
        for event in events:
            match event:
                case Send():
                    outbox.append(event)
                case Enrolled():
                    assert event.certificate.public_key() == event.key.public_key()
                case Rejected() if event.final:
                    told_to_give_up = True

    def check() -> None:
        assert isinstance(client.state, DeviceState)
        if client.state is not DeviceState.FAILED:
            assert client.next_deadline() is not None
        else:
            assert told_to_give_up

    for action, argument in actions:
        match action:
            case "deliver" if outbox:
                send = outbox.pop(min(int(argument), len(outbox) - 1))  # type: ignore[call-overload]
                for reply in gw.service.handle(send.topic, send.payload):
                    inbox.append((reply.topic, reply.payload))
            case "respond" | "duplicate" | "drop" | "garble" if inbox:
                index = min(int(argument), len(inbox) - 1)  # type: ignore[call-overload]
                topic, payload = inbox[index] if action == "duplicate" else inbox.pop(index)
                if action == "drop":
                    continue
                if action == "garble":
                    payload = data.draw(mutated([payload]) | der_mutated([payload]))
                absorb(client.receive(topic, payload))
            case "forge":
                topic = client.subscriptions(Channel.ENROLL)[0]
                absorb(client.receive(topic, argument))  # type: ignore[arg-type]
            case "wait":
                gw.clock.advance(timedelta(seconds=int(argument)))  # type: ignore[call-overload]
                absorb(client.timeout())
        check()

    # The network behaves from now on: everything is delivered, time moves to each deadline.
    for _ in range(60):
        if client.state in (DeviceState.ENROLLED, DeviceState.FAILED):
            break
        while outbox:
            send = outbox.pop(0)
            for reply in gw.service.handle(send.topic, send.payload):
                absorb(client.receive(reply.topic, reply.payload))
        deadline = client.next_deadline()
        if deadline is not None and client.state is not DeviceState.ENROLLED:
            gw.clock.set(max(deadline, gw.clock.now()))
            absorb(client.timeout())
        check()
    assert client.state is DeviceState.ENROLLED or told_to_give_up, client.state
    assert gw.service.metrics["errors.internal"] == 0


# -- findings of the fuzzers, kept as regressions -------------------------------------------------


def _with_version(der: bytes, version: int) -> bytes:
    marker = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2 (v3)
    position = der.index(marker)
    return der[: position + 4] + bytes([version]) + der[position + 5 :]


def test_a_birth_certificate_with_an_unknown_version_is_malformed_not_a_crash() -> None:
    gw = LoopbackGateway()
    chain = [c.public_bytes(Encoding.DER) for c in _CREDENTIAL.presented_chain]
    payload = json.loads(encode(hello_for(gw.mint("dev-9"))))
    payload["chain"] = [base64.b64encode(_with_version(chain[0], 5)).decode()]
    answer = gw.ask("dev-9", json.dumps(payload).encode())
    assert isinstance(answer, Error) and answer.reason == ReasonCode.BIRTH_CERT_MALFORMED
    assert gw.service.metrics["errors.internal"] == 0


def test_a_certificate_answer_with_an_unknown_version_is_not_installed_and_not_a_crash() -> None:
    gw = LoopbackGateway()
    client = gw.device("dev-8")
    (hello,) = client.start()
    assert isinstance(hello, Send)
    (challenge_reply,) = gw.service.handle(hello.topic, hello.payload)
    (enroll,) = client.receive(challenge_reply.topic, challenge_reply.payload)
    assert isinstance(enroll, Send)
    (reply,) = gw.service.handle(enroll.topic, enroll.payload)
    document = json.loads(reply.payload)
    document["certificate"] = base64.b64encode(
        _with_version(base64.b64decode(document["certificate"]), 7)
    ).decode()
    events = client.receive(reply.topic, json.dumps(document).encode())
    assert client.current is None
    assert [type(e) for e in events] == [Rejected]


def test_a_csr_with_an_unknown_version_is_bad_encoding() -> None:
    """Found with the cryptography-vectors bad-version CSR: it used to escape as an internal
    error (answered ``unavailable``, so the device would have retried it for ever)."""
    gw = LoopbackGateway()
    credential = gw.mint("dev-7")
    challenge = gw.challenge(credential)
    csr = bytearray(_ENROLL.csr)
    version = csr.index(b"\x02\x01\x00")  # INTEGER 0, first in certificationRequestInfo
    csr[version + 2] = 1
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), csr=bytes(csr))
    answer = gw.ask("dev-7", request)
    assert isinstance(answer, Error) and answer.reason == ReasonCode.BAD_ENCODING
    assert gw.service.metrics["errors.internal"] == 0
