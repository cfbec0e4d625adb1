"""MosquittoBroker end to end: a real Mosquitto 2 on free loopback ports, real TLS, real MQTT
clients (aiomqtt, and mosquitto-clients / openssl for the command-line checks).

A "spy" on the internal listener subscribes to everything, so a message Mosquitto wrongly
routed would be seen; each denial is paired with an allowed message sent after it on the same
connection, which proves the spy was listening (Mosquitto keeps one client's messages in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from gateway.acl import Principal
from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
    MosquittoReason,
    ServerTlsMaterial,
    dynsec,
)
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

    async def publish(self, topic: str, payload: bytes) -> None:
        await self.client.publish(topic, payload, qos=1)

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
        for stolen in (topics.telemetry("dev-a"), "fg/v1/dev/+/telemetry", "#", "fg/v1/dev/#"):
            assert not await b.subscribe(stolen), stolen
        assert await b.subscribe(topics.commands_filter("dev-b"))
        assert await b.subscribe(topics.CA_TOPIC)
        assert not await b.subscribe("fg/v1/pki/+")

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

    # between deleteClient and the CRL, the certificate still connects but gets no rights
    async with spy(broker) as watcher, device(broker, pki, "dev-r") as r:
        assert await watcher.subscribe("fg/#")
        assert not await r.subscribe(topics.commands_filter("dev-r"))
        await r.publish(topics.telemetry("dev-r"), b"after revocation")
        await watcher.nothing()

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


async def test_pending_and_unknown_certificates_get_no_rights(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-p", IdentityState.PENDING)
    await broker.apply("dev-live", IdentityState.ACTIVE)
    async with spy(broker) as watcher, device(broker, pki, "dev-p") as p, device(
        broker, pki, "dev-unknown"
    ) as unknown, device(broker, pki, "dev-live") as live:
        assert await watcher.subscribe("fg/#")
        for peer, name in ((p, "dev-p"), (unknown, "dev-unknown")):
            assert not await peer.subscribe(topics.commands_filter(name))
            await peer.publish(topics.telemetry(name), b"not yet")
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


async def test_enrollees_reach_the_enrollment_topics_only(
    broker: MosquittoBroker, pki: Pki
) -> None:
    async with spy(broker) as watcher, connect(
        broker, "enrollment", identifier="dev-new", tls=pki.context()
    ) as enrollee:
        assert await watcher.subscribe("fg/#")
        assert await enrollee.subscribe(topics.enroll_response("dev-new"))
        sweeping = ("fg/v1/enroll/+/resp", "fg/v1/enroll/#", "#", topics.ENROLL_REQUEST_FILTER)
        for topic_filter in sweeping:
            assert not await enrollee.subscribe(topic_filter), topic_filter
        await enrollee.publish(topics.telemetry("dev-new"), b"not enrolled")
        await enrollee.publish(topics.enroll_request("dev-new"), b"hello")
        assert await watcher.next() == (topics.enroll_request("dev-new"), b"hello")
        await watcher.publish(topics.enroll_response("dev-new"), b"challenge")
        assert await enrollee.next() == (topics.enroll_response("dev-new"), b"challenge")
        assert broker.connected()["dev-new"].kind == "enrollee"


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


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients missing")
async def connected_from(broker: MosquittoBroker, client_id: str, host: str) -> None:
    """Wait until the broker's notices show ``client_id`` connected from ``host``."""
    deadline = time.monotonic() + 3
    while True:
        session = broker._tracker.sessions().get(client_id)
        if session is not None and session.address.rsplit(":", 1)[0] == host:
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


async def test_takeovers_that_are_not_a_device_clone_are_not_reported(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clones: list[tuple[Principal, str, str]] = []
    broker = await start_broker(
        pki, tmp_path / "run", on_clone=lambda *seen: clones.append(seen)
    )
    try:
        await broker.apply("dev-q", IdentityState.ACTIVE)
        # an enrollee re-attesting from two hosts, and an anonymous client naming a live
        # device's id on the enrollment listener: no certificate was copied
        async with connect(broker, "enrollment", identifier="dev-e", tls=pki.context()):
            await connected_from(broker, "dev-e", "127.0.0.1")
            async with connect(
                broker, "enrollment", identifier="dev-e", tls=pki.context(),
                bind_address="127.0.0.2",
            ):  # fmt: skip
                await connected_from(broker, "dev-e", "127.0.0.2")
        async with device(broker, pki, "dev-q") as live:
            await connected_from(broker, "dev-q", "127.0.0.1")
            async with connect(
                broker, "enrollment", identifier="dev-q", tls=pki.context(),
                bind_address="127.0.0.2",
            ):  # fmt: skip
                await connected_from(broker, "dev-q", "127.0.0.2")
                # Mosquitto 2.0 closes the device's session (one client-id namespace for all
                # listeners); the gateway cannot prevent it, but says so in its log
                await asyncio.wait_for(asyncio.shield(live.lost), 3)
        assert any(
            "session of dev-q" in r.getMessage() and "taken over" in r.getMessage()
            for r in caplog.records
        )
        # a certificate the registry does not know gets no rights, and is no device of ours
        async with device(broker, pki, "dev-unknown"):
            await connected_from(broker, "dev-unknown", "127.0.0.1")
            async with device(broker, pki, "dev-unknown", bind_address="127.0.0.2"):
                await connected_from(broker, "dev-unknown", "127.0.0.2")
        assert clones == []
    finally:
        await broker.stop()


def test_on_clone_must_be_callable(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        MosquittoBroker(
            tmp_path, Listeners(), pki.server_tls(), pki.crl(), on_clone="quarantine"  # type: ignore[arg-type]
        )


async def test_mosquitto_clients_with_an_issued_certificate(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-cli", IdentityState.ACTIVE)
    async with spy(broker) as watcher:
        assert await watcher.subscribe("fg/#")
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
    sub = await asyncio.to_thread(
        _mosquitto_client, "mosquitto_sub", broker, pki,
        "-t", topics.telemetry("dev-other"), "-W", "2",
    )  # fmt: skip
    assert "denied" in sub.stderr


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


async def test_an_external_broker_is_driven_through_its_admin_account(
    pki: Pki, tmp_path: Path
) -> None:
    managed = await start_broker(pki, tmp_path / "run", admin_password="operator-secret-0123")
    ports = managed.ports
    external = MosquittoBroker(
        tmp_path / "unused",
        Listeners("127.0.0.1", ports["enrollment"], ports["operational"], ports["internal"]),
        None,
        None,
        external=True,
        admin_password="operator-secret-0123",
        internal_username="_fg_other_gateway",
        crl_path=tmp_path / "crl-for-operator.pem",
    )
    try:
        await external.start()
        await external.apply("dev-ext", IdentityState.ACTIVE)
        async with spy(external) as watcher, device(external, pki, "dev-ext") as ext:
            assert await watcher.subscribe("fg/#")
            await ext.publish(topics.telemetry("dev-ext"), b"via the operator")
            assert await watcher.next() == (topics.telemetry("dev-ext"), b"via the operator")
        crl = pki.crl()
        await external.publish_crl(crl)
        assert (tmp_path / "crl-for-operator.pem").read_bytes() == crl
        assert external.process is None
    finally:
        await external.stop()
        await managed.stop()


async def test_a_refused_command_raises_with_the_plugins_error(broker: MosquittoBroker) -> None:
    with pytest.raises(MosquittoError) as caught:
        await broker.execute([dynsec.add_client_role("no-such-client", dynsec.KICK_ROLE)])
    assert caught.value.reason is MosquittoReason.COMMAND_FAILED
    assert caught.value.failures == (("addClientRole no-such-client", "Client not found"),)


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


async def test_the_broker_is_restarted_when_it_dies_and_keeps_its_rules(
    broker: MosquittoBroker, pki: Pki
) -> None:
    await broker.apply("dev-crash", IdentityState.ACTIVE)
    process = broker.process
    assert process is not None and process.pid is not None
    old_pid = process.pid
    os.kill(old_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process.restarts == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert process.restarts == 1 and process.pid != old_pid
    await broker.apply("dev-crash-2", IdentityState.ACTIVE)  # the admin link came back too
    async with spy(broker) as watcher, device(broker, pki, "dev-crash") as crash:
        assert await watcher.subscribe("fg/#")
        await crash.publish(topics.telemetry("dev-crash"), b"survived")
        assert await watcher.next() == (topics.telemetry("dev-crash"), b"survived")


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
    await broker.stop()
    assert not process.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_run_dir_keeps_secrets_private(broker: MosquittoBroker) -> None:
    run_dir = broker.run_dir
    assert run_dir.stat().st_mode & 0o777 == 0o700
    for name in ("server.key", "dynsec.json"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o600
    dynsec_file = (run_dir / "dynsec.json").read_text()
    assert dynsec.DEFAULT_ADMIN_USERNAME in dynsec_file
    assert broker.internal_credentials[1] not in dynsec_file  # only its PBKDF2 hash
