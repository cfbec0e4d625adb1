"""A whole enrollment setup in memory, for tests and broker-less simulations.

``LoopbackGateway`` wires an ``EnrollmentService`` to a ``MemoryStore``, a fresh gateway CA and
a manufacturer (``FactoryCA``) under one ``FakeClock``, and carries a ``DeviceClient``'s
messages to the service and back the way a broker would (but without losing any).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from gateway import operations
from gateway.enrollment.policy import ApprovalRule, EnrollmentPolicy
from gateway.enrollment.service import EnrollmentService
from gateway.protocol import topics
from gateway.protocol.codec import decode_response, encode
from gateway.protocol.device import DeviceClient, Event, Send
from gateway.protocol.messages import Challenge, Enroll, Firmware, Hello, Renew, Request, Response
from gateway.protocol.renewal import renewal_bytes
from gateway.protocol.topics import Channel
from gateway.store import IdentityRecord, Store
from gateway.store_memory import MemoryStore
from pki.attestation import EvidenceClaims, sign_evidence
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.csr import make_csr
from pki.factory import BirthCredential, FactoryCA
from pki.issue import Issuer
from pki.keys import LocalSigner, Signer

TRUST_DOMAIN = "fleet.test"
DEFAULT_MODEL = "sensor-v1"
DEFAULT_FIRMWARE = Firmware(version="1.0.0", digest=hashlib.sha256(b"firmware 1.0.0").hexdigest())


class LoopbackGateway:
    def __init__(
        self,
        *,
        clock: FakeClock | None = None,
        store: Store | None = None,
        manufacturer: str = "Acme Sensors",
        seed: int = 0,
        **policy: Any,
    ) -> None:
        """``policy`` overrides ``EnrollmentPolicy`` fields; by default every device of the
        factory is approved at once (``auto_approve=(ApprovalRule(),)``)."""
        self.clock = clock or FakeClock()
        self.store: Store = store if store is not None else MemoryStore()
        self.factory = FactoryCA.create(manufacturer, self.clock)
        self.root_ca: CertificateAuthority = create_root_ca(
            LocalSigner.generate(), "Fleetgate Test Root", self.clock
        )
        self.issuing_ca: CertificateAuthority = create_issuing_ca(
            self.root_ca, LocalSigner.generate(), "Fleetgate Test Issuing", self.clock
        )
        self.issuer = Issuer(self.issuing_ca, self.clock)
        self.rng = random.Random(seed)
        settings: dict[str, Any] = {
            "trust_domain": TRUST_DOMAIN,
            "trusted_roots": (self.factory.root,),
            "auto_approve": (ApprovalRule(),),
        }
        settings.update(policy)
        self.policy = EnrollmentPolicy(**settings)
        self.service = self._service()

    def _service(self) -> EnrollmentService:
        jitter = random.Random(self.rng.random())
        return EnrollmentService(self.store, self.issuer, self.policy, self.clock, random=jitter)

    def approve(self, device_id: str, actor: str = "operator:alice") -> IdentityRecord:
        """What `fleetgate device approve` does, on this gateway's store and clock."""
        return operations.approve(self.store, device_id, actor=actor, clock=self.clock)

    def create_token(
        self, device_id: str, ttl: timedelta = timedelta(minutes=10), actor: str = "cli:root"
    ) -> str:
        """What `fleetgate token create` does, on this gateway's store and clock."""
        return operations.create_token(
            self.store, device_id, ttl=ttl, actor=actor, clock=self.clock
        )

    def with_policy(self, **changes: Any) -> EnrollmentService:
        """Replace the policy (same store, CA and clock), as a gateway restart would."""
        self.policy = dataclasses.replace(self.policy, **changes)
        self.service = self._service()
        return self.service

    def mint(
        self, serial_number: str, model: str = DEFAULT_MODEL, **kwargs: Any
    ) -> BirthCredential:
        return self.factory.mint(serial_number, model, **kwargs)

    def device(
        self,
        credential: BirthCredential | str | None,
        *,
        firmware: Firmware = DEFAULT_FIRMWARE,
        **kwargs: Any,
    ) -> DeviceClient:
        """A device for ``credential`` (a serial number mints a new birth certificate)."""
        if isinstance(credential, str):
            credential = self.mint(credential)
        kwargs.setdefault("random", random.Random(self.rng.random()))
        return DeviceClient(credential, firmware=firmware, clock=self.clock, **kwargs)

    def exchange(self, client: DeviceClient, events: Iterable[Event]) -> list[Event]:
        """Deliver every ``Send`` to the service and every answer back to ``client`` until
        nothing is left to send; return the other events in order."""
        pending = list(events)
        seen: list[Event] = []
        while pending:
            event = pending.pop(0)
            if not isinstance(event, Send):
                seen.append(event)
                continue
            for publish in self.service.handle(event.topic, event.payload):
                pending.extend(client.receive(publish.topic, publish.payload))
        return seen

    def enroll(self, client: DeviceClient) -> list[Event]:
        """``start()`` and run the conversation to its end."""
        return self.exchange(client, client.start())

    # -- hand-made requests, for tests of what a well-behaved device would never send ----------

    def ask(
        self, device_id: str, request: Request | bytes, channel: Channel = Channel.ENROLL
    ) -> Response:
        """Send one request (a message or raw bytes) as ``device_id`` and decode the answer."""
        payload = request if isinstance(request, bytes) else encode(request)
        (answer,) = self.service.handle(topics.request_topic(channel, device_id), payload)
        assert answer.topic == topics.response_topic(channel, device_id)
        return decode_response(answer.payload)

    def challenge(self, credential: BirthCredential, request_id: str = "hello-1") -> Challenge:
        answer = self.ask(credential.serial_number, hello_for(credential, request_id))
        assert isinstance(answer, Challenge), answer
        return answer

    def now(self) -> int:
        return int(self.clock.now().timestamp())


def der_chain(credential: BirthCredential) -> tuple[bytes, ...]:
    return tuple(c.public_bytes(Encoding.DER) for c in credential.presented_chain)


def hello_for(credential: BirthCredential, request_id: str = "hello-1") -> Hello:
    return Hello(id=request_id, chain=der_chain(credential))


def build_enroll(
    credential: BirthCredential,
    nonce: bytes,
    *,
    time: int,
    request_id: str = "enroll-1",
    device_id: str | None = None,
    key: LocalSigner | None = None,
    csr: bytes | None = None,
    firmware: Firmware = DEFAULT_FIRMWARE,
    device_nonce: bytes = bytes(range(100, 132)),
    chain: tuple[bytes, ...] | None = None,
    evidence_signer: Signer | None = None,
    lifetime: int | None = None,
) -> tuple[Enroll, LocalSigner]:
    """An enroll request as a device builds it, with every part replaceable by a test."""
    key = key or LocalSigner.generate()
    device_id = device_id or credential.serial_number
    csr = csr if csr is not None else make_csr(key, device_id)
    claims = EvidenceClaims(
        device_id=device_id,
        gateway_nonce=nonce,
        device_nonce=device_nonce,
        csr_digest=hashlib.sha256(csr).digest(),
        firmware_version=firmware.version,
        firmware_digest=firmware.digest,
    )
    request = Enroll(
        id=request_id,
        nonce=nonce,
        device_nonce=device_nonce,
        csr=csr,
        chain=chain if chain is not None else der_chain(credential),
        firmware=firmware,
        time=time,
        evidence=sign_evidence(evidence_signer or credential.signer, claims),
        lifetime=lifetime,
    )
    return request, key


def build_renew(
    device_id: str,
    current_key: Signer,
    *,
    time: int,
    request_id: str = "renew-1",
    key: LocalSigner | None = None,
    csr: bytes | None = None,
    firmware: Firmware | None = None,
    lifetime: int | None = None,
) -> tuple[Renew, LocalSigner]:
    """A renew request signed with ``current_key`` (the operational key a device holds)."""
    key = key or LocalSigner.generate()
    csr = csr if csr is not None else make_csr(key, device_id)
    signature = current_key.sign(renewal_bytes(device_id, request_id, csr, time))
    request = Renew(
        id=request_id,
        csr=csr,
        time=time,
        signature=signature,
        firmware=firmware,
        lifetime=lifetime,
    )
    return request, key
