"""The device side of protocol v1 as a sans-I/O state machine.

The driver (a simulator, a test, or firmware glue) owns the connections and the timer::

    client = DeviceClient(credential, firmware=..., clock=clock)
    subscribe(client.subscriptions())            # once per connection
    publish_all(client.start())                  # Send events
    on message:   handle(client.receive(topic, payload))
    at client.next_deadline():   handle(client.timeout())

``receive`` and ``timeout`` return events: ``Send`` (publish this, on the listener its
``channel`` names), ``Enrolled`` (new operational certificate and key), ``AwaitingApproval`` and
``Rejected``. States::

    IDLE --start--> HELLO_SENT --challenge--> ENROLL_SENT --certificate--> ENROLLED
    IDLE --start--> ENROLL_SENT                                 (token devices: no hello)
    ENROLL_SENT --pending--> PENDING --timeout--> ENROLL_SENT   (the same request again)
    PENDING --certificate--> ENROLLED                 (an earlier copy's answer, once approved)
    ENROLLED --timeout at renew_at / renew()--> RENEW_SENT --certificate--> ENROLLED
    ENROLLED or RENEW_SENT with an expired certificate --> HELLO_SENT (re-attest)
    any --error with advice give_up--> FAILED;  restart --> IDLE (and start again at the deadline)
    RENEW_SENT --error with advice reattest--> HELLO_SENT;  while enrolling it is a restart
    any waiting state --error with advice retry--> the same state, the same request at the deadline

A timeout while waiting resends the same request (same id, same bytes): the gateway answers a
repeat from its store, so a lost message costs a delay, never a second nonce or certificate.
Two counters pace the device: the resends of the request in flight double its answer timeout
(reset by every new request), and the refusals since the last certificate double the pause
before a retry or restart (a fresh challenge does not reset it: a device refused at every
enroll must still slow down).
"""

from __future__ import annotations

import base64
import hashlib
import os
import random as random_module
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from gateway.protocol import topics
from gateway.protocol.codec import decode_response, encode
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import (
    Challenge,
    Enroll,
    Error,
    Firmware,
    Hello,
    IssuedCertificate,
    Pending,
    Renew,
    Request,
    TokenEnroll,
    check_lifetime,
)
from gateway.protocol.reasons import Advice, ReasonCode, advice_for
from gateway.protocol.renewal import renewal_bytes
from gateway.protocol.topics import Channel
from pki.attestation import EvidenceClaims, sign_evidence
from pki.clock import Clock
from pki.csr import make_csr
from pki.factory import BirthCredential
from pki.keys import KeyType, LocalSigner

DEVICE_NONCE_BYTES = 32


class DeviceState(StrEnum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    ENROLL_SENT = "enroll_sent"
    PENDING = "pending"
    ENROLLED = "enrolled"
    RENEW_SENT = "renew_sent"
    FAILED = "failed"


@dataclass(frozen=True)
class Send:
    """Publish ``payload`` on ``topic`` (QoS 1) over the listener ``channel`` names:
    enrollment (server-auth TLS) or operational (mutual TLS with the current certificate)."""

    topic: str
    payload: bytes
    channel: Channel
    qos: int = 1


@dataclass(frozen=True)
class Enrolled:
    """A new operational certificate; ``renewal`` when it replaces a still valid one."""

    certificate: x509.Certificate
    key: LocalSigner
    chain: tuple[x509.Certificate, ...]  # issuing CA ... root
    not_after: datetime
    renew_at: datetime  # the gateway's renew-after with this device's own jitter
    renewal: bool

    @property
    def certificate_pem(self) -> bytes:
        """Leaf then intermediates (the root stays out): what a TLS client presents."""
        presented = (self.certificate, *self.chain[:-1])
        return b"".join(c.public_bytes(Encoding.PEM) for c in presented)

    @property
    def root_pem(self) -> bytes:
        return self.chain[-1].public_bytes(Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        return self.key.private_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )


@dataclass(frozen=True)
class AwaitingApproval:
    """The gateway waits for an operator; the request is sent again at ``retry_at``."""

    retry_at: datetime


@dataclass(frozen=True)
class Rejected:
    reason: str  # a ReasonCode value (or a newer code this version does not know)
    detail: str
    advice: Advice

    @property
    def final(self) -> bool:
        return self.advice is Advice.GIVE_UP


Event = Send | Enrolled | AwaitingApproval | Rejected


@dataclass(frozen=True)
class _InFlight:
    request: Request
    send: Send
    key: LocalSigner | None  # the new key a CSR in this request certifies


class DeviceClient:
    """One device's enrollment and renewal conversation; see the module docstring."""

    def __init__(
        self,
        credential: BirthCredential | None,
        *,
        firmware: Firmware,
        clock: Clock,
        device_id: str | None = None,
        token: str | None = None,
        key_type: KeyType = KeyType.P256,
        random_bytes: Callable[[int], bytes] = os.urandom,
        random: random_module.Random | None = None,
        retry_after: float = 5.0,
        max_retry_after: float = 300.0,
        response_timeout: float = 10.0,
        renew_jitter: float = 0.02,
        lifetime: int | None = None,
    ) -> None:
        """``lifetime``: seconds of certificate life to ask for in every enroll, token_enroll
        and renew request (the gateway grants at most its policy's); ``None`` asks for nothing.
        """
        if credential is None and token is None:
            raise ValueError("a device needs a birth credential or a bootstrap token")
        name = device_id if device_id is not None else getattr(credential, "serial_number", None)
        if not isinstance(name, str) or not topics.valid_device_id(name):
            raise ValueError(f"{name!r} is not a valid device id")
        if not isinstance(firmware, Firmware):
            raise TypeError("firmware must be a Firmware")
        if not 0 < retry_after <= max_retry_after:
            raise ValueError("retry_after must be positive and at most max_retry_after")
        if response_timeout <= 0:
            raise ValueError("response_timeout must be positive")
        if not 0 <= renew_jitter < 0.5:
            raise ValueError("renew_jitter must lie in [0, 0.5)")
        check_lifetime(lifetime)
        self.device_id = name
        self.firmware = firmware
        self._credential = credential
        self._token = token
        self._clock = clock
        self._key_type = key_type
        self._random_bytes = random_bytes
        self._rng = random or random_module.Random()
        self._retry_after = retry_after
        self._max_retry_after = max_retry_after
        self._response_timeout = response_timeout
        self._renew_jitter = renew_jitter
        self.lifetime = lifetime
        self.state = DeviceState.IDLE
        self.current: Enrolled | None = None  # the operational credential in use
        self._in_flight: _InFlight | None = None
        self._deadline: datetime | None = None
        self._resends = 0  # of the request in flight: its answer timeout doubles with each
        self._refusals = 0  # since the last certificate: the pause before trying again doubles

    # -- what the driver asks ------------------------------------------------------------------

    def subscriptions(self, channel: Channel | None = None) -> list[str]:
        """Response topics to subscribe to before sending: the enrollment listener's, the
        operational listener's, or (``None``) both."""
        wanted = [Channel.ENROLL, Channel.RENEW] if channel is None else [channel]
        return [topics.response_topic(c, self.device_id) for c in wanted]

    def next_deadline(self) -> datetime | None:
        """When to call ``timeout()``: resend, retry, restart, or renew. ``None``: nothing is
        due (idle before ``start()``, or failed)."""
        return self._deadline

    # -- inputs --------------------------------------------------------------------------------

    def start(self) -> list[Event]:
        """Begin enrolling: a hello (birth credential) or a token_enroll (token)."""
        if self.state is not DeviceState.IDLE:
            raise RuntimeError(f"start() in state {self.state}; only from idle")
        return self._begin()

    def receive(self, topic: str, payload: bytes) -> list[Event]:
        """A message on one of our response topics. Responses to anything but the request in
        flight (late duplicates, undecodable bytes) are ignored: the timer recovers."""
        if topic not in self.subscriptions() or self._in_flight is None:
            return []
        try:
            response = decode_response(payload)
        except ProtocolError:
            return []
        in_flight = self._in_flight
        if response.id != in_flight.request.id:
            return []
        match response:
            case Challenge() if self.state is DeviceState.HELLO_SENT:
                return self._send_enroll(response)
            case IssuedCertificate() if self.state in (
                DeviceState.ENROLL_SENT,
                DeviceState.PENDING,  # a copy sent before the pending answer, now approved
                DeviceState.RENEW_SENT,
            ):
                return self._accept(response, in_flight)
            case Pending() if self.state is DeviceState.ENROLL_SENT:
                retry_at = self._clock.now() + timedelta(seconds=response.retry_after)
                self.state = DeviceState.PENDING
                self._deadline = retry_at
                return [AwaitingApproval(retry_at)]
            case Error():
                return self._refused(response.reason, response.detail)
        return []

    def timeout(self) -> list[Event]:
        """Do what is due at ``next_deadline()``; nothing if called early."""
        now = self._clock.now()
        if self._deadline is None or now < self._deadline:
            return []
        match self.state:
            case DeviceState.IDLE:
                return self._begin()
            case DeviceState.ENROLLED:
                return self.renew()
            case DeviceState.RENEW_SENT if self._expired(now):
                return self.expired()
            case (
                DeviceState.HELLO_SENT
                | DeviceState.ENROLL_SENT
                | DeviceState.PENDING
                | DeviceState.RENEW_SENT
            ):
                return self._resend()
        return []

    def renew(self) -> list[Event]:
        """Renew now over the operational listener: a new key, signed with the current one.
        With an expired certificate this re-attests instead (from hello)."""
        if self.current is None or self.state not in (DeviceState.ENROLLED, DeviceState.RENEW_SENT):
            raise RuntimeError(f"renew() needs an operational certificate (state {self.state})")
        if self._expired(self._clock.now()):
            return self.expired()
        key = LocalSigner.generate(self._key_type)
        csr = make_csr(key, self.device_id)
        request_id = self._new_id()
        time = self._unix_now()
        signature = self.current.key.sign(renewal_bytes(self.device_id, request_id, csr, time))
        request = Renew(
            id=request_id,
            csr=csr,
            time=time,
            signature=signature,
            firmware=self.firmware,
            lifetime=self.lifetime,
        )
        return self._send(request, Channel.RENEW, DeviceState.RENEW_SENT, key)

    def expired(self) -> list[Event]:
        """The operational certificate is no good any more: enroll again from the start."""
        self.current = None
        self.state = DeviceState.IDLE
        return self._begin()

    # -- transitions ---------------------------------------------------------------------------

    def _begin(self) -> list[Event]:
        if self._credential is not None:
            der_chain = tuple(
                c.public_bytes(Encoding.DER) for c in self._credential.presented_chain
            )
            hello = Hello(id=self._new_id(), chain=der_chain)
            return self._send(hello, Channel.ENROLL, DeviceState.HELLO_SENT, None)
        assert self._token is not None
        key = LocalSigner.generate(self._key_type)
        request = TokenEnroll(
            id=self._new_id(),
            token=self._token,
            csr=make_csr(key, self.device_id),
            time=self._unix_now(),
            firmware=self.firmware,
            lifetime=self.lifetime,
        )
        return self._send(request, Channel.ENROLL, DeviceState.ENROLL_SENT, key)

    def _send_enroll(self, challenge: Challenge) -> list[Event]:
        assert self._credential is not None and self._in_flight is not None
        key = LocalSigner.generate(self._key_type)
        csr = make_csr(key, self.device_id)
        device_nonce = self._random_bytes(DEVICE_NONCE_BYTES)
        claims = EvidenceClaims(
            device_id=self.device_id,
            gateway_nonce=challenge.nonce,
            device_nonce=device_nonce,
            csr_digest=_sha256(csr),
            firmware_version=self.firmware.version,
            firmware_digest=self.firmware.digest,
        )
        hello = self._in_flight.request
        assert isinstance(hello, Hello)
        request = Enroll(
            id=self._new_id(),
            nonce=challenge.nonce,
            device_nonce=device_nonce,
            csr=csr,
            chain=hello.chain,
            firmware=self.firmware,
            time=self._unix_now(),
            evidence=sign_evidence(self._credential.signer, claims),
            lifetime=self.lifetime,
        )
        return self._send(request, Channel.ENROLL, DeviceState.ENROLL_SENT, key)

    def _accept(self, response: IssuedCertificate, in_flight: _InFlight) -> list[Event]:
        try:
            certificate = x509.load_der_x509_certificate(response.certificate)
            chain = tuple(x509.load_der_x509_certificate(der) for der in response.chain)
            ours = in_flight.key is not None and (
                certificate.public_key() == in_flight.key.public_key()
            )
        except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
            ours = False
        if not ours:
            # Never install a certificate for a key we do not hold; ask again later.
            return self._refused(
                ReasonCode.INVALID_FIELD.value,
                "the certificate does not certify the key of our request",
                Advice.RESTART,
            )
        assert in_flight.key is not None
        not_after = datetime.fromtimestamp(response.not_after, tz=UTC)
        renew_at = self._jittered_renewal(certificate, response.renew_after, not_after)
        enrolled = Enrolled(
            certificate=certificate,
            key=in_flight.key,
            chain=chain,
            not_after=not_after,
            renew_at=renew_at,
            renewal=self.state is DeviceState.RENEW_SENT,
        )
        self.current = enrolled
        self.state = DeviceState.ENROLLED
        self._in_flight = None
        self._refusals = 0
        self._deadline = renew_at
        return [enrolled]

    def _jittered_renewal(
        self, certificate: x509.Certificate, renew_after: int, not_after: datetime
    ) -> datetime:
        """The gateway's renew-after moved by +- ``renew_jitter`` of the lifetime, so devices
        enrolled by one gateway in one burst spread out further; never past ``not_after``."""
        lifetime = (not_after - certificate.not_valid_before_utc).total_seconds()
        offset = self._rng.uniform(-self._renew_jitter, self._renew_jitter) * lifetime
        at = datetime.fromtimestamp(renew_after, tz=UTC) + timedelta(seconds=offset)
        latest = not_after - timedelta(seconds=max(lifetime * 0.05, 1.0))
        return max(min(at, latest), certificate.not_valid_before_utc)

    def _refused(self, reason: str, detail: str, advice: Advice | None = None) -> list[Event]:
        advice = advice or advice_for(reason)
        rejected = Rejected(reason=reason, detail=detail, advice=advice)
        now = self._clock.now()
        renewing = self.state is DeviceState.RENEW_SENT
        match advice:
            case Advice.GIVE_UP:
                self.state = DeviceState.FAILED
                self._in_flight = None
                self._deadline = None
                return [rejected]
            case Advice.RETRY:
                # Same request, same id, after a pause (the state stays: we still wait).
                self._deadline = now + self._backoff()
                return [rejected]
            case Advice.REATTEST if renewing:
                self._in_flight = None
                return [rejected, *self.expired()]
        # RESTART: a new attempt after a pause; a renewal keeps its certificate meanwhile.
        # REATTEST while enrolling too: there is no operational certificate to drop, and
        # going straight back to hello would loop without a pause.
        self._in_flight = None
        self.state = DeviceState.ENROLLED if renewing and self.current else DeviceState.IDLE
        self._deadline = now + self._backoff()
        return [rejected]

    def _resend(self) -> list[Event]:
        assert self._in_flight is not None
        if self.state is DeviceState.PENDING:
            self.state = DeviceState.ENROLL_SENT
        # The first wait was response_timeout; each resend waits twice as long as the last.
        self._resends = min(self._resends + 1, 32)
        self._deadline = self._clock.now() + self._delay(self._response_timeout, self._resends)
        return [self._in_flight.send]

    def _send(
        self, request: Request, channel: Channel, state: DeviceState, key: LocalSigner | None
    ) -> list[Event]:
        send = Send(topics.request_topic(channel, self.device_id), encode(request), channel)
        self._in_flight = _InFlight(request, send, key)
        self.state = state
        self._resends = 0
        self._deadline = self._clock.now() + timedelta(seconds=self._response_timeout)
        return [send]

    # -- helpers -------------------------------------------------------------------------------

    def _expired(self, now: datetime) -> bool:
        return self.current is not None and now >= self.current.not_after

    def _delay(self, base: float, doublings: int) -> timedelta:
        """``base`` doubled ``doublings`` times, capped, with +-10% jitter so that devices
        refused together do not come back together."""
        seconds = min(base * 2**doublings, self._max_retry_after)
        return timedelta(seconds=seconds * self._rng.uniform(0.9, 1.1))

    def _backoff(self) -> timedelta:
        delay = self._delay(self._retry_after, self._refusals)
        self._refusals = min(self._refusals + 1, 32)
        return delay

    def _new_id(self) -> str:
        return base64.urlsafe_b64encode(self._random_bytes(12)).decode("ascii")

    def _unix_now(self) -> int:
        return int(self._clock.now().timestamp())


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
