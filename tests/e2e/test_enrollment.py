"""Enrollment end to end: real gateway, embedded broker, TLS on loopback, SQLite registry.

Devices are driven by the same `DeviceClient` the simulators use, over aiomqtt.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import aiomqtt
import pytest
from cryptography import x509

from gateway.acl import Action, Principal
from gateway.operations import approve, create_token
from gateway.protocol import topics
from gateway.protocol.device import DeviceClient, DeviceState, Enrolled, Rejected, Send
from gateway.protocol.messages import Firmware
from gateway.protocol.topics import Channel
from gateway.service import Gateway
from gateway.store import CertificateStatus, IdentityState
from pki.ca import create_issuing_ca, create_root_ca
from pki.clock import SystemClock
from pki.factory import FactoryCA
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION
from simulators.fleet import FleetOptions, run_fleet
from simulators.tls import mutual_context, server_auth_context

pytestmark = pytest.mark.broker

FIRMWARE = Firmware(version=FIRMWARE_VERSION, digest=FIRMWARE_DIGEST)


async def drive(
    client: DeviceClient,
    gateway: Gateway,
    channel: Channel = Channel.ENROLL,
    *,
    until: type | Callable[[object], bool] = Enrolled,
    timeout: float = 15.0,
    first: list | None = None,
) -> list:
    """Run ``client`` over one connection until an event matching ``until`` (a type or a
    predicate; a matching Send is not published) or a final rejection; returns every event."""
    matches = until if not isinstance(until, type) else (lambda e: isinstance(e, until))
    ca = gateway.ca_chain_pem()
    if channel is Channel.ENROLL:
        tls, port = server_auth_context(ca), gateway.ports.enrollment
    else:
        current = client.current
        assert current is not None
        tls = mutual_context(ca, current.key, current.certificate, current.chain[:-1])
        port = gateway.ports.operational
    seen: list = []
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=client.device_id, tls_context=tls, timeout=5
    ) as mqtt:
        for topic in client.subscriptions(channel):
            await mqtt.subscribe(topic, qos=1)
        events = first if first is not None else client.start()
        messages = mqtt.messages.__aiter__()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            for event in events:
                seen.append(event)
                if matches(event) or (isinstance(event, Rejected) and event.final):
                    return seen
                if isinstance(event, Send):
                    await mqtt.publish(event.topic, event.payload, qos=1)
            deadline = client.next_deadline()
            wait = 0.2
            if deadline is not None:
                wait = max(0.0, min(wait, (deadline - client._clock.now()).total_seconds()))
            if loop.time() > end:
                raise AssertionError(f"nothing matched {until} within {timeout} s: {seen}")
            try:
                message = await asyncio.wait_for(messages.__anext__(), wait)
            except TimeoutError:
                events = client.timeout()
                continue
            events = client.receive(str(message.topic), bytes(message.payload))


def device(factory: FactoryCA, serial: str, **kwargs: object) -> DeviceClient:
    credential = factory.mint(serial, "TH-200")
    return DeviceClient(
        credential, firmware=FIRMWARE, clock=SystemClock(), response_timeout=2.0, **kwargs
    )


async def test_a_device_enrolls_and_opens_an_operational_session(start_gateway) -> None:
    gateway, factory = await start_gateway()
    client = device(factory, "th-0001")
    events = await drive(client, gateway)
    enrolled = events[-1]
    assert isinstance(enrolled, Enrolled)
    # The certificate names the device as the registry knows it, under our trust domain.
    san = enrolled.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{gateway.settings.trust_domain}/device/th-0001"
    ]
    identity = gateway.store.get_identity("th-0001")
    assert identity is not None and identity.state is IdentityState.ACTIVE
    assert identity.model == "TH-200" and identity.firmware_digest == FIRMWARE_DIGEST
    [row] = gateway.store.certificates_for("th-0001")
    assert row.serial == enrolled.certificate.serial_number
    # The issued certificate opens a mutual-TLS session and may publish its telemetry.
    tls = mutual_context(
        gateway.ca_chain_pem(), enrolled.key, enrolled.certificate, enrolled.chain[:-1]
    )
    async with aiomqtt.Client(
        "127.0.0.1", gateway.ports.operational, identifier="th-0001", tls_context=tls, timeout=5
    ) as mqtt:
        await mqtt.publish(topics.telemetry("th-0001"), b'{"t": 21.5}', qos=1)
        principal = gateway.broker.connected()["th-0001"]
        assert principal.kind == "device"
        assert principal.serial == enrolled.certificate.serial_number


async def test_a_certificate_from_another_ca_is_refused_on_the_operational_listener(
    start_gateway,
) -> None:
    gateway, _ = await start_gateway()
    clock = SystemClock()
    rogue_root = create_root_ca(LocalSigner.generate(), "Rogue Root", clock)
    rogue_issuing = create_issuing_ca(rogue_root, LocalSigner.generate(), "Rogue Issuing", clock)
    key = LocalSigner.generate()
    cert = Issuer(rogue_issuing, clock).issue(
        LeafTemplate(
            kind=IdentityKind.DEVICE,
            name="th-0001",
            trust_domain=gateway.settings.trust_domain,
            lifetime=timedelta(hours=1),
        ),
        key.public_key(),
    )
    tls = mutual_context(gateway.ca_chain_pem(), key, cert, (rogue_issuing.certificate,))
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client(
            "127.0.0.1", gateway.ports.operational, identifier="th-0001", tls_context=tls, timeout=3
        ) as mqtt:
            await mqtt.publish(topics.telemetry("th-0001"), b"x", qos=1)
    # And without any certificate at all.
    with pytest.raises((aiomqtt.MqttError, ssl.SSLError, OSError)):
        async with aiomqtt.Client(
            "127.0.0.1",
            gateway.ports.operational,
            identifier="th-0001",
            tls_context=server_auth_context(gateway.ca_chain_pem()),
            timeout=3,
        ) as mqtt:
            await mqtt.publish(topics.telemetry("th-0001"), b"x", qos=1)


async def test_renewal_over_the_operational_session_supersedes_the_old_certificate(
    start_gateway,
) -> None:
    gateway, factory = await start_gateway(certificates={"lifetime_seconds": 60})
    client = device(factory, "th-0002")
    first = (await drive(client, gateway))[-1]
    assert isinstance(first, Enrolled)
    lifetime = first.not_after - first.certificate.not_valid_before_utc
    assert lifetime <= timedelta(seconds=120)  # 60 s plus the 60 s backdate
    # Renew now (a device does so at ~2/3 of the lifetime): a new key, over mutual TLS.
    events = await drive(client, gateway, Channel.RENEW, first=client.renew())
    renewed = events[-1]
    assert isinstance(renewed, Enrolled) and renewed.renewal
    assert renewed.certificate.public_key() != first.certificate.public_key()
    rows = {c.serial: c.status for c in gateway.store.certificates_for("th-0002")}
    assert rows == {
        first.certificate.serial_number: CertificateStatus.SUPERSEDED,
        renewed.certificate.serial_number: CertificateStatus.ACTIVE,
    }


async def test_pending_until_an_operator_approves(start_gateway) -> None:
    gateway, factory = await start_gateway(
        policy={"auto_approve": []}, enrollment={"pending_retry_after": 1}
    )
    client = device(factory, "th-0003")
    from gateway.protocol.device import AwaitingApproval

    events = await drive(client, gateway, until=AwaitingApproval)
    assert isinstance(events[-1], AwaitingApproval)
    assert gateway.store.get_identity("th-0003").state is IdentityState.PENDING
    approve(gateway.store, "th-0003", actor="cli:test")
    # The device's next retry of the very same request is answered with a certificate.
    events = await drive(client, gateway, first=[])
    assert isinstance(events[-1], Enrolled)


async def test_a_bootstrap_token_enrolls_once(start_gateway) -> None:
    gateway, _ = await start_gateway()
    token = create_token(gateway.store, "cam-17", actor="cli:test")
    client = DeviceClient(
        None, firmware=FIRMWARE, clock=SystemClock(), device_id="cam-17", token=token
    )
    assert isinstance((await drive(client, gateway))[-1], Enrolled)
    again = DeviceClient(
        None, firmware=FIRMWARE, clock=SystemClock(), device_id="cam-17", token=token
    )
    events = await drive(again, gateway, until=Rejected)
    assert events[-1].reason == "token_reused"


async def test_an_unknown_manufacturer_is_refused_with_its_reason(start_gateway) -> None:
    gateway, _ = await start_gateway()
    rogue = FactoryCA.create("Rogue Devices", SystemClock())
    client = DeviceClient(
        rogue.mint("th-0004", "TH-200"), firmware=FIRMWARE, clock=SystemClock()
    )
    events = await drive(client, gateway, until=Rejected)
    assert events[-1].reason == "unknown_manufacturer"
    assert gateway.store.get_identity("th-0004") is None


async def test_tampered_firmware_is_refused(start_gateway) -> None:
    gateway, factory = await start_gateway(policy={"firmware": {"TH-200": [FIRMWARE_DIGEST]}})
    tampered = Firmware(version=FIRMWARE_VERSION, digest="0" * 64)
    client = DeviceClient(factory.mint("th-0005", "TH-200"), firmware=tampered, clock=SystemClock())
    events = await drive(client, gateway, until=Rejected)
    assert events[-1].reason == "firmware_not_allowed"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "malformed"),
        (json.dumps({"v": 1, "type": "teleport", "id": "r1"}).encode(), "unknown_type"),
        (json.dumps({"v": 9, "type": "hello", "id": "r1"}).encode(), "unsupported_version"),
        (json.dumps({"v": 1, "type": "hello", "id": "r1", "chain": "nope"}).encode(),
         "invalid_field"),
        (json.dumps({"v": 1, "type": "hello", "id": "r1", "chain": ["@@@"]}).encode(),
         "invalid_field"),
        (b"{" + b" " * (70 * 1024) + b"}", "payload_too_large"),
    ],
)
async def test_bad_input_on_the_wire_gets_a_typed_error(start_gateway, payload, reason) -> None:
    gateway, factory = await start_gateway()
    async with aiomqtt.Client(
        "127.0.0.1",
        gateway.ports.enrollment,
        identifier="th-0006",
        tls_context=server_auth_context(gateway.ca_chain_pem()),
        timeout=5,
    ) as mqtt:
        await mqtt.subscribe(topics.enroll_response("th-0006"), qos=1)
        await mqtt.publish(topics.enroll_request("th-0006"), payload, qos=1)
        message = await asyncio.wait_for(mqtt.messages.__aiter__().__anext__(), 5)
    answer = json.loads(bytes(message.payload))
    assert answer["type"] == "error" and answer["reason"] == reason
    assert gateway.enrollment.metrics[f"rejected.{reason}"] == 1
    # The gateway is still serving: a well-formed device enrolls afterwards.
    assert isinstance((await drive(device(factory, "th-0008"), gateway))[-1], Enrolled)
    assert gateway.enrollment.metrics["errors.internal"] == 0


def is_enroll(event: object) -> bool:
    return isinstance(event, Send) and b'"type":"enroll"' in event.payload.replace(b" ", b"")


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() > end:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(0.02)


async def test_a_lost_request_or_a_lost_answer_costs_a_retry_never_a_certificate(
    start_gateway: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's enroll can vanish after its PUBACK (amqtt acknowledges a QoS 1 message before
    it routes it), and the gateway's answer can find no subscriber. Both are made to happen
    here, for sure, for half of the devices each:

    - the request is lost: the broker acknowledges it and drops it, the way it drops a publish
      its ACL denies. (The drop amqtt itself makes when the publisher disconnects at once did
      not occur behind the gateway's connection reader: 0 of 52 requests were lost, sent with
      DISCONNECT in the same write, after 1 to 30 queued publishes, or with the TCP connection
      aborted.)
    - the answer is lost: the enroll is published from a connection that subscribed to
      nothing and left after the PUBACK, so the certificate is issued and sent to nobody.

    Then each device's timer sends the very same request again. Every device must end with
    exactly one certificate and hear no refusal: a gateway that forgot its answer refuses the
    retry (key_reused) or certifies a second key; one that lost a request leaves a device
    without a certificate."""
    gateway, factory = await start_gateway()
    ca = gateway.ca_chain_pem()
    serials = [f"th-{n:04d}" for n in range(100, 112)]
    request_lost = set(serials[::2])
    answer_lost = set(serials) - request_lost
    clients = {serial: device(factory, serial) for serial in serials}
    held: dict[str, Send] = {}
    for serial, client in clients.items():
        # Hello and challenge; the enroll request is built but held back.
        held[serial] = (await drive(client, gateway, until=is_enroll))[-1]
        assert client.state is DeviceState.ENROLL_SENT

    to_drop = {topics.enroll_request(serial) for serial in request_lost}
    dropped: list[str] = []
    allows: Callable[[Principal, Action, str], bool] = gateway.acl.allows

    def dropping_first_copies(principal: Principal, action: Action, topic: str) -> bool:
        if action is Action.PUBLISH and topic in to_drop:
            to_drop.remove(topic)
            dropped.append(topic)
            return False
        return allows(principal, action, topic)

    monkeypatch.setattr(gateway.acl, "allows", dropping_first_copies)
    for serial in serials:
        async with aiomqtt.Client(
            "127.0.0.1",
            gateway.ports.enrollment,
            identifier=serial,
            tls_context=server_auth_context(ca),
            timeout=5,
        ) as mqtt:
            await mqtt.publish(held[serial].topic, held[serial].payload, qos=1)  # PUBACKed
    metrics = gateway.enrollment.metrics
    await wait_for(lambda: metrics["issued"] == len(answer_lost))
    assert sorted(dropped) == sorted(topics.enroll_request(s) for s in request_lost)
    assert metrics["requests.enroll"] == len(answer_lost)  # the dropped never arrived
    for serial in serials:
        assert len(gateway.store.certificates_for(serial)) == (serial in answer_lost)

    # The devices' timers fire: the same request (same id, same bytes) again.
    enrolled: dict[str, Enrolled] = {}
    for serial, client in clients.items():
        events = await drive(
            client,
            gateway,
            first=[held[serial]],
            until=lambda e: isinstance(e, Enrolled | Rejected),
        )
        assert isinstance(events[-1], Enrolled), (serial, events[-1])
        enrolled[serial] = events[-1]
    for serial in serials:
        [row] = gateway.store.certificates_for(serial)  # over all statuses
        assert row.status is CertificateStatus.ACTIVE
        assert row.serial == enrolled[serial].certificate.serial_number, serial
    assert metrics["issued"] == len(serials)
    assert metrics["replayed"] == len(answer_lost)
    assert metrics["requests.enroll"] == len(serials) + len(answer_lost)
    assert {k: v for k, v in metrics.items() if k.startswith("rejected.") and v} == {}


async def test_a_small_fleet_enrolls_publishes_and_is_counted(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_fleet(
        FleetOptions(
            devices=5,
            duration=6,
            host="127.0.0.1",
            enrollment_port=gateway.ports.enrollment,
            operational_port=gateway.ports.operational,
            ca_pem=gateway.ca_chain_pem(),
            telemetry_interval=0.5,
            progress=False,
        ),
        factory,
    )
    assert summary.enrolled == 5 and summary.failed == 0
    assert summary.telemetry >= 5
    active = gateway.store.list_identities(state=IdentityState.ACTIVE)
    assert len(active) == 5


async def test_an_expired_device_re_attests_with_its_birth_certificate(start_gateway) -> None:
    from pki.clock import FakeClock

    gateway, factory = await start_gateway(certificates={"lifetime_seconds": 60})
    clock = FakeClock(SystemClock().now())
    client = DeviceClient(
        factory.mint("th-0007", "TH-200"), firmware=FIRMWARE, clock=clock, response_timeout=2.0
    )
    first = (await drive(client, gateway))[-1]
    assert isinstance(first, Enrolled)
    # The device was off past its certificate's end: at its next deadline it starts over from
    # hello with its birth certificate, not a renewal.
    clock.set(first.not_after + timedelta(seconds=1))
    restart = client.timeout()
    assert isinstance(restart[0], Send) and restart[0].channel is Channel.ENROLL
    clock.set(SystemClock().now())
    again = (await drive(client, gateway, first=restart))[-1]
    assert isinstance(again, Enrolled) and not again.renewal
    statuses = sorted(c.status.value for c in gateway.store.certificates_for("th-0007"))
    assert statuses == ["active", "superseded"]
    enrollments = [
        r for r in gateway.store.audit_records()
        if r.entry.subject == "th-0007" and r.entry.action == "enroll"
    ]
    assert len(enrollments) == 2


@pytest.mark.slow
async def test_sensors_on_60_second_certificates_renew_by_themselves(start_gateway) -> None:
    gateway, factory = await start_gateway()
    summary = await run_fleet(
        FleetOptions(
            devices=4,
            duration=55,
            host="127.0.0.1",
            enrollment_port=gateway.ports.enrollment,
            operational_port=gateway.ports.operational,
            ca_pem=gateway.ca_chain_pem(),
            cert_lifetime=60,
            telemetry_interval=5,
            progress=False,
        ),
        factory,
    )
    # Renewal is due at ~2/3 of 60 s (+- jitter): every sensor renewed once within 55 s,
    # over its operational session, and none had to start over.
    assert summary.enrolled == 4 and summary.failed == 0
    assert summary.renewed >= 4 and summary.reattested == 0
    renewals = [r for r in gateway.store.audit_records() if r.entry.action == "renew"]
    assert len(renewals) == summary.renewed
