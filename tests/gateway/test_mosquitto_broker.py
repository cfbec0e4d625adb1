"""MosquittoBroker end to end: a real Mosquitto 2 (the main instance and the bridged enrollment
instance) on free loopback ports, real TLS, real MQTT clients (aiomqtt, and mosquitto-clients /
openssl for the command-line checks).

A "spy" on the internal listener subscribes to everything, so a message Mosquitto wrongly
routed would be seen; each denial is paired with an allowed message sent after it on the same
connection, which proves the spy was listening (Mosquitto keeps one client's messages in order,
and one bridge carries each direction between the two instances).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from gateway import observe
from gateway.acl import Principal
from gateway.broker.refusals import remote_host
from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
    MosquittoProcess,
    MosquittoReason,
    ServerTlsMaterial,
    dynsec,
)
from gateway.mosquitto.log_lines import logged_peer
from gateway.mosquitto.sessions import Session
from gateway.observe import Observation
from gateway.protocol import topics
from gateway.store import IdentityState
from pki.ca import CertificateAuthority
from pki.clock import SystemClock
from pki.crl import RevokedEntry, build_crl
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
)
pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(
        MOSQUITTO is None, reason="Mosquitto is not installed (apt-get install mosquitto)"
    ),
]

CLOCK = SystemClock()  # OpenSSL judges validity by the real clock
DOMAIN = "fleet.test"
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
QUIET = 0.4  # how long "nothing arrives" is watched; the allowed twin arrives in ~1 ms


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


@dataclass
class Credential:
    name: str
    cert: x509.Certificate
    cert_path: Path  # leaf, then the issuing CA
    key_path: Path  # mode 0600


@dataclass
class Pki:
    ca: CertificateAuthority
    issuer: Issuer
    directory: Path
    root_path: Path
    cache: dict[tuple[str, int], Credential] = field(default_factory=dict)

    def credential(self, name: str, issuer: Issuer | None = None) -> Credential:
        issuer = issuer or self.issuer
        key = (name, id(issuer))
        if key not in self.cache:
            signer = LocalSigner.generate()
            template = LeafTemplate(IdentityKind.DEVICE, name, DOMAIN, timedelta(hours=1))
            cert = issuer.issue(template, signer.public_key())
            stem = self.directory / f"{name}-{len(self.cache)}"
            cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
            cert_path.write_bytes(pem(cert) + pem(issuer.ca.certificate))
            key_path.touch(mode=0o600)
            key_path.write_bytes(
                signer.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            )
            self.cache[key] = Credential(name, cert, cert_path, key_path)
        return self.cache[key]

    def context(self, credential: Credential | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.root_path))
        if credential is not None:
            ctx.load_cert_chain(str(credential.cert_path), str(credential.key_path))
        return ctx

    def crl(self, *revoked: Credential) -> bytes:
        entries = [RevokedEntry(c.cert.serial_number, CLOCK.now()) for c in revoked]
        number = int(time.time() * 1000)
        return build_crl(self.ca, entries, CLOCK, timedelta(hours=1), number).public_bytes(
            Encoding.PEM
        )

    def server_tls(self) -> ServerTlsMaterial:
        signer = LocalSigner.generate()
        template = LeafTemplate(
            IdentityKind.SERVICE,
            "broker",
            DOMAIN,
            timedelta(hours=1),
            server=True,
            dns_names=("localhost",),
            ip_addresses=("127.0.0.1",),
        )
        cert = self.issuer.issue(template, signer.public_key())
        return ServerTlsMaterial(
            server_cert_pem=pem(cert) + pem(self.ca.certificate),
            server_key_pem=signer.private_key.private_bytes(
                Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
            ),
            client_ca_pem=pem(self.ca.certificate) + pem(self.ca.root),
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("mosquitto-pki")
    ca = make_issuing_ca(CLOCK)
    root_path = directory / "root.pem"
    root_path.write_bytes(pem(ca.root))
    return Pki(ca, Issuer(ca, CLOCK), directory, root_path)


@dataclass(frozen=True)
class Record:
    id: str
    kind: IdentityKind
    state: IdentityState


async def start_broker(pki: Pki, run_dir: Path, **options: object) -> MosquittoBroker:
    broker = MosquittoBroker(
        run_dir, Listeners(), pki.server_tls(), pki.crl(), **options  # type: ignore[arg-type]
    )
    await broker.start()
    return broker


ADMIN_PASSWORD = "operator-secret-0123"


def external_to(managed: MosquittoBroker, tmp_path: Path, **options: object) -> MosquittoBroker:
    """Another gateway driving ``managed`` (started with ``ADMIN_PASSWORD``) as an external
    broker, through its admin account."""
    ports = managed.ports
    return MosquittoBroker(
        tmp_path / "unused",
        Listeners("127.0.0.1", ports["enrollment"], ports["operational"], ports["internal"]),
        None,
        None,
        external=True,
        admin_password=ADMIN_PASSWORD,
        internal_username="_fg_other_gateway",
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def broker(pki: Pki, tmp_path: Path) -> AsyncIterator[MosquittoBroker]:
    started = await start_broker(pki, tmp_path / "run")
    try:
        yield started
    finally:
        await started.stop()


class Peer:
    """One MQTT connection with a background reader: ``messages`` fills as they arrive and
    ``lost`` completes when the broker cuts the connection."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.messages: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.client.messages:
                self.messages.put_nowait((str(message.topic), bytes(message.payload)))
        except aiomqtt.MqttError as exc:
            if not self.lost.done():
                self.lost.set_result(exc)

    async def subscribe(self, topic_filter: str) -> bool:
        """True when the broker granted the subscription."""
        codes = await self.client.subscribe(topic_filter, qos=1)
        return all(getattr(code, "value", code) < 0x80 for code in codes)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        await self.client.publish(topic, payload, qos=1, retain=retain)

    async def next(self, timeout: float = 3.0, ignore: tuple[str, ...] = ()) -> tuple[str, bytes]:
        """The next message whose topic is not in ``ignore`` (a spy's echoes of its own)."""
        while True:
            message = await asyncio.wait_for(self.messages.get(), timeout)
            if message[0] not in ignore:
                return message

    async def nothing(self, within: float = QUIET) -> None:
        with contextlib.suppress(TimeoutError):
            message = await asyncio.wait_for(self.messages.get(), within)
            pytest.fail(f"unexpected message {message!r}")

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader


@contextlib.asynccontextmanager
async def connect(
    broker: MosquittoBroker,
    listener: str,
    *,
    identifier: str | None = None,
    tls: ssl.SSLContext | None = None,
    username: str | None = None,
    password: str | None = None,
    bind_address: str = "",
) -> AsyncIterator[Peer]:
    client = aiomqtt.Client(
        "127.0.0.1",
        broker.ports[listener],
        identifier=identifier,
        username=username,
        password=password,
        tls_context=tls,
        timeout=3,
        bind_address=bind_address,
        # as the gateway's transport and the simulated devices do: no Nagle on request/reply
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )
    async with client:
        peer = Peer(client)
        try:
            yield peer
        finally:
            await peer.close()


def spy(broker: MosquittoBroker) -> contextlib.AbstractAsyncContextManager[Peer]:
    username, password = broker.internal_credentials
    return connect(broker, "internal", identifier="spy", username=username, password=password)


def device(
    broker: MosquittoBroker,
    pki: Pki,
    name: str,
    identifier: str | None = None,
    *,
    bind_address: str = "",
) -> contextlib.AbstractAsyncContextManager[Peer]:
    return connect(
        broker,
        "operational",
        identifier=identifier or name,
        tls=pki.context(pki.credential(name)),
        bind_address=bind_address,
    )


def enrollee(
    broker: MosquittoBroker, pki: Pki, identifier: str, *, bind_address: str = ""
) -> contextlib.AbstractAsyncContextManager[Peer]:
    """An anonymous client on the enrollment listener (server-authenticated TLS)."""
    return connect(
        broker, "enrollment", identifier=identifier, tls=pki.context(), bind_address=bind_address
    )


def _mqtt_connect(port: int, tls: ssl.SSLContext | None) -> bytes:
    """Open a connection, send an MQTT 3.1.1 CONNECT and return the broker's first bytes
    (b"" when it closed instead). Raw sockets: a TLS refusal shows at once, where an MQTT
    client library only times out."""
    client_id = b"intruder"
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        conn = tls.wrap_socket(raw, server_hostname="127.0.0.1") if tls is not None else raw
        conn.sendall(bytes((0x10, len(body))) + body)
        return conn.recv(4)


async def refused(broker: MosquittoBroker, listener: str, tls: ssl.SSLContext | None) -> None:
    try:
        answer = await asyncio.to_thread(_mqtt_connect, broker.ports[listener], tls)
    except (ssl.SSLError, ConnectionError):
        return
    assert answer != CONNACK_ACCEPTED, "the broker accepted the connection"


async def accepted(broker: MosquittoBroker, listener: str, tls: ssl.SSLContext | None) -> bool:
    answer = await asyncio.to_thread(_mqtt_connect, broker.ports[listener], tls)
    return answer == CONNACK_ACCEPTED


async def test_device_reaches_its_own_topics_and_no_other_devices(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-a", IdentityState.ACTIVE)
    await broker.apply("dev-b", IdentityState.ACTIVE)
    async with spy(broker) as watcher, device(broker, pki, "dev-a") as a, device(
        broker, pki, "dev-b"
    ) as b:
        assert await watcher.subscribe("fg/#")
        await watcher.publish(topics.command("dev-a", "retained"), b"kept for a", retain=True)
        assert await watcher.next() == (topics.command("dev-a", "retained"), b"kept for a")
        # An active device's rights are the acl_file patterns, and 2.0's acl_file grants every
        # SUBSCRIBE: b may subscribe wide, yet nothing of a's reaches it, retained or live
        # (every delivery is checked against the patterns).
        for stolen in (topics.telemetry("dev-a"), "fg/v1/dev/+/telemetry", "#", "fg/v1/dev/#"):
            await b.subscribe(stolen)
        assert await b.subscribe(topics.commands_filter("dev-b"))
        assert await b.subscribe(topics.CA_TOPIC)

        await a.publish(topics.telemetry("dev-a"), b"21.5")
        assert await watcher.next() == (topics.telemetry("dev-a"), b"21.5")

        await b.publish(topics.telemetry("dev-a"), b"forged")  # dropped
        await b.publish(topics.command("dev-a", "reboot"), b"forged")  # dropped
        await b.publish(topics.telemetry("dev-b"), b"own")
        assert await watcher.next() == (topics.telemetry("dev-b"), b"own")

        # what reaches b: its own command, not a's
        await watcher.publish(topics.command("dev-a", "reboot"), b"for a")
        await watcher.publish(topics.command("dev-b", "reboot"), b"for b")
        assert await b.next() == (topics.command("dev-b", "reboot"), b"for b")
        await b.nothing()


async def test_quarantine_applies_to_a_live_session_and_release_restores_it(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-q", IdentityState.ACTIVE)
    async with spy(broker) as watcher, device(broker, pki, "dev-q") as q:
        assert await watcher.subscribe("fg/#")
        assert await q.subscribe(topics.commands_filter("dev-q"))
        assert await q.subscribe(topics.renew_response("dev-q"))

        await broker.apply("dev-q", IdentityState.QUARANTINED)
        await q.publish(topics.telemetry("dev-q"), b"blocked")
        await q.publish(topics.quarantine("dev-q"), b"allowed")
        assert await watcher.next() == (topics.quarantine("dev-q"), b"allowed")
        await watcher.publish(topics.command("dev-q", "run"), b"held back")
        await watcher.publish(topics.renew_response("dev-q"), b"refusal")
        assert await q.next() == (topics.renew_response("dev-q"), b"refusal")
        echoes = (topics.command("dev-q", "run"), topics.renew_response("dev-q"))

        await broker.apply("dev-q", IdentityState.ACTIVE)
        await q.publish(topics.quarantine("dev-q"), b"now blocked")
        await q.publish(topics.telemetry("dev-q"), b"flows again")
        assert await watcher.next(ignore=echoes) == (topics.telemetry("dev-q"), b"flows again")
        assert not q.lost.done(), "quarantine and release must not disconnect the device"


async def test_revocation_cuts_the_session_and_the_crl_refuses_the_certificate(
    broker: MosquittoBroker, pki: Pki, tmp_path: Path
) -> None:
    await broker.apply("dev-r", IdentityState.ACTIVE)
    await broker.apply("dev-ok", IdentityState.ACTIVE)
    async with device(broker, pki, "dev-r") as r:
        await broker.apply("dev-r", IdentityState.REVOKED)
        await asyncio.wait_for(asyncio.shield(r.lost), 3)

    # between the deny-all role and the CRL, the certificate still completes a handshake (and
    # gets no rights), but its session is cut as soon as the broker sees it
    async with device(broker, pki, "dev-r") as r:
        await asyncio.wait_for(asyncio.shield(r.lost), 3)
    deadline = time.monotonic() + 3  # the notices of the cut follow
    while "dev-r" in broker.connected():
        assert time.monotonic() < deadline, "dev-r still listed as connected"
        await asyncio.sleep(0.02)

    assert await accepted(broker, "operational", pki.context(pki.credential("dev-r")))
    await broker.publish_crl(pki.crl(pki.credential("dev-r")))
    await refused(broker, "operational", pki.context(pki.credential("dev-r")))

    # the reload kept every other certificate and all dynsec rights
    async with spy(broker) as watcher, device(broker, pki, "dev-ok") as ok:
        assert await watcher.subscribe("fg/#")
        await ok.publish(topics.telemetry("dev-ok"), b"still here")
        assert await watcher.next() == (topics.telemetry("dev-ok"), b"still here")

    # and openssl sees the handshake refused for the revoked certificate
    credential = pki.credential("dev-r")
    result = subprocess.run(
        [
            "openssl", "s_client", "-connect", f"127.0.0.1:{broker.ports['operational']}",
            "-CAfile", str(pki.root_path), "-cert", str(credential.cert_path),
            "-key", str(credential.key_path), "-ign_eof",  # wait for the server's verdict
        ],
        input=b"", capture_output=True, timeout=10, check=False,
    )  # fmt: skip
    assert b"certificate revoked" in result.stdout + result.stderr


async def test_pending_costs_nothing_and_a_certificate_alone_gets_only_its_own_topics(
    broker: MosquittoBroker, pki: Pki
) -> None:
    """A pending identity has no certificate (the gateway issues one only after admitting the
    device, and nothing returns to pending), so pending sends the broker nothing. A
    certificate of our CA is the proof of an activation: the patterns give its CN its own
    topics and nothing of anyone else's, whatever the gateway told the broker."""
    sent = broker.commit.commands
    await broker.apply("dev-p", IdentityState.PENDING)
    assert broker.commit.commands == sent
    await broker.apply("dev-live", IdentityState.ACTIVE)
    async with spy(broker) as watcher, device(broker, pki, "dev-unknown") as unknown, device(
        broker, pki, "dev-live"
    ) as live:
        assert await watcher.subscribe("fg/#")
        await unknown.publish(topics.telemetry("dev-live"), b"forged")
        await unknown.publish(topics.quarantine("dev-unknown"), b"not its topic")
        await unknown.publish(topics.telemetry("dev-unknown"), b"its own")
        assert await watcher.next() == (topics.telemetry("dev-unknown"), b"its own")
        await live.publish(topics.telemetry("dev-live"), b"marker")
        assert await watcher.next() == (topics.telemetry("dev-live"), b"marker")


async def test_a_device_cannot_take_another_devices_client_id(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-x", IdentityState.ACTIVE)
    await broker.apply("dev-y", IdentityState.ACTIVE)
    async with device(broker, pki, "dev-x") as x, device(
        broker, pki, "dev-y", identifier="dev-x"
    ) as y, spy(broker) as watcher:
        assert await watcher.subscribe("fg/#")
        await y.publish(topics.telemetry("dev-y"), b"y")
        assert await watcher.next() == (topics.telemetry("dev-y"), b"y")
        await x.publish(topics.telemetry("dev-x"), b"x")
        assert await watcher.next() == (topics.telemetry("dev-x"), b"x")
        assert not x.lost.done()
        connected = broker.connected()
        assert connected["dev-x"].name == "dev-x" and connected["dev-y"].name == "dev-y"
        assert connected["dev-y"].kind == "device" and connected["dev-y"].listener == "operational"


async def test_foreign_and_missing_client_certificates_are_refused(
    broker: MosquittoBroker, pki: Pki
) -> None:
    rogue_ca = make_issuing_ca(CLOCK)
    rogue = pki.credential("dev-a", issuer=Issuer(rogue_ca, CLOCK))
    await refused(broker, "operational", pki.context(rogue))
    await refused(broker, "operational", pki.context())  # TLS without a client certificate
    await refused(broker, "operational", None)  # no TLS at all
    # the same probe with one of our certificates gets in: the refusals above are real
    assert await accepted(broker, "operational", pki.context(pki.credential("dev-a")))


async def test_an_enrollee_reaches_its_own_enrollment_topics_only(
    broker: MosquittoBroker, pki: Pki
) -> None:
    new, other = topics.enroll_request("dev-new"), topics.enroll_request("dev-other")
    async with spy(broker) as watcher, enrollee(broker, pki, "dev-new") as dev_new, enrollee(
        broker, pki, "dev-other"
    ) as dev_other:
        assert await watcher.subscribe("fg/#")
        # requests in another device's name, or anywhere else, never reach the gateway
        await dev_new.publish(other, b"forged hello")
        await dev_new.publish(topics.telemetry("dev-new"), b"not enrolled")
        await dev_new.publish(topics.enroll_response("dev-other"), b"forged answer")
        await dev_new.publish(new, b"hello")
        assert await watcher.next() == (new, b"hello")
        await dev_other.publish(other, b"its own hello")
        assert await watcher.next() == (other, b"its own hello")

        # Mosquitto 2.0's ACL file grants any subscription, and checks each delivery: a
        # wildcard brings a client its own answers only
        for topic_filter in ("fg/v1/enroll/+/resp", "#", topics.enroll_response("dev-other")):
            await dev_new.subscribe(topic_filter)
        assert await dev_other.subscribe(topics.enroll_response("dev-other"))
        await watcher.publish(topics.enroll_response("dev-other"), b"challenge for other")
        await watcher.publish(topics.CA_TOPIC, b"not for enrollees")
        await watcher.publish(topics.enroll_response("dev-new"), b"challenge for new")
        assert await dev_new.next() == (topics.enroll_response("dev-new"), b"challenge for new")
        assert await dev_other.next() == (
            topics.enroll_response("dev-other"), b"challenge for other"
        )
        await dev_new.nothing()
        assert broker.connected()["dev-new"] == Principal("enrollee", "dev-new", "enrollment")


async def test_a_client_id_with_wildcards_gets_nothing(broker: MosquittoBroker, pki: Pki) -> None:
    # "+" would expand the read pattern to fg/v1/enroll/+/resp: Mosquitto denies such ids
    async with spy(broker) as watcher, enrollee(broker, pki, "+") as sweeper, enrollee(
        broker, pki, "dev-w"
    ) as dev_w:
        assert await watcher.subscribe("fg/#")
        await sweeper.subscribe("fg/v1/enroll/+/resp")
        assert await dev_w.subscribe(topics.enroll_response("dev-w"))
        await watcher.publish(topics.enroll_response("dev-w"), b"for dev-w")
        assert await dev_w.next() == (topics.enroll_response("dev-w"), b"for dev-w")
        await sweeper.nothing()


async def test_an_enrollee_using_a_live_devices_id_leaves_its_session_alone(
    broker: MosquittoBroker, pki: Pki
) -> None:
    """Mosquitto closes a live session when another connection names its client id; enrollees
    connect to the enrollment instance, whose client ids are not the main instance's."""
    await broker.apply("dev-t", IdentityState.ACTIVE)
    async with spy(broker) as watcher, device(broker, pki, "dev-t") as live:
        assert await watcher.subscribe("fg/#")
        await connected_from(broker, "dev-t", "127.0.0.1")
        async with enrollee(broker, pki, "dev-t", bind_address="127.0.0.2") as intruder:
            await connected_from(broker, "dev-t", "127.0.0.2", enrollment=True)
            await intruder.publish(topics.enroll_request("dev-t"), b"hello")
            assert await watcher.next() == (topics.enroll_request("dev-t"), b"hello")
            await live.publish(topics.telemetry("dev-t"), b"still here")
            assert await watcher.next() == (topics.telemetry("dev-t"), b"still here")
            assert not live.lost.done()
            assert broker.connected()["dev-t"] == Principal("device", "dev-t", "operational")
        await live.publish(topics.telemetry("dev-t"), b"and after")
        assert await watcher.next() == (topics.telemetry("dev-t"), b"and after")
        assert not live.lost.done()


async def test_the_main_instance_admits_no_anonymous_client(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await refused(broker, "internal", None)
    assert await accepted(broker, "enrollment", pki.context())  # the probe is a valid CONNECT


async def test_the_bridge_account_carries_enrollment_topics_only(
    broker: MosquittoBroker, pki: Pki
) -> None:
    async with spy(broker) as watcher, connect(
        broker,
        "internal",
        identifier="bridge-probe",
        username=dynsec.DEFAULT_BRIDGE_USERNAME,
        password=broker._bridge_password,
    ) as bridge:
        assert await watcher.subscribe("#")
        for forbidden in ("#", "fg/#", "fg/v1/dev/+/telemetry", topics.CA_TOPIC, "$SYS/#"):
            assert not await bridge.subscribe(forbidden), forbidden
        assert await bridge.subscribe("fg/v1/enroll/+/resp")
        await bridge.publish(topics.telemetry("dev-a"), b"forged")
        await bridge.publish(topics.command("dev-a", "reboot"), b"forged")
        await bridge.publish(dynsec.CONTROL_TOPIC, b'{"commands": []}')
        await bridge.publish(topics.enroll_request("dev-a"), b"hello")
        assert await watcher.next() == (topics.enroll_request("dev-a"), b"hello")
        await watcher.publish(topics.command("dev-a", "reboot"), b"not for the bridge")
        await watcher.publish(topics.enroll_response("dev-a"), b"answer")
        assert await bridge.next() == (topics.enroll_response("dev-a"), b"answer")
        await bridge.nothing()


async def test_answers_cross_the_bridges_without_a_delayed_ack_stall(
    broker: MosquittoBroker, pki: Pki
) -> None:
    """QoS 1 request -> gateway -> QoS 1 answer, as an enrolling device sees it. On a single
    bridge for both directions every round trip after the first took ~42 ms (Nagle waiting for
    a delayed ACK); through the two bridges it takes about a millisecond on loopback."""
    username, password = broker.internal_credentials
    async with connect(
        broker, "internal", identifier="gateway-probe", username=username, password=password
    ) as gateway, enrollee(broker, pki, "dev-lat") as dev:
        assert await gateway.subscribe(topics.ENROLL_REQUEST_FILTER)
        assert await dev.subscribe(topics.enroll_response("dev-lat"))
        rounds: list[float] = []
        for number in range(25):
            payload = str(number).encode()
            started = time.perf_counter()
            await dev.publish(topics.enroll_request("dev-lat"), payload)
            assert await gateway.next() == (topics.enroll_request("dev-lat"), payload)
            await gateway.publish(topics.enroll_response("dev-lat"), payload)
            assert await dev.next() == (topics.enroll_response("dev-lat"), payload)
            rounds.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)  # the device working on its next request
        assert statistics.median(rounds) < 0.02, sorted(rounds)


async def test_kick_cuts_sessions_without_revoking(broker: MosquittoBroker, pki: Pki) -> None:
    await broker.apply("dev-k", IdentityState.ACTIVE)
    async with device(broker, pki, "dev-k") as k, connect(
        broker, "enrollment", identifier="dev-e", tls=pki.context()
    ) as enrollee:
        await k.publish(topics.telemetry("dev-k"), b"hello")  # connection notices have arrived
        assert "dev-k" in broker.connected()
        assert await broker.kick("dev-k") is True
        await asyncio.wait_for(asyncio.shield(k.lost), 3)
        assert await broker.kick("dev-e") is True
        await asyncio.wait_for(asyncio.shield(enrollee.lost), 3)
    assert await broker.kick("nobody-here") is False
    async with spy(broker) as watcher, device(broker, pki, "dev-k") as k:
        assert await watcher.subscribe("fg/#")
        await k.publish(topics.telemetry("dev-k"), b"back")
        assert await watcher.next() == (topics.telemetry("dev-k"), b"back")


def _mosquitto_client(
    tool: str, broker: MosquittoBroker, pki: Pki, *args: str
) -> subprocess.CompletedProcess[str]:
    credential = pki.credential("dev-cli")
    return subprocess.run(
        [
            tool, "-h", "127.0.0.1", "-p", str(broker.ports["operational"]),
            "--cafile", str(pki.root_path), "--cert", str(credential.cert_path),
            "--key", str(credential.key_path), "-q", "1", *args,
        ],
        capture_output=True, text=True, timeout=10, check=False,
    )  # fmt: skip


async def connected_from(
    broker: MosquittoBroker, client_id: str, host: str, *, enrollment: bool = False
) -> None:
    """Wait until the notices of the main (or the enrollment) instance show ``client_id``
    connected from ``host``."""
    tracker = broker._enrollment_tracker if enrollment else broker._tracker
    deadline = time.monotonic() + 3
    while True:
        session = tracker.sessions().get(client_id)
        if session is not None and remote_host(logged_peer(session.address)) == host:
            return
        assert time.monotonic() < deadline, f"{client_id} never seen from {host}"
        await asyncio.sleep(0.02)


async def test_a_device_live_from_two_hosts_is_reported_as_a_clone(
    pki: Pki, tmp_path: Path
) -> None:
    clones: list[tuple[Principal, str, str]] = []
    broker = await start_broker(
        pki, tmp_path / "run", on_clone=lambda *seen: clones.append(seen)
    )
    try:
        await broker.apply("dev-c", IdentityState.ACTIVE)
        async with device(broker, pki, "dev-c") as first:
            await connected_from(broker, "dev-c", "127.0.0.1")
            # the device itself reconnecting from its host over a stale session: no clone
            async with device(broker, pki, "dev-c") as again:
                await asyncio.wait_for(asyncio.shield(first.lost), 3)
                await again.publish(topics.telemetry("dev-c"), b"back")
                assert clones == []
                # the same certificate from another host while live: Mosquitto hands it the
                # session, and the gateway hears of the clone with both addresses
                async with device(broker, pki, "dev-c", bind_address="127.0.0.2") as clone:
                    await asyncio.wait_for(asyncio.shield(again.lost), 3)
                    await connected_from(broker, "dev-c", "127.0.0.2")
                    assert not clone.lost.done()
        [(principal, first_address, second_address)] = clones
        assert principal == Principal("device", "dev-c", "operational")
        assert first_address.startswith("127.0.0.1:")
        assert second_address.startswith("127.0.0.2:")
    finally:
        await broker.stop()


async def test_a_clone_loses_the_session_once_the_device_is_quarantined(
    pki: Pki, tmp_path: Path
) -> None:
    """What the gateway does on a clone (quarantine it), and what follows on Mosquitto: the
    session the clone took over is cut once the quarantine is in force; whoever reconnects is
    quarantined; a clone taking over a quarantined device's session is cut at once."""
    quarantines: list[asyncio.Task[None]] = []

    def quarantine(principal: Principal, first: str, second: str) -> None:
        quarantines.append(
            asyncio.ensure_future(guarded.apply(principal.name, IdentityState.QUARANTINED))
        )

    guarded = await start_broker(pki, tmp_path / "run", on_clone=quarantine)
    try:
        await guarded.apply("dev-c", IdentityState.ACTIVE)
        async with device(guarded, pki, "dev-c") as first:
            await connected_from(guarded, "dev-c", "127.0.0.1")
            async with device(guarded, pki, "dev-c", bind_address="127.0.0.2") as clone:
                await asyncio.wait_for(asyncio.shield(first.lost), 3)
                await asyncio.wait_for(asyncio.shield(clone.lost), 3)
        assert len(quarantines) == 1
        await quarantines[0]
        async with spy(guarded) as watcher, device(guarded, pki, "dev-c") as again:
            assert await watcher.subscribe("fg/#")
            await again.publish(topics.telemetry("dev-c"), b"not while quarantined")
            await again.publish(topics.quarantine("dev-c", "report"), b"quarantined")
            assert await watcher.next() == (topics.quarantine("dev-c", "report"), b"quarantined")
            await connected_from(guarded, "dev-c", "127.0.0.1")
            # quarantined already: the next clone's takeover is cut without waiting for anyone
            async with device(guarded, pki, "dev-c", bind_address="127.0.0.3") as clone:
                await asyncio.wait_for(asyncio.shield(again.lost), 3)
                await asyncio.wait_for(asyncio.shield(clone.lost), 3)
        assert len(quarantines) == 2
    finally:
        await asyncio.gather(*quarantines, return_exceptions=True)
        await guarded.stop()


def test_a_device_reconnecting_from_an_ipv6_host_is_no_clone(tmp_path: Path) -> None:
    """Mosquitto logs an IPv6 peer unbracketed ("2001:db8:::40000"): a host ending in "::"
    is still one host on two ports, and a clone's addresses reach ``on_clone`` bracketed."""
    clones: list[tuple[Principal, str, str]] = []
    broker = MosquittoBroker(
        tmp_path / "unused",
        Listeners("::", 1883, 1884, 1885),
        None,
        None,
        external=True,
        admin_password=ADMIN_PASSWORD,
        on_clone=lambda *seen: clones.append(seen),
    )
    broker._enforced["dev-c"] = dynsec.Enforcement(
        "dev-c", IdentityKind.DEVICE, IdentityState.ACTIVE
    )

    def session(address: str) -> Session:
        return Session("dev-c", 1884, "dev-c", address)

    broker._judge_takeover(session("2001:db8:::40000"), session("2001:db8:::40001"))
    assert clones == []
    broker._judge_takeover(session("2001:db8:::40001"), session("2001:db8::1:40002"))
    assert clones == [(Principal("device", "dev-c", "operational"),
                       "[2001:db8::]:40001", "[2001:db8::1]:40002")]  # fmt: skip


async def test_takeovers_that_are_not_a_device_clone_are_not_reported(
    pki: Pki, tmp_path: Path
) -> None:
    clones: list[tuple[Principal, str, str]] = []
    broker = await start_broker(
        pki, tmp_path / "run", on_clone=lambda *seen: clones.append(seen)
    )
    try:
        # an enrollee re-attesting from two hosts: no certificate was copied
        async with enrollee(broker, pki, "dev-e"):
            await connected_from(broker, "dev-e", "127.0.0.1", enrollment=True)
            async with enrollee(broker, pki, "dev-e", bind_address="127.0.0.2"):
                await connected_from(broker, "dev-e", "127.0.0.2", enrollment=True)
        # a certificate the registry does not know gets no rights, and is no device of ours
        async with device(broker, pki, "dev-unknown"):
            await connected_from(broker, "dev-unknown", "127.0.0.1")
            async with device(broker, pki, "dev-unknown", bind_address="127.0.0.2"):
                await connected_from(broker, "dev-unknown", "127.0.0.2")
        assert clones == []
    finally:
        await broker.stop()


async def test_connections_and_disconnections_are_reported(pki: Pki, tmp_path: Path) -> None:
    seen: list[tuple[str, Principal, str]] = []
    observed: list[Observation] = []
    broker = await start_broker(
        pki,
        tmp_path / "run",
        on_connect=lambda who, remote: seen.append(("connected", who, remote)),
        on_disconnect=lambda who: seen.append(("disconnected", who, "")),
        observer=observed.append,
    )

    async def reported(count: int) -> list[tuple[str, Principal, str]]:
        deadline = time.monotonic() + 3
        while len(seen) < count:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
        return [(what, who, remote_host(remote)) for what, who, remote in seen]

    device_a = Principal("device", "dev-cb", "operational")
    enrollee_b = Principal("enrollee", "enr-cb", "enrollment")
    try:
        await broker.apply("dev-cb", IdentityState.ACTIVE)
        async with device(broker, pki, "dev-cb"):
            assert await reported(1) == [("connected", device_a, "127.0.0.1")]
            async with enrollee(broker, pki, "enr-cb", bind_address="127.0.0.2") as kicked:
                assert (await reported(2))[1] == ("connected", enrollee_b, "127.0.0.2")
                assert await broker.kick("enr-cb")  # taken over by our own accounts
                await asyncio.wait_for(asyncio.shield(kicked.lost), 3)
                assert (await reported(3))[2] == ("disconnected", enrollee_b, "")
        assert (await reported(4))[3] == ("disconnected", device_a, "")
        # a restarted enrollment instance has lost its sessions
        async with enrollee(broker, pki, "enr-cb") as gone:
            await reported(5)
            await restarted(broker.enrollment_process)
            await asyncio.wait_for(asyncio.shield(gone.lost), 3)
            assert (await reported(6))[5] == ("disconnected", enrollee_b, "")
        await asyncio.sleep(QUIET)
        assert len(seen) == 6  # our own connections (control, monitor, kicks) are silent
        # the observer hears of certificate identities only: not of enrollees, nor of the
        # gateway's own clients
        async with spy(broker) as watcher:
            await watcher.publish("fg/v1/nothing", b"")
        [connected, disconnected] = observed
        assert isinstance(connected, observe.Connected) and connected.identity == "dev-cb"
        assert remote_host(connected.remote) == "127.0.0.1"
        assert disconnected == observe.Disconnected("dev-cb")
    finally:
        await broker.stop()


async def test_unfollowed_connection_notices_are_not_read_nor_remembered(
    pki: Pki, tmp_path: Path
) -> None:
    """A cluster's follower: the shared broker seen as external, notices left unread."""
    seen: list[tuple[str, str]] = []
    managed = await start_broker(pki, tmp_path / "run", admin_password=ADMIN_PASSWORD)
    follower = external_to(
        managed,
        tmp_path,
        on_connect=lambda who, remote: seen.append(("connected", who.name)),
        on_disconnect=lambda who: seen.append(("disconnected", who.name)),
        follow_sessions=False,
    )
    events = f"{topics.PREFIX}/admin/events"

    async def tracked(client_id: str) -> None:
        deadline = time.monotonic() + 3
        while client_id not in follower.connected():
            assert time.monotonic() < deadline, f"{client_id} tracked"
            await asyncio.sleep(0.02)

    try:
        await follower.start()
        assert not follower.follows_sessions
        assert follower.has_audience(events)  # not following: nobody can tell
        await managed.apply("dev-f", IdentityState.ACTIVE)
        await managed.apply("ops-f", IdentityState.ACTIVE, kind=IdentityKind.OPERATOR)
        async with device(managed, pki, "dev-f"), device(managed, pki, "ops-f"):
            await asyncio.sleep(QUIET)
            assert follower.connected() == {} and seen == []  # nothing read
            await follower.follow_sessions(True)
            await asyncio.sleep(QUIET)
            # the operator connected before anyone looked: an event may still be heard
            assert follower.has_audience(events)
        async with device(managed, pki, "dev-f"):
            await tracked("dev-f")  # followed from then on
            await follower.follow_sessions(False)
            assert follower.connected() == {}  # forgotten, and nobody told it ended
        await asyncio.sleep(QUIET)
        assert seen == [("connected", "dev-f")]  # the disconnect went unread
    finally:
        await follower.stop()
        await managed.stop()
    with pytest.raises(ValueError, match="bridges"):
        await managed.follow_sessions(False)  # a managed broker's bridges need its notices


async def test_admin_events_have_an_audience_only_while_an_operator_is_connected(
    broker: MosquittoBroker, pki: Pki
) -> None:
    events = f"{topics.PREFIX}/admin/events"

    async def audience(expected: bool) -> None:
        deadline = time.monotonic() + 3
        while broker.has_audience(events) is not expected:
            assert time.monotonic() < deadline, f"audience {expected}"
            await asyncio.sleep(0.02)

    assert broker.has_audience(topics.telemetry("dev-a"))  # not an operator's topic: unknown
    await audience(False)
    await broker.apply("dev-aud", IdentityState.ACTIVE)
    await broker.apply("ops-aud", IdentityState.ACTIVE, kind=IdentityKind.OPERATOR)
    async with device(broker, pki, "dev-aud"):
        await asyncio.sleep(QUIET)
        assert not broker.has_audience(events)  # a device may not read them
        async with device(broker, pki, "ops-aud"):
            await audience(True)
        await audience(False)


async def test_the_observer_sees_a_takeover_end_one_session_and_begin_another(
    pki: Pki, tmp_path: Path
) -> None:
    observed: list[Observation] = []

    def failing_observer(observation: Observation) -> None:
        observed.append(observation)
        raise RuntimeError("an observer's bug must not reach the broker")

    broker = await start_broker(pki, tmp_path / "run", observer=failing_observer)
    try:
        await broker.apply("dev-ob", IdentityState.ACTIVE)
        async with device(broker, pki, "dev-ob") as first:
            await connected_from(broker, "dev-ob", "127.0.0.1")
            async with device(broker, pki, "dev-ob", bind_address="127.0.0.2"):
                await asyncio.wait_for(asyncio.shield(first.lost), 3)
                await connected_from(broker, "dev-ob", "127.0.0.2")
        deadline = time.monotonic() + 3
        while len(observed) < 4:
            assert time.monotonic() < deadline, observed
            await asyncio.sleep(0.02)
        kinds = [(type(o).__name__, o.identity) for o in observed]
        assert kinds == [
            ("Connected", "dev-ob"),
            ("Disconnected", "dev-ob"),
            ("Connected", "dev-ob"),
            ("Disconnected", "dev-ob"),
        ]
        assert isinstance(observed[2], observe.Connected)
        assert observed[2].remote.startswith("127.0.0.2:")
    finally:
        await broker.stop()


@pytest.mark.parametrize("callback", ["on_clone", "on_connect", "on_disconnect", "observer"])
def test_callbacks_must_be_callable(pki: Pki, tmp_path: Path, callback: str) -> None:
    with pytest.raises(TypeError):
        MosquittoBroker(
            tmp_path, Listeners(), pki.server_tls(), pki.crl(), **{callback: "quarantine"}  # type: ignore[arg-type]
        )


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
async def test_mosquitto_clients_with_an_issued_certificate(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-cli", IdentityState.ACTIVE)
    async with spy(broker) as watcher:
        assert await watcher.subscribe("fg/#")
        await watcher.publish(topics.telemetry("dev-other"), b"retained", retain=True)
        assert await watcher.next() == (topics.telemetry("dev-other"), b"retained")
        denied = await asyncio.to_thread(
            _mosquitto_client, "mosquitto_pub", broker, pki,
            "-t", topics.telemetry("dev-other"), "-m", "forged",
        )  # fmt: skip
        own = await asyncio.to_thread(
            _mosquitto_client, "mosquitto_pub", broker, pki,
            "-t", topics.telemetry("dev-cli"), "-m", "from the shell",
        )  # fmt: skip
        assert own.returncode == 0, own.stderr
        assert denied.returncode == 0, denied.stderr  # MQTT 3.1.1 cannot say "denied"
        assert await watcher.next() == (topics.telemetry("dev-cli"), b"from the shell")
        await watcher.nothing()
    async with spy(broker) as control:  # a client allowed to read it gets it, retained
        assert await control.subscribe(topics.telemetry("dev-other"))
        assert await control.next() == (topics.telemetry("dev-other"), b"retained")
    sub = await asyncio.to_thread(
        _mosquitto_client, "mosquitto_sub", broker, pki,
        "-t", topics.telemetry("dev-other"), "-W", "2",
    )  # fmt: skip
    # granted (2.0's acl_file grants every SUBSCRIBE) but nothing flows, retained included
    assert sub.stdout == "" and "Timed out" in sub.stderr


async def test_identities_from_the_registry_are_enforced_from_the_first_connection(
    pki: Pki, tmp_path: Path
) -> None:
    records = [
        Record("dev-s1", IdentityKind.DEVICE, IdentityState.ACTIVE),
        Record("dev-s2", IdentityKind.DEVICE, IdentityState.QUARANTINED),
        Record("dev-s3", IdentityKind.DEVICE, IdentityState.REVOKED),
    ]
    broker = await start_broker(pki, tmp_path / "run", identities=lambda: records)
    try:
        assert await broker.sync(records) == 0  # nothing changed since the start
        async with spy(broker) as watcher, device(broker, pki, "dev-s1") as s1, device(
            broker, pki, "dev-s2"
        ) as s2, device(broker, pki, "dev-s3") as s3:
            assert await watcher.subscribe("fg/#")
            # A revoked identity's session is cut as soon as the broker reports it, so this
            # publish may find the connection gone (its PUBACK never comes): either way it
            # reaches nobody, which the watcher's next message shows.
            with contextlib.suppress(aiomqtt.MqttError):
                await s3.publish(topics.telemetry("dev-s3"), b"revoked")
            await s2.publish(topics.telemetry("dev-s2"), b"quarantined")
            await s2.publish(topics.quarantine("dev-s2"), b"outlet")
            assert await watcher.next() == (topics.quarantine("dev-s2"), b"outlet")
            await s1.publish(topics.telemetry("dev-s1"), b"active")
            assert await watcher.next() == (topics.telemetry("dev-s1"), b"active")

            changed = [Record("dev-s2", IdentityKind.DEVICE, IdentityState.ACTIVE), *records[::2]]
            assert await broker.sync(changed) == 1
            await s2.publish(topics.telemetry("dev-s2"), b"released")
            assert await watcher.next() == (topics.telemetry("dev-s2"), b"released")
    finally:
        await broker.stop()


async def test_a_crl_and_a_certificate_renewed_at_once_are_each_confirmed_by_their_own_reload(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hourly renewal and a CRL publication can reload the main instance together: each
    returns only once a reload begun after its own files were written is confirmed (else the
    CRL could be confirmed by the renewal's reload while the old CRL is still loaded)."""
    broker = await start_broker(pki, tmp_path / "run")
    try:
        main = broker.process
        assert main is not None
        signals: list[str] = []  # "sighup" sent to main, "notice" of a main reload received
        send_sighup = main.reload

        def reload() -> None:
            signals.append("sighup")
            send_sighup()

        monkeypatch.setattr(main, "reload", reload)
        reloaded = broker._reloaded

        def notice(instance: str, line: bytes) -> None:
            if instance == "main" and line.rstrip().endswith(b"Reloading config."):
                signals.append("notice")
            reloaded(instance, line)

        monkeypatch.setattr(broker, "_reloaded", notice)
        seen_at_return: dict[str, list[str]] = {}

        async def recorded(name: str, call: Awaitable[None]) -> None:
            await call
            seen_at_return[name] = list(signals)

        await asyncio.gather(
            recorded("renewal", broker.renew_server_certificate(pki.server_tls())),
            recorded("crl", broker.publish_crl(pki.crl())),
        )
        for name, seen in seen_at_return.items():
            # every SIGHUP sent so far was confirmed by a notice after it
            assert seen.count("notice") >= seen.count("sighup"), (name, seen)
            assert seen[-1] == "notice", (name, seen)
        assert signals == ["sighup", "notice", "sighup", "notice"]
    finally:
        await broker.stop()


async def test_stop_leaves_no_cut_running_though_notices_arrive_meanwhile(
    tmp_path: Path,
) -> None:
    """A notice the admin link handles while stop() awaits the cuts it cancelled starts a new
    cut: stop() ends the links first, so none is left behind."""
    with socket.socket() as closed:  # a port nothing listens on: each cut's kick fails fast
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]
    broker = MosquittoBroker(
        tmp_path / "unused",
        Listeners("127.0.0.1", nowhere, nowhere, nowhere),
        None,
        None,
        external=True,
        admin_password=ADMIN_PASSWORD,
    )

    async def link_reading_notices() -> None:
        while True:  # each a revoked device's session seen
            broker._cut("dev-r", "revoked")
            await asyncio.sleep(0)

    broker._admin.task = asyncio.create_task(link_reading_notices())
    await asyncio.sleep(0.01)  # a few cuts under way, each waiting for the admin link
    assert broker._cuts
    await broker.stop()
    left = [cut for cut in broker._cuts if not cut.done()]
    for cut in left:
        cut.cancel()
    assert left == []


async def test_an_external_broker_is_driven_through_its_admin_account(
    pki: Pki, tmp_path: Path
) -> None:
    managed = await start_broker(pki, tmp_path / "run", admin_password=ADMIN_PASSWORD)
    observed: list[Observation] = []
    external = external_to(
        managed,
        tmp_path,
        crl_path=tmp_path / "crl-for-operator.pem",
        observer=observed.append,
    )
    try:
        await external.start()
        await external.apply("dev-ext", IdentityState.ACTIVE)
        # another gateway may have changed it since: an external broker's apply always sends
        sent = external.commit.commands
        await external.apply("dev-ext", IdentityState.ACTIVE)
        assert external.commit.commands == sent + 1
        async with spy(external) as watcher, device(external, pki, "dev-ext") as ext:
            assert await watcher.subscribe("fg/#")
            await ext.publish(topics.telemetry("dev-ext"), b"via the operator")
            assert await watcher.next() == (topics.telemetry("dev-ext"), b"via the operator")
        deadline = time.monotonic() + 3
        while len(observed) < 2:  # the operator's broker logs to its $SYS topic too
            assert time.monotonic() < deadline, observed
            await asyncio.sleep(0.02)
        assert [type(o) for o in observed] == [observe.Connected, observe.Disconnected]
        assert {o.identity for o in observed} == {"dev-ext"}
        crl = pki.crl()
        await external.publish_crl(crl)
        assert (tmp_path / "crl-for-operator.pem").read_bytes() == crl
        assert external.process is None
    finally:
        await external.stop()
        await managed.stop()


async def test_an_admission_on_a_shared_broker_never_undoes_another_writers_quarantine(
    pki: Pki, tmp_path: Path
) -> None:
    """Two gateways of one cluster: the leader quarantines a device while another gateway,
    which certified it a moment earlier, admits it. The admission sends nothing (a device
    certified active needs no dynsec objects with device patterns), so it cannot reset the
    quarantine role the leader made; a plain sync of an external broker does reset it."""
    leader = await start_broker(
        pki, tmp_path / "run", admin_password=ADMIN_PASSWORD, device_patterns=True
    )
    other = external_to(leader, tmp_path, device_patterns=True)
    try:
        await other.start()
        await leader.apply("dev-race", IdentityState.QUARANTINED)
        sent = other.commit.commands
        admitted = Record("dev-race", IdentityKind.DEVICE, IdentityState.ACTIVE)
        assert await other.sync([admitted], certified=True) == 1  # in force, as far as it knows
        assert other.commit.commands == sent  # and nothing was sent for it
        async with spy(leader) as watcher, device(leader, pki, "dev-race") as dev:
            assert await watcher.subscribe("fg/#")
            await dev.publish(topics.telemetry("dev-race"), b"still quarantined")
            await dev.publish(topics.quarantine("dev-race"), b"outlet")
            assert await watcher.next() == (topics.quarantine("dev-race"), b"outlet")
        # The admission told the gateway nothing about the role: when it later syncs what the
        # registry holds (a new leader repairing a release the dead one never enforced), it
        # still sends the reset, and the device gets its rights back.
        sent = other.commit.commands
        assert await other.sync([admitted]) == 1
        assert other.commit.commands == sent + 1
        async with spy(leader) as watcher, device(leader, pki, "dev-race") as dev:
            assert await watcher.subscribe("fg/#")
            await dev.publish(topics.telemetry("dev-race"), b"released")
            assert await watcher.next() == (topics.telemetry("dev-race"), b"released")
    finally:
        await other.stop()
        await leader.stop()


async def test_a_refused_command_raises_with_the_plugins_error(broker: MosquittoBroker) -> None:
    with pytest.raises(MosquittoError) as caught:
        await broker.execute([dynsec.add_client_role("no-such-client", dynsec.KICK_ROLE)])
    assert caught.value.reason is MosquittoReason.COMMAND_FAILED
    assert caught.value.failures == (("addClientRole no-such-client", "Client not found"),)


async def test_concurrent_admissions_share_messages_and_each_device_gets_its_rights(
    pki: Pki, tmp_path: Path
) -> None:
    # a budget no message reaches: the count of messages depends on arrivals only
    broker = await start_broker(pki, tmp_path / "run", batch_seconds=60.0)
    try:
        names = [f"dev-burst{i}" for i in range(30)]
        before = (broker.commit.messages, broker.commit.commands)
        changed = await asyncio.gather(
            *(broker.sync([Record(n, IdentityKind.DEVICE, IdentityState.ACTIVE)]) for n in names)
        )
        assert changed == [1] * 30
        # an active device's rights are the acl_file patterns: no dynsec command at all
        assert (broker.commit.messages, broker.commit.commands) == before
        quarantined = [f"dev-q{i}" for i in range(30)]
        await asyncio.gather(
            *(
                broker.sync([Record(n, IdentityKind.DEVICE, IdentityState.QUARANTINED)])
                for n in quarantined
            )
        )
        # two commands per newly quarantined device (each accepted one rewrites the plugin's
        # file); all arrived while the first message (a cautious 8 commands) was out
        assert broker.commit.commands - before[1] == 60
        assert broker.commit.messages - before[0] == 2
        async with spy(broker) as watcher, device(broker, pki, names[-1]) as last:
            assert await watcher.subscribe("fg/#")
            await last.publish(topics.telemetry(names[-1]), b"admitted")
            assert await watcher.next() == (topics.telemetry(names[-1]), b"admitted")
    finally:
        await broker.stop()


async def test_a_refused_command_fails_only_the_change_it_belongs_to(
    broker: MosquittoBroker, pki: Pki
) -> None:
    before = broker.commit.messages
    good, bad = await asyncio.gather(
        broker.sync(
            [
                Record("dev-g1", IdentityKind.DEVICE, IdentityState.ACTIVE),
                Record("dev-g2", IdentityKind.DEVICE, IdentityState.ACTIVE),
            ]
        ),
        broker.execute([dynsec.add_client_role("no-such-client", dynsec.KICK_ROLE)]),
        return_exceptions=True,
    )
    assert broker.commit.messages == before + 1  # one message carried all three changes
    assert good == 2
    assert isinstance(bad, MosquittoError) and bad.reason is MosquittoReason.COMMAND_FAILED
    async with spy(broker) as watcher, device(broker, pki, "dev-g2") as g2:
        assert await watcher.subscribe("fg/#")
        await g2.publish(topics.telemetry("dev-g2"), b"in")
        assert await watcher.next() == (topics.telemetry("dev-g2"), b"in")


async def test_a_role_left_behind_gets_the_identitys_rights(
    broker: MosquittoBroker, pki: Pki
) -> None:
    # a role of that name exists already (another gateway's, a half-done earlier change),
    # with every right: creating it is refused, so its ACLs are set after
    await broker.execute([dynsec.create_role("dev-dev-left", dynsec.internal_acls())])
    before = broker.commit.commands
    quarantined = Record("dev-left", IdentityKind.DEVICE, IdentityState.QUARANTINED)
    assert await broker.sync([quarantined])
    assert broker.commit.commands - before == 3  # createRole, createClient, then modifyRole
    async with spy(broker) as watcher, device(broker, pki, "dev-left") as left:
        assert await watcher.subscribe("fg/#")
        await left.publish(topics.telemetry("dev-left"), b"must not pass")
        await left.publish(topics.quarantine("dev-left"), b"rights set")
        assert await watcher.next() == (topics.quarantine("dev-left"), b"rights set")


async def test_a_state_already_in_force_is_not_sent_again(broker: MosquittoBroker) -> None:
    await broker.apply("dev-same", IdentityState.ACTIVE)
    sent = broker.commit.commands
    await broker.apply("dev-same", IdentityState.ACTIVE)  # the gateway's poll, after admission
    assert await broker.sync([Record("dev-same", IdentityKind.DEVICE, IdentityState.ACTIVE)]) == 0
    assert broker.commit.commands == sent
    await broker.apply("dev-same", IdentityState.QUARANTINED)
    assert broker.commit.commands == sent + 2  # createRole, createClient
    await broker.apply("dev-same", IdentityState.QUARANTINED)
    assert broker.commit.commands == sent + 2
    await broker.apply("dev-same", IdentityState.ACTIVE)  # release: the role loses its ACLs
    await broker.apply("dev-same", IdentityState.QUARANTINED)
    assert broker.commit.commands == sent + 4  # one modifyRole each


async def test_changes_of_one_identity_land_in_the_order_they_were_made(
    broker: MosquittoBroker, pki: Pki
) -> None:
    """An urgent change (apply) overtakes queued admissions (sync), but never the queued
    change of its own identity: the last call wins, as it would one after another."""
    others = [Record(f"dev-o{i}", IdentityKind.DEVICE, IdentityState.ACTIVE) for i in range(6)]
    await asyncio.gather(
        *(broker.sync([record]) for record in others),
        broker.sync([Record("dev-order", IdentityKind.DEVICE, IdentityState.ACTIVE)]),
        broker.apply("dev-order", IdentityState.QUARANTINED),
    )
    async with spy(broker) as watcher, device(broker, pki, "dev-order") as dev:
        assert await watcher.subscribe("fg/#")
        await dev.publish(topics.telemetry("dev-order"), b"must not pass")
        await dev.publish(topics.quarantine("dev-order"), b"quarantined")
        assert await watcher.next() == (topics.quarantine("dev-order"), b"quarantined")


async def test_bad_identity_ids_are_refused_before_reaching_the_broker(
    broker: MosquittoBroker,
) -> None:
    with pytest.raises(ValueError):
        await broker.apply("fg/+/#", IdentityState.ACTIVE)
    with pytest.raises(ValueError):
        await broker.apply("_fg_admin", IdentityState.ACTIVE)
    with pytest.raises(ValueError):
        await broker.apply("dev-a", "sleeping")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await broker.kick("")


async def restarted(process: MosquittoProcess | None) -> None:
    """Kill ``process`` and wait until its supervisor has started it again."""
    assert process is not None and process.pid is not None
    old_pid, restarts = process.pid, process.restarts
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.restarts == restarts and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert process.restarts == restarts + 1 and process.pid != old_pid


async def request_crosses(broker: MosquittoBroker, pki: Pki, name: str) -> None:
    """An enrollee's request reaches the gateway side and its answer comes back, retried
    while the bridges reconnect (as a device retries)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            async with spy(broker) as watcher, enrollee(broker, pki, name) as dev:
                assert await watcher.subscribe(topics.ENROLL_REQUEST_FILTER)
                assert await dev.subscribe(topics.enroll_response(name))
                await dev.publish(topics.enroll_request(name), b"hello")
                assert await watcher.next(timeout=1) == (topics.enroll_request(name), b"hello")
                await watcher.publish(topics.enroll_response(name), b"answer")
                assert await dev.next(timeout=1) == (topics.enroll_response(name), b"answer")
                return
        except (TimeoutError, aiomqtt.MqttError):
            assert time.monotonic() < deadline, "enrollment never crossed the bridges again"
            await asyncio.sleep(0.2)


async def test_a_reloaded_enrollment_instance_serves_a_new_certificate_and_keeps_its_rules(
    broker: MosquittoBroker, pki: Pki
) -> None:
    """What a renewal of the server certificate does (new files, SIGHUP to each instance)."""
    tls = pki.server_tls()
    (broker.run_dir / "server.key").write_bytes(tls.server_key_pem)
    (broker.run_dir / "server.pem").write_bytes(tls.server_cert_pem)
    process = broker.enrollment_process
    assert process is not None
    async with enrollee(broker, pki, "dev-old") as before:
        process.reload()
        served = x509.load_pem_x509_certificate(tls.server_cert_pem)
        deadline = time.monotonic() + 3
        while True:  # the reload is asynchronous: new handshakes get the new certificate
            presented = await asyncio.to_thread(
                ssl.get_server_certificate, ("127.0.0.1", broker.ports["enrollment"])
            )
            if x509.load_pem_x509_certificate(presented.encode()) == served:
                break
            assert time.monotonic() < deadline, "the old certificate is still served"
            await asyncio.sleep(0.05)
        await request_crosses(broker, pki, "dev-reloaded")
        async with spy(broker) as watcher, enrollee(broker, pki, "dev-sweeper") as sweeper:
            assert await watcher.subscribe("fg/#")
            await sweeper.subscribe("fg/v1/enroll/+/resp")
            await sweeper.publish(topics.enroll_request("dev-old"), b"forged")
            await sweeper.publish(topics.enroll_request("dev-sweeper"), b"own")
            assert await watcher.next() == (topics.enroll_request("dev-sweeper"), b"own")
            assert await before.subscribe(topics.enroll_response("dev-old"))
            await watcher.publish(topics.enroll_response("dev-old"), b"for the old one")
            assert await before.next() == (topics.enroll_response("dev-old"), b"for the old one")
            await sweeper.nothing()
        assert not before.lost.done()


@pytest.mark.slow
async def test_the_broker_is_restarted_when_it_dies_and_keeps_its_rules(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-crash", IdentityState.ACTIVE)
    await restarted(broker.process)
    await broker.apply("dev-crash-2", IdentityState.ACTIVE)  # the admin link came back too
    async with spy(broker) as watcher, device(broker, pki, "dev-crash") as crash:
        assert await watcher.subscribe("fg/#")
        await crash.publish(topics.telemetry("dev-crash"), b"survived")
        assert await watcher.next() == (topics.telemetry("dev-crash"), b"survived")
    await request_crosses(broker, pki, "dev-after-main")  # the bridges reconnected
    await restarted(broker.enrollment_process)
    await request_crosses(broker, pki, "dev-after-enrollment")


async def test_stop_ends_the_process_and_start_fails_loudly_on_a_taken_port(
    pki: Pki, tmp_path: Path
) -> None:
    broker = await start_broker(pki, tmp_path / "one")
    process = broker.process
    assert process is not None and process.pid is not None
    pid = process.pid
    taken = broker.ports["operational"]
    second = MosquittoBroker(
        tmp_path / "two", Listeners(operational_port=taken), pki.server_tls(), pki.crl()
    )
    with pytest.raises(MosquittoError) as caught:
        await second.start()
    assert caught.value.reason is MosquittoReason.START_FAILED
    assert "in use" in caught.value.detail
    # the enrollment instance's port too
    third = MosquittoBroker(
        tmp_path / "three",
        Listeners(enrollment_port=broker.ports["enrollment"]),
        pki.server_tls(),
        pki.crl(),
    )
    with pytest.raises(MosquittoError) as caught:
        await third.start()
    assert caught.value.reason is MosquittoReason.START_FAILED
    assert "in use" in caught.value.detail
    assert third.process is not None and not third.process.running  # nothing left behind
    await broker.stop()
    assert not process.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_run_dir_keeps_secrets_private(broker: MosquittoBroker) -> None:
    run_dir = broker.run_dir
    assert run_dir.stat().st_mode & 0o777 == 0o700
    # enrollment.conf holds the bridges' password, which Mosquitto needs in plain text
    for name in ("server.key", "dynsec.json", "enrollment.conf", "monitor.passwd"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o600
    dynsec_file = (run_dir / "dynsec.json").read_text()
    assert dynsec.DEFAULT_ADMIN_USERNAME in dynsec_file
    assert broker.internal_credentials[1] not in dynsec_file  # only its PBKDF2 hash
    assert broker._bridge_password not in dynsec_file
    assert broker._monitor_password not in (run_dir / "monitor.passwd").read_text()
