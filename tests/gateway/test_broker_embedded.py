"""The embedded broker end to end: real amqtt, real TLS on loopback, real MQTT clients.

A "spy" on the internal listener subscribes to everything, so a message the broker wrongly
routed would be seen; each denial test also shows the allowed counterpart getting through, so
the spy is proven to be listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from gateway.acl import Principal, TopicAcl
from gateway.broker import (
    INTERNAL_USERNAME,
    EmbeddedBroker,
    ListenerConfig,
    RefusalReason,
    RefusedConnection,
    TlsMaterial,
)
from gateway.store import IdentityState
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import SystemClock
from pki.crl import RevokedEntry, build_crl
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

pytestmark = pytest.mark.broker

PASSWORD = "internal-password-for-tests-0123456789"
CLOCK = SystemClock()  # OpenSSL judges validity by the real clock


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


@dataclass
class Credential:
    cert: x509.Certificate
    cert_path: Path
    key_path: Path


@dataclass
class Pki:
    ca: CertificateAuthority
    issuer: Issuer
    tls: TlsMaterial
    root_path: Path
    directory: Path
    credentials: dict[str, Credential] = field(default_factory=dict)

    def credential(
        self, name: str, kind: IdentityKind = IdentityKind.DEVICE, issuer: Issuer | None = None
    ) -> Credential:
        key = f"{kind}:{name}:{id(issuer) if issuer else 'ours'}"
        if key not in self.credentials:
            signer = LocalSigner.generate()
            template = LeafTemplate(kind, name, "fleet.test", timedelta(hours=1))
            cert = (issuer or self.issuer).issue(template, signer.public_key())
            chain = b"".join(pem(c) for c in (cert, *(issuer or self.issuer).chain[:-1]))
            cert_path = self.directory / f"{len(self.credentials)}.crt"
            key_path = self.directory / f"{len(self.credentials)}.key"
            cert_path.write_bytes(chain)
            key_path.write_bytes(
                signer.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            )
            self.credentials[key] = Credential(cert, cert_path, key_path)
        return self.credentials[key]

    def client_context(self, credential: Credential | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root_path))
        if credential is not None:
            ctx.load_cert_chain(str(credential.cert_path), str(credential.key_path))
        return ctx

    def crl(self, *serials: int) -> bytes:
        entries = [RevokedEntry(serial=s, revoked_at=CLOCK.now()) for s in serials]
        crl = build_crl(self.ca, entries, CLOCK, timedelta(hours=1), int(time.time() * 1000))
        return crl.public_bytes(Encoding.PEM)


def server_tls(ca: CertificateAuthority, issuer: Issuer) -> TlsMaterial:
    signer = LocalSigner.generate()
    template = LeafTemplate(
        IdentityKind.SERVICE,
        "broker",
        "fleet.test",
        timedelta(hours=1),
        server=True,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )
    cert = issuer.issue(template, signer.public_key())
    return TlsMaterial(
        server_cert_pem=pem(cert) + pem(ca.certificate),
        server_key_pem=signer.private_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        ),
        client_ca_pem=pem(ca.certificate) + pem(ca.root),
    )


@pytest.fixture(scope="module")
def pki_env(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("broker-pki")
    ca = make_issuing_ca(CLOCK)
    issuer = Issuer(ca, CLOCK)
    root_path = directory / "root.crt"
    root_path.write_bytes(pem(ca.root))
    return Pki(ca, issuer, server_tls(ca, issuer), root_path, directory)


@pytest.fixture(scope="module")
def rogue_issuer() -> Issuer:
    """A CA nobody told the gateway about, minting certificates that look like ours."""
    root = create_root_ca(LocalSigner.generate(), "Rogue Root CA", CLOCK)
    ca = create_issuing_ca(root, LocalSigner.generate(), "Rogue Issuing CA", CLOCK)
    return Issuer(ca, CLOCK)


@dataclass
class Env:
    broker: EmbeddedBroker
    pki: Pki
    states: dict[str, IdentityState]
    refused: list[RefusedConnection]
    connects: list[tuple[Principal, str]]
    disconnects: list[Principal]

    @property
    def ports(self) -> dict[str, int]:
        return self.broker.ports

    def device(
        self, name: str, *, client_id: str | None = None, kind: IdentityKind = IdentityKind.DEVICE
    ) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.ports["operational"],
            identifier=client_id or name,
            tls_context=self.pki.client_context(self.pki.credential(name, kind)),
            timeout=5,
        )

    def enrollee(self, client_id: str) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.ports["enrollment"],
            identifier=client_id,
            tls_context=self.pki.client_context(),
            timeout=5,
        )

    def internal(self, client_id: str = "spy") -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            self.ports["internal"],
            identifier=client_id,
            username=INTERNAL_USERNAME,
            password=PASSWORD,
            timeout=5,
        )

    async def wait_refused(self, count: int = 1, timeout: float = 3.0) -> list[RefusedConnection]:
        deadline = time.monotonic() + timeout
        while len(self.refused) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.refused


def make_env(pki: Pki, listeners: ListenerConfig | None = None, **kwargs: object) -> Env:
    states: dict[str, IdentityState] = {}
    refused: list[RefusedConnection] = []
    connects: list[tuple[Principal, str]] = []
    disconnects: list[Principal] = []
    broker = EmbeddedBroker(
        listeners or ListenerConfig(enrollment_port=0, operational_port=0),
        pki.tls,
        TopicAcl(lambda identity: states.get(identity)),
        internal_password=PASSWORD,
        on_refused=refused.append,
        on_connect=lambda p, remote: connects.append((p, remote)),
        on_disconnect=disconnects.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return Env(broker, pki, states, refused, connects, disconnects)


@pytest.fixture
async def env(pki_env: Pki) -> AsyncIterator[Env]:
    environment = make_env(pki_env)
    await environment.broker.start()
    try:
        yield environment
    finally:
        await environment.broker.stop()


class Spy:
    """Collects every message the internal client sees on ``fg/v1/#``."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.seen: list[tuple[str, bytes]] = []

    async def run(self) -> None:
        async for message in self.client.messages:
            self.seen.append((str(message.topic), bytes(message.payload)))

    def topics(self) -> list[str]:
        return [t for t, _ in self.seen]

    async def wait_for(self, topic: str, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while topic not in self.topics():
            if time.monotonic() > deadline:
                raise AssertionError(f"{topic} never arrived; seen {self.topics()}")
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def spying(env: Env, topic_filter: str = "fg/v1/#") -> AsyncIterator[Spy]:
    async with env.internal() as client:
        await client.subscribe(topic_filter, qos=1)
        spy = Spy(client)
        task = asyncio.create_task(spy.run())
        try:
            yield spy
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.asynccontextmanager
async def collecting(client: aiomqtt.Client) -> AsyncIterator[list[str]]:
    received: list[str] = []

    async def run() -> None:
        async for message in client.messages:
            received.append(str(message.topic))

    task = asyncio.create_task(run())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await task


def granted(result: object) -> list[int]:
    return [int(getattr(code, "value", code)) for code in result]  # type: ignore[attr-defined]


def acknowledge_cut(client: aiomqtt.Client) -> None:
    """aiomqtt keeps the error of an unexpected disconnect in a future nobody awaits after
    ``__aexit__``; read it, so a cut the test expected is not logged as an unhandled error."""
    disconnected = client._disconnected
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


async def settle(seconds: float = 0.2) -> None:
    """Long enough for the broker to route a message it was going to route."""
    await asyncio.sleep(seconds)


# -- a raw MQTT client, for what a library would hide (CONNACK codes, silence, garbage) -------


def _mqtt_string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes] | None = None,
    keep_alive: int = 30,
) -> bytes:
    flags = 0x02
    payload = _mqtt_string(client_id)
    if will is not None:
        flags |= 0x04
        payload += _mqtt_string(will[0]) + _mqtt_string(will[1])
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_string(password)
    body = _mqtt_string("MQTT") + bytes((4, flags)) + struct.pack("!H", keep_alive) + payload
    assert len(body) < 128
    return bytes((0x10, len(body))) + body


async def raw_connect(
    port: int, packet: bytes, ctx: ssl.SSLContext | None = None, timeout: float = 3.0
) -> int | None:
    """Send ``packet`` and return the CONNACK return code, or None if the broker hung up."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    except (ssl.SSLError, ConnectionError):
        return None
    try:
        writer.write(packet)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(4), timeout)
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return reply[3] if len(reply) == 4 and reply[0] == 0x20 else None


# -- devices cannot reach each other ------------------------------------------------------------


async def test_device_cannot_publish_to_or_receive_another_devices_topics(env: Env) -> None:
    env.states.update({"dev-a": IdentityState.ACTIVE, "dev-b": IdentityState.ACTIVE})
    async with (
        spying(env) as spy,
        env.device("dev-a") as a,
        env.device("dev-b") as b,
        collecting(a) as a_received,
        collecting(b) as b_received,
    ):
        assert granted(await a.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)) == [1]
        assert granted(await b.subscribe("fg/v1/dev/dev-b/cmd/#", qos=1)) == [1]
        # wildcard escapes and B's own topics are refused to A
        for escape in ("fg/v1/dev/dev-b/cmd/#", "fg/v1/dev/+/telemetry", "fg/v1/#", "#"):
            assert granted(await a.subscribe(escape, qos=1)) == [128], escape

        await a.publish("fg/v1/dev/dev-b/telemetry", b"forged", qos=1)
        await a.publish("fg/v1/dev/dev-b/cmd/reboot", b"forged", qos=1)
        await a.publish("fg/v1/dev/dev-a/telemetry", b"mine", qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/telemetry")

        async with env.internal("operator-tool") as tool:
            await tool.publish("fg/v1/dev/dev-b/cmd/reboot", b"for b", qos=1)
            await tool.publish("fg/v1/dev/dev-a/cmd/reboot", b"for a", qos=1)
        await settle()

    assert "fg/v1/dev/dev-b/telemetry" not in spy.topics()
    assert spy.topics().count("fg/v1/dev/dev-b/cmd/reboot") == 1  # only the tool's own
    assert a_received == ["fg/v1/dev/dev-a/cmd/reboot"]
    assert b_received == ["fg/v1/dev/dev-b/cmd/reboot"]
    assert env.broker.metrics["denied.publish"] == 2
    assert env.broker.metrics["denied.subscribe"] == 4


async def test_retained_messages_reach_only_their_own_device(env: Env) -> None:
    """amqtt alone would send a connecting client the retained messages of every filter in the
    broker; device A must not get device B's retained state."""
    env.states.update({"dev-a": IdentityState.ACTIVE, "dev-b": IdentityState.ACTIVE})
    async with spying(env, "#") as spy:
        async with env.internal("gateway-publisher") as gateway:
            await gateway.publish("fg/v1/pki/ca", b"ca chain", qos=1, retain=True)
        async with env.device("dev-b") as b:
            await b.publish("fg/v1/dev/dev-b/state", b"secret state", qos=1, retain=True)
        await spy.wait_for("fg/v1/dev/dev-b/state")
        async with env.device("dev-a") as a, collecting(a) as received:
            await a.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)
            await a.subscribe("fg/v1/pki/ca", qos=1)
            await settle(0.3)
    assert received == ["fg/v1/pki/ca"]


async def test_enrollee_is_restricted_to_its_own_enrollment_topics(env: Env) -> None:
    async with spying(env) as spy, env.enrollee("dev-e1") as e1, collecting(e1) as received:
        assert granted(await e1.subscribe("fg/v1/enroll/dev-e1/resp", qos=1)) == [1]
        for other in ("fg/v1/enroll/dev-e2/resp", "fg/v1/enroll/+/resp", "fg/v1/pki/ca", "#"):
            assert granted(await e1.subscribe(other, qos=1)) == [128], other
        await e1.publish("fg/v1/enroll/dev-e2/req", b"as e2", qos=1)
        await e1.publish("fg/v1/dev/dev-e1/telemetry", b"too early", qos=1)
        await e1.publish("fg/v1/enroll/dev-e1/req", b"hello", qos=1)
        await spy.wait_for("fg/v1/enroll/dev-e1/req")
        async with env.internal("gateway") as gateway:
            await gateway.publish("fg/v1/enroll/dev-e2/resp", b"for e2", qos=1)
            await gateway.publish("fg/v1/enroll/dev-e1/resp", b"for e1", qos=1)
        await settle()
    assert spy.topics().count("fg/v1/enroll/dev-e1/req") == 1
    assert "fg/v1/enroll/dev-e2/req" not in spy.topics()
    assert "fg/v1/dev/dev-e1/telemetry" not in spy.topics()
    assert received == ["fg/v1/enroll/dev-e1/resp"]
    principal = env.broker.connected()["dev-e1"]
    assert (principal.kind, principal.listener) == ("enrollee", "enrollment")


async def test_enrollment_refuses_a_client_id_that_is_not_a_device_id(env: Env) -> None:
    ctx = env.pki.client_context()
    assert await raw_connect(env.ports["enrollment"], connect_packet("-bad id"), ctx) == 2
    (refusal,) = await env.wait_refused()
    assert (refusal.listener, refusal.reason) == ("enrollment", RefusalReason.BAD_CLIENT_ID)
    assert refusal.client_id == "-bad id"


async def test_enrollee_cannot_take_over_a_connected_devices_session(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    async with spying(env) as spy, env.device("dev-a") as a:
        ctx = env.pki.client_context()
        assert await raw_connect(env.ports["enrollment"], connect_packet("dev-a"), ctx) == 2
        assert env.refused[-1].reason == RefusalReason.CLIENT_ID_IN_USE
        await a.publish("fg/v1/dev/dev-a/telemetry", b"still here", qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/telemetry")
        assert env.broker.connected()["dev-a"].kind == "device"


async def test_a_will_aimed_at_another_devices_topic_is_refused(env: Env) -> None:
    ctx = env.pki.client_context()
    packet = connect_packet("dev-e1", will=("fg/v1/dev/dev-b/cmd/unlock", b"x"))
    assert await raw_connect(env.ports["enrollment"], packet, ctx) == 5
    (refusal,) = await env.wait_refused()
    assert refusal.reason == RefusalReason.WILL_NOT_ALLOWED


async def test_a_stronger_identity_takes_over_a_squatted_client_id(env: Env) -> None:
    """An enrollee squatting on the gateway's own client id cannot lock the gateway out."""
    ctx = env.pki.client_context()
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["enrollment"], ssl=ctx)
    writer.write(connect_packet(INTERNAL_USERNAME))
    assert (await reader.readexactly(4))[3] == 0
    internal = connect_packet(INTERNAL_USERNAME, username=INTERNAL_USERNAME, password=PASSWORD)
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", env.ports["internal"])
    writer2.write(internal)
    assert (await reader2.readexactly(4))[3] == 0
    assert await asyncio.wait_for(reader.read(1), 2) == b""  # the squatter was cut
    assert env.broker.connected()[INTERNAL_USERNAME].kind == "internal"
    writer.close()
    writer2.close()


async def test_a_device_reconnecting_takes_over_its_own_stale_session(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    old_reader, old_writer = await asyncio.open_connection(
        "127.0.0.1", env.ports["operational"], ssl=ctx
    )
    old_writer.write(connect_packet("dev-a"))
    assert (await old_reader.readexactly(4))[3] == 0
    assert await raw_connect(env.ports["operational"], connect_packet("dev-a"), ctx) == 0
    assert await asyncio.wait_for(old_reader.read(1), 2) == b""
    old_writer.close()


async def _abrupt_device(env: Env, will_topic: str) -> asyncio.StreamWriter:
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["operational"], ssl=ctx)
    writer.write(connect_packet("dev-a", will=(will_topic, b"gone")))
    assert (await reader.readexactly(4))[3] == 0
    return writer


async def test_the_will_is_judged_when_the_device_vanishes(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    async with spying(env) as spy:
        writer = await _abrupt_device(env, "fg/v1/dev/dev-a/state")
        writer.transport.abort()
        await spy.wait_for("fg/v1/dev/dev-a/state")  # an active device's will is published

        spy.seen.clear()
        writer = await _abrupt_device(env, "fg/v1/dev/dev-a/state")
        env.states["dev-a"] = IdentityState.QUARANTINED  # after CONNECT, before vanishing
        writer.transport.abort()
        await settle(0.3)
    assert spy.topics() == []
    assert env.broker.metrics["denied.will"] == 1


# -- the operational listener: certificates, CRL, identity --------------------------------------


async def test_operational_refuses_a_client_without_certificate(env: Env) -> None:
    ctx = env.pki.client_context()
    assert await raw_connect(env.ports["operational"], connect_packet("dev-a"), ctx) is None
    (refusal,) = await env.wait_refused()
    assert (refusal.listener, refusal.reason) == ("operational", "no_client_certificate")
    assert refusal.cert_issuer is None and refusal.client_id is None


async def test_operational_refuses_a_rogue_ca_and_reports_the_rogue_issuer(
    env: Env, rogue_issuer: Issuer
) -> None:
    rogue = env.pki.credential("dev-a", issuer=rogue_issuer)
    env.states["dev-a"] = IdentityState.ACTIVE
    ctx = env.pki.client_context(rogue)
    assert await raw_connect(env.ports["operational"], connect_packet("dev-a"), ctx) is None
    (refusal,) = await env.wait_refused()
    assert refusal.reason == RefusalReason.UNKNOWN_CA
    assert refusal.cert_issuer == "CN=Rogue Issuing CA"
    assert refusal.cert_subject == "CN=dev-a"
    assert refusal.cert_serial == rogue.cert.serial_number
    assert refusal.cert_fingerprint == rogue.cert.fingerprint(hashes.SHA256()).hex()
    assert env.broker.metrics["refused.unknown_ca"] == 1
    assert env.connects == []


async def test_a_certificate_on_the_crl_is_refused_after_update_crl(env: Env) -> None:
    env.states.update({"dev-a": IdentityState.ACTIVE, "dev-b": IdentityState.ACTIVE})
    revoked = env.pki.credential("dev-a").cert
    async with env.device("dev-a") as device:
        assert "dev-a" in env.broker.connected()
        env.broker.update_crl(env.pki.crl(revoked.serial_number))
        # the live session of a revoked certificate is cut as well
        for _ in range(100):
            if "dev-a" not in env.broker.connected():
                break
            await asyncio.sleep(0.01)
        assert "dev-a" not in env.broker.connected()
        await asyncio.sleep(0.05)
        acknowledge_cut(device)
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    assert await raw_connect(env.ports["operational"], connect_packet("dev-a"), ctx) is None
    refusal = (await env.wait_refused())[-1]
    assert refusal.reason == RefusalReason.CERTIFICATE_REVOKED
    assert refusal.cert_serial == revoked.serial_number
    # everyone else is unaffected by the new CRL
    async with env.device("dev-b"):
        assert "dev-b" in env.broker.connected()


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (None, "not_enrolled"),
        (IdentityState.PENDING, "device_pending"),
        (IdentityState.REVOKED, "device_revoked"),
    ],
)
async def test_a_device_not_in_good_standing_is_refused_at_connect(
    env: Env, state: IdentityState | None, reason: str
) -> None:
    if state is not None:
        env.states["dev-a"] = state
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    assert await raw_connect(env.ports["operational"], connect_packet("dev-a"), ctx) == 5
    (refusal,) = await env.wait_refused()
    assert refusal.reason == reason
    assert refusal.cert_subject == "CN=dev-a"


async def test_a_device_cannot_use_another_devices_client_id(env: Env) -> None:
    env.states.update({"dev-a": IdentityState.ACTIVE, "dev-b": IdentityState.ACTIVE})
    ctx = env.pki.client_context(env.pki.credential("dev-a"))
    assert await raw_connect(env.ports["operational"], connect_packet("dev-b"), ctx) == 2
    (refusal,) = await env.wait_refused()
    assert (refusal.reason, refusal.client_id) == ("client_id_mismatch", "dev-b")


async def test_the_gateway_service_certificate_may_do_everything(env: Env) -> None:
    env.states.update({"gateway": IdentityState.ACTIVE, "dev-a": IdentityState.ACTIVE})
    async with (
        env.device("gateway", kind=IdentityKind.SERVICE) as gateway,
        collecting(gateway) as received,
        env.device("dev-a") as a,
    ):
        assert granted(await gateway.subscribe("#", qos=1)) == [1]
        await a.publish("fg/v1/dev/dev-a/telemetry", b"t", qos=1)
        await settle()
    assert received == ["fg/v1/dev/dev-a/telemetry"]
    assert env.connects[0][0].kind == "service"


async def test_the_broker_tells_whether_a_topic_has_an_audience(env: Env) -> None:
    events = "fg/v1/admin/events"
    assert not env.broker.has_audience(events)
    async with env.internal("console") as console:
        await console.subscribe("fg/v1/admin/#", qos=0)
        assert env.broker.has_audience(events)
        assert not env.broker.has_audience("fg/v1/dev/dev-a/telemetry")
        await console.unsubscribe("fg/v1/admin/#")
        await settle()
        assert not env.broker.has_audience(events)


async def test_update_server_tls_serves_the_new_certificate(env: Env, pki_env: Pki) -> None:
    renewed = server_tls(pki_env.ca, pki_env.issuer)
    env.broker.update_server_tls(renewed)
    ctx = pki_env.client_context()
    _, writer = await asyncio.open_connection("127.0.0.1", env.ports["enrollment"], ssl=ctx)
    served = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    expected = x509.load_pem_x509_certificates(renewed.server_cert_pem)[0]
    assert served == expected.public_bytes(Encoding.DER)


# -- control: kick, quarantine while connected ---------------------------------------------------


async def test_kick_cuts_a_live_session_within_milliseconds(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    async with env.device("dev-a") as a:
        lost = asyncio.Event()

        async def watch() -> None:
            with contextlib.suppress(aiomqtt.MqttError):
                async for _ in a.messages:
                    pass
            lost.set()

        watcher = asyncio.create_task(watch())
        await a.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)
        started = time.perf_counter()
        assert await env.broker.kick("dev-a") is True
        elapsed = time.perf_counter() - started
        await asyncio.wait_for(lost.wait(), 2)
        watcher.cancel()
        assert elapsed < 0.1, f"kick took {elapsed * 1000:.1f} ms"
        assert "dev-a" not in env.broker.connected()
        assert [p.name for p in env.disconnects] == ["dev-a"]
        with contextlib.suppress(aiomqtt.MqttError):
            await a.__aexit__(None, None, None)
    assert await env.broker.kick("dev-a") is False


async def test_quarantine_applies_to_the_next_message_without_reconnect(env: Env) -> None:
    env.states["dev-a"] = IdentityState.ACTIVE
    async with spying(env) as spy, env.device("dev-a") as a, collecting(a) as received:
        await a.subscribe("fg/v1/dev/dev-a/cmd/#", qos=1)
        await a.subscribe("fg/v1/dev/dev-a/renew/resp", qos=1)
        await a.publish("fg/v1/dev/dev-a/telemetry", b"before", qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/telemetry")

        env.states["dev-a"] = IdentityState.QUARANTINED
        await a.publish("fg/v1/dev/dev-a/telemetry", b"after", qos=1)
        await a.publish("fg/v1/dev/dev-a/quarantine/telemetry", b"diverted", qos=1)
        await spy.wait_for("fg/v1/dev/dev-a/quarantine/telemetry")
        async with env.internal("gateway") as gateway:
            await gateway.publish("fg/v1/dev/dev-a/cmd/open", b"no", qos=1)
            await gateway.publish("fg/v1/dev/dev-a/renew/resp", b"refused", qos=1)
        await settle()
        assert granted(await a.subscribe("fg/v1/pki/crl", qos=1)) == [128]
        assert "dev-a" in env.broker.connected()  # still connected throughout
    assert spy.seen.count(("fg/v1/dev/dev-a/telemetry", b"before")) == 1
    assert ("fg/v1/dev/dev-a/telemetry", b"after") not in spy.seen
    assert received == ["fg/v1/dev/dev-a/renew/resp"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_peer_is_named_in_brackets_and_reconnecting_is_no_clone(
    pki_env: Pki,
) -> None:
    """"[::1]:port": the host reads back whole, so a device reconnecting from its IPv6 host
    on a new port takes its session over instead of being quarantined as a clone."""
    clones: list[tuple[str, str]] = []
    environment = make_env(
        pki_env,
        ListenerConfig(host="::1", enrollment_port=0, operational_port=0),
        on_clone=lambda p, first, second: clones.append((first, second)),
    )
    environment.states["dev-a"] = IdentityState.ACTIVE
    await environment.broker.start()
    try:
        ctx = pki_env.client_context(pki_env.credential("dev-a"))
        ctx.check_hostname = False  # the test server certificate names 127.0.0.1 only
        port = environment.ports["operational"]
        old_reader, old_writer = await asyncio.open_connection("::1", port, ssl=ctx)
        old_writer.write(connect_packet("dev-a"))
        assert (await old_reader.readexactly(4))[3] == 0
        new_reader, new_writer = await asyncio.open_connection("::1", port, ssl=ctx)
        new_writer.write(connect_packet("dev-a"))
        assert (await new_reader.readexactly(4))[3] == 0  # admitted: a takeover
        assert await asyncio.wait_for(old_reader.read(1), 2) == b""
        for writer in (old_writer, new_writer):
            writer.close()
        remotes = [remote for _, remote in environment.connects]
        assert len(remotes) == 2 and clones == []
        for remote in remotes:
            host, _, peer_port = remote.rpartition(":")
            assert host == "[::1]" and peer_port.isdigit()
    finally:
        await environment.broker.stop()


# -- the internal listener and malformed peers ------------------------------------------------


async def test_internal_client_needs_the_password(env: Env) -> None:
    port = env.ports["internal"]
    wrong = connect_packet("gw", username=INTERNAL_USERNAME, password="guess")
    assert await raw_connect(port, wrong) == 4
    assert await raw_connect(port, connect_packet("gw", username="other", password=PASSWORD)) == 4
    assert await raw_connect(port, connect_packet("gw")) == 4
    assert [r.reason for r in await env.wait_refused(3)] == ["bad_credentials"] * 3
    right = connect_packet("gw", username=INTERNAL_USERNAME, password=PASSWORD)
    assert await raw_connect(port, right) == 0


async def test_garbage_instead_of_connect_is_reported_and_dropped(env: Env) -> None:
    assert await raw_connect(env.ports["internal"], b"GET / HTTP/1.1\r\n\r\n") is None
    (refusal,) = await env.wait_refused()
    assert refusal.reason == RefusalReason.MALFORMED_CONNECT


async def test_mqtt_3_1_gets_connack_1(env: Env) -> None:
    body = _mqtt_string("MQIsdp") + bytes((3, 0x02)) + struct.pack("!H", 30) + _mqtt_string("x")
    assert await raw_connect(env.ports["internal"], bytes((0x10, len(body))) + body) == 1
    assert (await env.wait_refused())[0].reason == RefusalReason.UNSUPPORTED_PROTOCOL


async def test_silent_peer_is_dropped_after_the_connect_timeout(pki_env: Pki) -> None:
    environment = make_env(pki_env, connect_timeout=0.2)
    await environment.broker.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", environment.ports["internal"])
        assert await asyncio.wait_for(reader.read(1), 2) == b""
        writer.close()
        assert (await environment.wait_refused())[0].reason == RefusalReason.CONNECT_TIMEOUT
    finally:
        await environment.broker.stop()


async def test_oversized_publish_ends_the_connection_unrouted(pki_env: Pki) -> None:
    environment = make_env(pki_env, max_packet_bytes=4096)
    environment.states["dev-a"] = IdentityState.ACTIVE
    await environment.broker.start()
    try:
        async with spying(environment) as spy:
            device = environment.device("dev-a")
            with contextlib.suppress(aiomqtt.MqttError):
                async with device:
                    await device.publish(
                        "fg/v1/dev/dev-a/telemetry", b"x" * 10_000, qos=1, timeout=1
                    )
            acknowledge_cut(device)
            for _ in range(100):
                if "dev-a" not in environment.broker.connected():
                    break
                await asyncio.sleep(0.01)
            assert "dev-a" not in environment.broker.connected()
            assert spy.topics() == []
    finally:
        await environment.broker.stop()


async def test_keep_alive_is_enforced(env: Env) -> None:
    packet = connect_packet(
        "gw-silent", username=INTERNAL_USERNAME, password=PASSWORD, keep_alive=1
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", env.ports["internal"])
    writer.write(packet)
    assert (await reader.readexactly(4))[3] == 0
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(1), 4) == b""  # cut after 1.5 x keep alive
    assert 1.2 < time.monotonic() - started < 3.5
    writer.close()
    assert env.broker.metrics["disconnected.keepalive"] == 1


def test_the_subscription_table_can_change_while_a_message_is_delivered() -> None:
    """amqtt walks its subscription table across awaits when it delivers a message; a client
    subscribing meanwhile used to kill that delivery (RuntimeError: dictionary changed size
    during iteration). The broker's table hands out a snapshot."""
    from gateway.broker.routing import SubscriptionTable

    table = SubscriptionTable({"a/#": [], "b/#": []})
    walked = []
    for topic_filter, _subscribers in table.items():
        walked.append(topic_filter)
        table[f"new/{topic_filter}"] = []  # a subscribe arriving mid-delivery
    assert walked == ["a/#", "b/#"]
    assert len(table) == 4
