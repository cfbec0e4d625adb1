"""Enforcement on the broker, end to end, on both brokers: a real gateway per test (the embedded
amqtt broker, or Mosquitto 2 with dynamic security and its bridged enrollment instance), devices
enrolled over MQTT by the simulators' DeviceClient, then what a device, an attacker and an
application each notice.

The observer is the gateway-side view: a client on the internal listener with the gateway's own
credentials, subscribed to everything. A message the broker wrongly let through reaches it.
Each "never seen" is paired with a message sent after it on the same connection that is seen,
which proves the observer was listening when the forged one would have arrived.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from test_enrollment import device, drive

from gateway import operations
from gateway.broker import EmbeddedBroker
from gateway.mosquitto import (
    MosquittoBroker,
    MosquittoError,
    find_dynsec_plugin,
    find_mosquitto,
)
from gateway.protocol import topics
from gateway.protocol.device import DeviceClient, Enrolled, Send
from gateway.protocol.topics import Channel
from gateway.registry import SqlStore
from gateway.service import Gateway
from gateway.store import CertificateStatus, IdentityState
from pki.ca import create_issuing_ca, create_root_ca
from pki.clock import SystemClock
from pki.factory import FactoryCA
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from simulators.tls import mutual_context, server_auth_context


def _mosquitto_missing() -> str | None:
    try:
        find_mosquitto()
        find_dynsec_plugin()
    except MosquittoError as exc:
        return str(exc)
    return None


_MISSING = _mosquitto_missing()
BROKERS = [
    "embedded",
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(
            _MISSING is not None,
            reason=f"Mosquitto with dynamic security is not installed ({_MISSING}); "
            "apt-get install mosquitto",
        ),
    ),
]
pytestmark = pytest.mark.broker

CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
QUIET = 0.3  # how long "nothing else arrives" is watched once the paired marker arrived
WITHIN = 3.0  # the longest any expected message or state may take


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def gateway_and_factory(start_gateway, broker_kind: str) -> tuple[Gateway, FactoryCA]:
    gateway, factory = await start_gateway(broker_kind=broker_kind)
    assert gateway.broker_kind == broker_kind
    return gateway, factory


# -- devices and connections -----------------------------------------------------------------


@dataclass
class Device:
    """An enrolled device: its state machine and the credential it got."""

    id: str
    client: DeviceClient
    enrolled: Enrolled

    def tls(self, gateway: Gateway) -> ssl.SSLContext:
        return mutual_context(
            gateway.ca_chain_pem(),
            self.enrolled.key,
            self.enrolled.certificate,
            self.enrolled.chain[:-1],
        )


async def enroll(gateway: Gateway, factory: FactoryCA, serial: str) -> Device:
    client = device(factory, serial)
    enrolled = (await drive(client, gateway))[-1]
    assert isinstance(enrolled, Enrolled)
    return Device(serial, client, enrolled)


class Peer:
    """One MQTT connection with a background reader: ``seen`` fills as messages arrive and
    ``lost`` completes when the broker ends the connection."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, bytes]] = []
        self.lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.seen.append((str(message.topic), bytes(message.payload)))
        except aiomqtt.MqttError as exc:
            if not self.lost.done():
                self.lost.set_result(exc)

    async def subscribe(self, topic_filter: str) -> bool:
        """True when the broker granted the subscription."""
        codes = await self.client.subscribe(topic_filter, qos=1)
        return all(getattr(code, "value", code) < 0x80 for code in codes)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)

    def saw(self, topic: str, payload: bytes) -> bool:
        return (topic, payload) in self.seen

    async def expect(self, topic: str, payload: bytes, within: float = WITHIN) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.saw(topic, payload):
            assert loop.time() < deadline, f"{topic} {payload!r} never arrived: {self.seen}"
            await asyncio.sleep(0.01)

    async def ends(self, within: float = 1.0) -> None:
        """The broker closes this connection within ``within`` seconds."""
        await asyncio.wait_for(asyncio.shield(self.lost), within)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader


@contextlib.asynccontextmanager
async def connect(
    port: int,
    *,
    identifier: str,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    bind_address: str = "",
    timeout: float = 3.0,
) -> AsyncIterator[Peer]:
    client = aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        username=username,
        password=password,
        tls_context=tls,
        bind_address=bind_address,
        timeout=timeout,
    )
    await client.__aenter__()
    peer = Peer(client)
    try:
        yield peer
    finally:
        await peer.close()
        # a connection the broker cut is gone already
        with contextlib.suppress(aiomqtt.MqttError):
            await client.__aexit__(None, None, None)


def online(
    gateway: Gateway, dev: Device, *, bind_address: str = ""
) -> contextlib.AbstractAsyncContextManager[Peer]:
    """``dev`` on the operational listener with its issued certificate."""
    return connect(
        gateway.ports.operational,
        identifier=dev.id,
        tls=dev.tls(gateway),
        bind_address=bind_address,
    )


@contextlib.asynccontextmanager
async def observer(gateway: Gateway) -> AsyncIterator[Peer]:
    """The gateway-side view: its own credentials on the internal listener, everything."""
    assert gateway.broker is not None
    username, password = gateway.broker.internal_credentials
    async with connect(
        gateway.ports.internal, identifier="observer", username=username, password=password
    ) as peer:
        assert await peer.subscribe("#")
        yield peer


def _first_answer(
    port: int, tls: ssl.SSLContext | None, client_id: str, bind_address: str = ""
) -> bytes:
    """Open a connection, send an MQTT 3.1.1 CONNECT, return the broker's first 4 bytes (b""
    when it closed instead). A raw socket: a refused handshake shows at once, where an MQTT
    client library waits for its timeout."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    source = (bind_address, 0) if bind_address else None
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=source) as raw:
        conn = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
        conn.sendall(bytes((0x10, len(body))) + body)
        return conn.recv(4)


async def admitted(
    port: int, tls: ssl.SSLContext | None, client_id: str, bind_address: str = ""
) -> bool:
    """True when the broker answers a CONNECT with "accepted"; False when it refuses the TLS
    handshake, closes the connection or answers with a refusal code."""
    try:
        answer = await asyncio.to_thread(_first_answer, port, tls, client_id, bind_address)
    except (ssl.SSLError, ConnectionError):
        return False
    return answer == CONNACK_ACCEPTED


async def quarantine_in_force(
    peer: Peer, watch: Peer, dev: Device, within: float = WITHIN
) -> None:
    """Wait until the broker lets ``peer`` publish under its quarantine topics (the only
    topics a quarantined device has), probing every 50 ms."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    probe = 0
    while not any(t.startswith(f"fg/v1/dev/{dev.id}/quarantine/") for t, _ in watch.seen):
        assert loop.time() < deadline, f"{dev.id} not quarantined on the broker in {within} s"
        probe += 1
        await peer.publish(topics.quarantine(dev.id, "probe"), str(probe).encode())
        await asyncio.sleep(0.05)


# -- topic isolation ---------------------------------------------------------------------------


async def test_connecting_records_when_the_device_was_last_seen(gateway_and_factory) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-seen1")
    record = gateway.store.get_identity(a.id)
    assert record is not None
    enrolled_seen = record.last_seen_at
    await asyncio.sleep(0.05)
    async with online(gateway, a):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5.0  # written with the others of its second
        while True:
            record = gateway.store.get_identity(a.id)
            assert record is not None
            if record.last_seen_at is not None and (
                enrolled_seen is None or record.last_seen_at > enrolled_seen
            ):
                break
            assert loop.time() < deadline, "last seen never recorded"
            await asyncio.sleep(0.1)


async def test_a_device_reaches_its_own_topics_and_no_other_devices(gateway_and_factory) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-a001")
    b = await enroll(gateway, factory, "th-b001")
    async with observer(gateway) as watch, online(gateway, a) as dev_a, online(
        gateway, b
    ) as dev_b:
        # b may not listen to a's telemetry, by name or by wildcard
        for stolen in (
            topics.telemetry(a.id),
            "fg/v1/dev/+/telemetry",
            "fg/v1/dev/#",
            f"fg/v1/dev/{a.id}/#",
            "#",
        ):
            granted = await dev_b.subscribe(stolen)
            # Mosquitto 2.0.11's acl_file grants every SUBACK (its subscribe check is
            # unfinished upstream) and judges each delivery instead: what matters is that b
            # receives nothing of a's, asserted at the end (dev_b.seen == []).
            assert not granted or gateway.broker_kind == "mosquitto", stolen
        assert await dev_a.subscribe(topics.commands_filter(a.id))
        assert await dev_b.subscribe(topics.commands_filter(b.id))

        await dev_a.publish(topics.telemetry(a.id), b'{"t": 21.5}')
        await watch.expect(topics.telemetry(a.id), b'{"t": 21.5}')

        # b writing into a's topics: dropped by the broker
        await dev_b.publish(topics.telemetry(a.id), b"forged")
        await dev_b.publish(topics.state(a.id), b"forged")
        await dev_b.publish(topics.command(a.id, "reboot"), b"forged")
        await dev_b.publish(topics.telemetry(b.id), b"b's own")
        await watch.expect(topics.telemetry(b.id), b"b's own")

        # an application's command reaches its device and only that one
        await watch.publish(topics.command(a.id, "blink"), b"for a")
        await dev_a.expect(topics.command(a.id, "blink"), b"for a")
        await asyncio.sleep(QUIET)
        assert [m for m in watch.seen if m[1] == b"forged"] == []
        # the retained CA and CRL are every device's to read (a wildcard granted on Mosquitto
        # brings them); nothing else reaches b
        public = (topics.CA_TOPIC, topics.CRL_TOPIC)
        assert [m for m in dev_b.seen if m[0] not in public] == []
        assert dev_a.seen == [(topics.command(a.id, "blink"), b"for a")]


# -- quarantine -------------------------------------------------------------------------------


async def test_quarantine_of_a_live_device_diverts_it_without_a_reconnect(
    gateway_and_factory,
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-q001")
    telemetry, outlet = topics.telemetry(a.id), topics.quarantine(a.id, "report")
    async with observer(gateway) as watch, online(gateway, a) as dev:
        assert await dev.subscribe(topics.commands_filter(a.id))
        await dev.publish(telemetry, b"before")
        await watch.expect(telemetry, b"before")

        record = await gateway.quarantine(a.id, actor="test:operator", reason="odd traffic")
        assert record.state is IdentityState.QUARANTINED
        # enforced on return: the very next publish is judged by the quarantine rules
        await dev.publish(telemetry, b"while quarantined")
        await watch.publish(topics.command(a.id, "reboot"), b"not for a quarantined device")
        await dev.publish(outlet, b"through the outlet")
        await watch.expect(outlet, b"through the outlet")

        await gateway.release(a.id, actor="test:operator")
        await dev.publish(telemetry, b"released")
        await watch.expect(telemetry, b"released")
        await watch.publish(topics.command(a.id, "blink"), b"after release")
        await dev.expect(topics.command(a.id, "blink"), b"after release")

        assert not watch.saw(telemetry, b"while quarantined")
        assert dev.seen == [(topics.command(a.id, "blink"), b"after release")]
        assert not dev.lost.done()  # one connection throughout


async def test_a_quarantine_written_by_another_process_reaches_the_broker(
    gateway_and_factory,
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-q002")
    telemetry = topics.telemetry(a.id)
    async with observer(gateway) as watch, online(gateway, a) as dev:
        await dev.publish(telemetry, b"before")
        await watch.expect(telemetry, b"before")
        # what `fleetgate device quarantine` does: its own connection to the registry
        store = SqlStore(gateway.settings.database)
        try:
            await asyncio.to_thread(
                operations.change_state,
                store,
                a.id,
                IdentityState.QUARANTINED,
                action="quarantine",
                actor="cli:test",
                reason="from the shell",
            )
        finally:
            store.close()
        # the gateway polls the registry every 200 ms
        await quarantine_in_force(dev, watch, a, within=1.5)
        await dev.publish(telemetry, b"while quarantined")
        await dev.publish(topics.quarantine(a.id, "marker"), b"after it")
        await watch.expect(topics.quarantine(a.id, "marker"), b"after it")
        await asyncio.sleep(QUIET)
        assert not watch.saw(telemetry, b"while quarantined")
        assert not dev.lost.done()


# -- revocation --------------------------------------------------------------------------------


async def test_revocation_cuts_the_session_and_keeps_the_certificate_out(
    gateway_and_factory,
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-r001")
    serial = a.enrolled.certificate.serial_number
    async with observer(gateway) as watch, online(gateway, a) as dev:
        await dev.publish(topics.telemetry(a.id), b"before")
        await watch.expect(topics.telemetry(a.id), b"before")
        await gateway.revoke(a.id, actor="test:operator", reason="key compromised")
        await dev.ends(within=1.0)
        # applications learn of it: the retained CRL now lists the certificate
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WITHIN
        while True:
            crls = [x509.load_pem_x509_crl(p) for t, p in watch.seen if t == topics.CRL_TOPIC]
            if any(c.get_revoked_certificate_by_serial_number(serial) for c in crls):
                break
            assert loop.time() < deadline, "no CRL listing the revoked certificate"
            await asyncio.sleep(0.02)

    [row] = gateway.store.certificates_for(a.id)
    assert row.status is CertificateStatus.REVOKED
    port = gateway.ports.operational
    assert not await admitted(port, a.tls(gateway), a.id)
    # nor can it renew: the renewal needs the operational session it can no longer open
    # (an MQTT client sees a refused handshake as a timeout: 1 s is plenty on loopback)
    renewal = [e for e in a.client.renew() if isinstance(e, Send)]
    assert [e.channel for e in renewal] == [Channel.RENEW]
    with pytest.raises(aiomqtt.MqttError):
        async with connect(port, identifier=a.id, tls=a.tls(gateway), timeout=1) as peer:
            await peer.publish(renewal[0].topic, renewal[0].payload)
    assert len(gateway.store.certificates_for(a.id)) == 1
    # another device is untouched by the new CRL
    b = await enroll(gateway, factory, "th-r002")
    assert await admitted(port, b.tls(gateway), b.id)


def _open_session(port: int, tls: ssl.SSLContext, client_id: str) -> ssl.SSLSocket | None:
    """A CONNECT on a connection kept open: the socket when the broker accepted it, else
    None."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        conn = tls.wrap_socket(raw, server_hostname="127.0.0.1")
        conn.sendall(bytes((0x10, len(body))) + body)
        if conn.recv(4) == CONNACK_ACCEPTED:
            return conn
        conn.close()
    except (OSError, ssl.SSLError):
        pass
    return None


def _still_open(conn: ssl.SSLSocket) -> bool:
    """True while the broker has not closed ``conn`` (nothing to read, no end of stream)."""
    conn.settimeout(0.2)
    try:
        return conn.recv(1) != b""
    except TimeoutError:
        return True
    except OSError:
        return False


async def test_a_revoked_device_reconnecting_during_the_revocation_keeps_no_session(
    gateway_and_factory,
) -> None:
    """The device reconnects as fast as it can while it is revoked: whatever CONNACK it gets
    meanwhile (on Mosquitto the old CRL admits it until the new one is loaded), no session of
    it is left a second after the revocation returned."""
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-r003")
    port, tls = gateway.ports.operational, a.tls(gateway)
    kept: list[ssl.SSLSocket] = []
    stop = asyncio.Event()

    async def reconnect_loop() -> None:
        while not stop.is_set():
            conn = await asyncio.to_thread(_open_session, port, tls, a.id)
            if conn is not None:
                kept.append(conn)

    loop = asyncio.create_task(reconnect_loop())
    try:
        await asyncio.sleep(0.3)  # sessions taking each other over
        assert kept, "the device never got in before its revocation"
        admitted_before = len(kept)
        await gateway.revoke(a.id, actor="test:operator", reason="key compromised")
        returned = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)  # still trying after the revocation returned
    finally:
        stop.set()
        await loop
    try:
        # Cut within about a second; polled up to 5 s so that a loaded machine is not a
        # failure, while a session that is never cut still is.
        live = kept
        while live and asyncio.get_running_loop().time() < returned + 5.0:
            await asyncio.sleep(0.2)
            live = [conn for conn in live if await asyncio.to_thread(_still_open, conn)]
        assert live == [], (
            f"{len(live)} of {len(kept)} sessions still open 5 s after the revocation "
            f"({admitted_before} admitted before it began)"
        )
        assert gateway.broker is not None and a.id not in gateway.broker.connected()
        assert not await admitted(port, tls, a.id)
    finally:
        for conn in kept:
            conn.close()


# -- who may connect --------------------------------------------------------------------------


def _rogue_credential(
    gateway: Gateway, name: str
) -> tuple[LocalSigner, x509.Certificate, x509.Certificate]:
    """A certificate naming one of our devices under our trust domain, from a CA we do not
    trust."""
    clock = SystemClock()
    root = create_root_ca(LocalSigner.generate(), "Rogue Root", clock)
    issuing = create_issuing_ca(root, LocalSigner.generate(), "Rogue Issuing", clock)
    key = LocalSigner.generate()
    template = LeafTemplate(
        kind=IdentityKind.DEVICE,
        name=name,
        trust_domain=gateway.settings.trust_domain,
        lifetime=timedelta(hours=1),
    )
    return key, Issuer(issuing, clock).issue(template, key.public_key()), issuing.certificate


async def test_only_certificates_of_our_ca_open_the_operational_listener(
    gateway_and_factory,
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-c001")
    port, ca = gateway.ports.operational, gateway.ca_chain_pem()
    key, rogue, rogue_issuing = _rogue_credential(gateway, a.id)
    assert not await admitted(port, mutual_context(ca, key, rogue, (rogue_issuing,)), a.id)
    assert not await admitted(port, server_auth_context(ca), a.id)  # TLS, no certificate
    assert not await admitted(port, None, a.id)  # no TLS at all
    # the same probe with the device's own certificate gets in: the refusals above are real
    assert await admitted(port, a.tls(gateway), a.id)
    # and the turned-away clients are in the registry for the console's unknown identities
    # (Mosquitto cannot say whose certificate was foreign: it reports the handshake only)
    reasons: set[str] = set()
    for _ in range(50):
        gateway._flush_refusals()
        reasons = {r.reason for r in gateway.store.refusals() if r.listener == "operational"}
        if "no_client_certificate" in reasons and len(reasons) >= 2:
            break
        await asyncio.sleep(0.1)
    assert "no_client_certificate" in reasons
    assert reasons & {"unknown_ca", "certificate_invalid"}


# -- enrollees ---------------------------------------------------------------------------------


def enrollment(
    gateway: Gateway, identifier: str, *, bind_address: str = ""
) -> contextlib.AbstractAsyncContextManager[Peer]:
    """An anonymous client on the enrollment listener (server-authenticated TLS)."""
    return connect(
        gateway.ports.enrollment,
        identifier=identifier,
        tls=server_auth_context(gateway.ca_chain_pem()),
        bind_address=bind_address,
    )


async def test_an_enrollee_using_a_live_devices_id_does_not_end_its_session(
    gateway_and_factory,
) -> None:
    """MQTT lets a new connection take a live client id's session over. On Mosquitto the
    enrollment listener is a broker of its own, so an anonymous client naming an enrolled
    device's id (and even starting an enrollment in its name) leaves the device's operational
    session alone."""
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-t001")
    [hello] = [e for e in device(factory, a.id).start() if isinstance(e, Send)]
    async with observer(gateway) as watch, online(gateway, a) as dev:
        await dev.publish(topics.telemetry(a.id), b"before")
        await watch.expect(topics.telemetry(a.id), b"before")
        with contextlib.suppress(aiomqtt.MqttError):  # a broker may refuse the intruder
            async with enrollment(gateway, a.id, bind_address="127.0.0.2") as intruder:
                await intruder.publish(hello.topic, hello.payload)
                await asyncio.sleep(QUIET)
        await dev.publish(topics.telemetry(a.id), b"after")
        await watch.expect(topics.telemetry(a.id), b"after")
        assert not dev.lost.done()
        assert gateway.broker is not None
        assert gateway.broker.connected()[a.id].kind == "device"


async def test_an_enrollee_cannot_speak_or_listen_for_another_device(
    gateway_and_factory,
) -> None:
    gateway, _ = gateway_and_factory
    mine, theirs = "th-e001", "th-e002"
    async with observer(gateway) as watch, enrollment(gateway, mine) as enrollee:
        assert await enrollee.subscribe(topics.enroll_response(mine))
        # Mosquitto 2.0 grants any subscription on the enrollment listener and filters what
        # it delivers; the embedded broker refuses the subscription itself
        await enrollee.subscribe(topics.enroll_response(theirs))
        await enrollee.subscribe("fg/v1/enroll/+/resp")
        await enrollee.publish(topics.enroll_request(theirs), b"forged in their name")
        await enrollee.publish(topics.enroll_request(mine), b"marker")
        await watch.expect(topics.enroll_request(mine), b"marker")
        await watch.publish(topics.enroll_response(theirs), b"their challenge")
        await watch.publish(topics.enroll_response(mine), b"my challenge")
        await enrollee.expect(topics.enroll_response(mine), b"my challenge")
        await asyncio.sleep(QUIET)
        assert not watch.saw(topics.enroll_request(theirs), b"forged in their name")
        # only its own answers (the gateway's reply to the marker among them)
        assert {t for t, _ in enrollee.seen} == {topics.enroll_response(mine)}


@pytest.mark.skipif(_MISSING is not None, reason=f"Mosquitto is not installed ({_MISSING})")
async def test_a_device_enrolls_through_the_bridged_enrollment_broker(start_gateway) -> None:
    gateway, factory = await start_gateway(broker_kind="mosquitto")
    broker = gateway.broker
    assert isinstance(broker, MosquittoBroker)
    main, enrolling = broker.process, broker.enrollment_process
    assert main is not None and enrolling is not None and main.pid != enrolling.pid
    async with observer(gateway) as watch:
        a = await enroll(gateway, factory, "th-b001")  # hello, challenge, enroll, certificate
        # the device's requests reached the gateway's side through the bridge, and the
        # answers went back the same way
        assert len([m for m in watch.seen if m[0] == topics.enroll_request(a.id)]) >= 2
        assert len([m for m in watch.seen if m[0] == topics.enroll_response(a.id)]) >= 2
        async with online(gateway, a) as dev:
            await dev.publish(topics.telemetry(a.id), b"enrolled through the bridge")
            await watch.expect(topics.telemetry(a.id), b"enrolled through the bridge")
    record = gateway.store.get_identity(a.id)
    assert record is not None and record.state is IdentityState.ACTIVE


# -- clones -----------------------------------------------------------------------------------


async def record_of_clone(gateway: Gateway, identity_id: str) -> None:
    """The registry shows the identity quarantined by the gateway, naming the clone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WITHIN
    while True:
        record = gateway.store.get_identity(identity_id)
        assert record is not None
        if record.state is IdentityState.QUARANTINED:
            break
        assert loop.time() < deadline, f"{identity_id} not quarantined: {record.state}"
        await asyncio.sleep(0.05)
    [event] = [
        r.entry
        for r in gateway.store.audit_records()
        if r.entry.subject == identity_id and r.entry.action == "quarantine"
    ]
    assert event.actor == "gateway"
    assert any(reason.startswith("clone_detected") for reason in event.reasons)
    assert "127.0.0.1" in " ".join(event.reasons) and "127.0.0.2" in " ".join(event.reasons)


async def telemetry_refused(survivor: Peer, watch: Peer, dev: Device) -> None:
    """Whichever session is left can no longer publish its telemetry."""
    telemetry = topics.telemetry(dev.id)
    await survivor.publish(telemetry, b"after the clone")
    await survivor.publish(topics.quarantine(dev.id, "marker"), b"quarantined")
    await watch.expect(topics.quarantine(dev.id, "marker"), b"quarantined")
    await asyncio.sleep(QUIET)
    assert not watch.saw(telemetry, b"after the clone")


async def test_a_device_live_from_two_hosts_is_quarantined_as_a_clone(
    gateway_and_factory, broker_kind: str
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-k001")
    telemetry = topics.telemetry(a.id)
    async with observer(gateway) as watch, online(gateway, a) as original:
        await original.publish(telemetry, b"original")
        await watch.expect(telemetry, b"original")
        # the same certificate and key, from another address (127.0.0.2 is loopback too)
        if broker_kind == "embedded":
            # the first session keeps its place; the second is refused
            assert not await admitted(
                gateway.ports.operational, a.tls(gateway), a.id, bind_address="127.0.0.2"
            )
            survivor = original
            await record_of_clone(gateway, a.id)
            await quarantine_in_force(survivor, watch, a)
            await telemetry_refused(survivor, watch, a)
            assert not original.lost.done()
        else:
            # Mosquitto hands the session to the newcomer before anyone can ask, closing the
            # first; the gateway quarantines the identity right after, and once that is in
            # force the newcomer's session is cut too
            async with online(gateway, a, bind_address="127.0.0.2") as clone:
                await original.ends(within=WITHIN)
                await record_of_clone(gateway, a.id)
                await clone.ends(within=WITHIN)
            # whichever reconnects finds the device quarantined
            async with online(gateway, a) as survivor:
                await quarantine_in_force(survivor, watch, a)
                await telemetry_refused(survivor, watch, a)
                assert not survivor.lost.done()


# -- clients we did not write -----------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    cert: Path
    key: Path
    ca: Path


def write_credential(gateway: Gateway, dev: Device, directory: Path) -> Files:
    directory.mkdir(parents=True, exist_ok=True)
    files = Files(directory / "device.crt", directory / "device.key", directory / "ca.pem")
    files.cert.write_bytes(dev.enrolled.certificate_pem)
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            dev.enrolled.key.private_key.private_bytes(
                Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
            )
        )
    files.ca.write_bytes(gateway.ca_chain_pem())
    return files


def mosquitto_client(
    tool: str, gateway: Gateway, dev: Device, files: Files, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            tool, "-h", "127.0.0.1", "-p", str(gateway.ports.operational),
            "--cafile", str(files.ca), "--cert", str(files.cert), "--key", str(files.key),
            "-i", dev.id, "-q", "1", *args,
        ],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip


@pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None or shutil.which("mosquitto_sub") is None,
    reason="mosquitto-clients is not installed (apt-get install mosquitto-clients)",
)
async def test_mosquitto_clients_with_an_issued_certificate(
    gateway_and_factory, tmp_path: Path
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-m001")
    files = write_credential(gateway, a, tmp_path / "th-m001")
    async with observer(gateway) as watch:
        forged = await asyncio.to_thread(
            mosquitto_client, "mosquitto_pub", gateway, a, files,
            "-t", topics.telemetry("th-other"), "-m", "forged",
        )  # fmt: skip
        own = await asyncio.to_thread(
            mosquitto_client, "mosquitto_pub", gateway, a, files,
            "-t", topics.telemetry(a.id), "-m", "from the shell",
        )  # fmt: skip
        assert own.returncode == 0, own.stderr
        assert forged.returncode == 0, forged.stderr  # MQTT 3.1.1 has no "denied" for a publish
        await watch.expect(topics.telemetry(a.id), b"from the shell")
        await asyncio.sleep(QUIET)
        assert not watch.saw(topics.telemetry("th-other"), b"forged")

        # its own commands reach mosquitto_sub; another device's topics are refused to it
        subscribe = partial(
            mosquitto_client, "mosquitto_sub", gateway, a, files,
            "-t", topics.commands_filter(a.id), "-C", "1", "-W", "5",
        )  # fmt: skip
        listener = asyncio.create_task(asyncio.to_thread(subscribe))
        while not listener.done():  # until mosquitto_sub has subscribed and got one
            await watch.publish(topics.command(a.id, "blink"), b"for the shell")
            await asyncio.sleep(0.1)
        received = await listener
        assert received.returncode == 0, received.stderr
        assert received.stdout.strip() == "for the shell"
    # another device's retained telemetry never reaches it, whatever the SUBACK said
    # (Mosquitto 2.0.11 grants every subscription under acl_file and judges each delivery)
    async with observer(gateway) as watch:
        await watch.publish(topics.telemetry("th-other"), b"not for a", retain=True)
    # the positive control: a client allowed to read it gets the retained message at once
    async with observer(gateway) as control:
        await control.expect(topics.telemetry("th-other"), b"not for a")
    denied = await asyncio.to_thread(
        mosquitto_client, "mosquitto_sub", gateway, a, files,
        "-t", topics.telemetry("th-other"), "-W", "2",
    )  # fmt: skip
    assert denied.stdout == ""


def s_client(gateway: Gateway, files: Files, *extra: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{gateway.ports.operational}",
            "-CAfile", str(files.ca), "-cert", str(files.cert), "-key", str(files.key), *extra,
        ],
        input=b"", capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
async def test_openssl_sees_a_revoked_certificate_refused(
    gateway_and_factory, broker_kind: str, tmp_path: Path
) -> None:
    gateway, factory = gateway_and_factory
    a = await enroll(gateway, factory, "th-o001")
    files = write_credential(gateway, a, tmp_path / "th-o001")
    # before: the handshake completes (s_client then ends at the end of its empty input)
    code, output = await asyncio.to_thread(s_client, gateway, files)
    assert code == 0, output
    await gateway.revoke(a.id, actor="test:operator", reason="key compromised")
    # after: s_client waits for the server's verdict on its certificate
    code, output = await asyncio.to_thread(s_client, gateway, files, "-ign_eof")
    assert code != 0, output
    if broker_kind == "mosquitto":
        assert "certificate revoked" in output
    else:
        # Python's asyncio TLS closes a refused handshake without sending the alert...
        assert "certificate revoked" in output or "unexpected eof" in output, output
        # ...but the broker knew why, and said so
        assert isinstance(gateway.broker, EmbeddedBroker)
        assert gateway.broker.metrics["refused.certificate_revoked"] == 1
