"""The broker's own server certificate while a gateway runs.

Every device verifies the certificate the enrollment and operational listeners present (it pins
the gateway root and checks the dates), and that certificate lives a week: a gateway up longer
must serve a new one. Its hourly job does once half the lifetime is left; the devices
connecting afterwards get the new certificate, on both listeners, and a session that was up
keeps going on the handshake it made.

Here the certificate lives a minute (the shortest a leaf may) and the gateway's clock is moved
past half of it, so the renewal comes in seconds; the devices check it against the real time
with a real TLS stack on loopback.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from gateway_support import device_context, home_on_free_ports, mosquitto_missing

from gateway import service
from gateway.broker.tls import TlsMaterial, renewal_due
from gateway.config import load_settings
from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
)
from gateway.service import Gateway
from gateway.store import IdentityRecord, IdentityState
from gateway.store_memory import MemoryStore
from pki.clock import FakeClock
from pki.profile import MIN_LEAF_LIFETIME, IdentityKind
from simulators.tls import server_auth_context

_MISSING = mosquitto_missing()
BROKERS = [
    "embedded",
    pytest.param(
        "mosquitto",
        marks=pytest.mark.skipif(
            _MISSING is not None, reason=f"Mosquitto is not installed ({_MISSING})"
        ),
    ),
]

LIFETIME = MIN_LEAF_LIFETIME
CHECK_SECONDS = 0.1  # the job's period here (an hour in a real gateway)
WITHIN = 10.0  # the longest the renewal or one MQTT answer may take
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"
DISCONNECT = b"\xe0\x00"
LONG, PROBE, ENROLLEE = "th-long", "th-probe", "th-new"


def connect_packet(client_id: str) -> bytes:
    """MQTT 3.1.1 CONNECT, clean session, keep-alive 60 s."""
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
    return bytes((0x10, len(body))) + body


@dataclass
class Session:
    """One device's MQTT connection over TLS, opened by hand to see its handshake."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext, client_id: str) -> Session:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls, server_hostname="127.0.0.1"
        )
        session = cls(reader, writer)
        writer.write(connect_packet(client_id))
        await writer.drain()
        assert await session.read(4) == CONNACK_ACCEPTED
        return session

    async def read(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), WITHIN)

    @property
    def served(self) -> x509.Certificate:
        """The server certificate this connection's handshake verified."""
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)

    async def ping(self) -> bytes:
        self.writer.write(PINGREQ)
        await self.writer.drain()
        return await self.read(2)

    async def close(self) -> None:
        self.writer.write(DISCONNECT)
        self.writer.close()
        await asyncio.wait_for(self.writer.wait_closed(), WITHIN)


async def served_on(port: int, tls: ssl.SSLContext, client_id: str) -> x509.Certificate:
    """The certificate a device connecting now is given (after a verified handshake and an
    accepted CONNECT)."""
    session = await Session.open(port, tls, client_id)
    try:
        return session.served
    finally:
        await session.close()


@dataclass
class Running:
    gateway: Gateway
    clock: FakeClock

    @property
    def renewals(self) -> int:
        return self.gateway.metrics["broker_tls.renewed"]


@pytest.fixture(params=BROKERS)
async def running(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Running]:
    monkeypatch.setattr(service, "BROKER_TLS_CHECK_SECONDS", CHECK_SECONDS)
    # the devices' time to start with; it moves only when a test moves it
    clock = FakeClock(datetime.now(UTC))
    store = MemoryStore()
    now = clock.now()
    for name in (LONG, PROBE):
        store.put_identity(
            IdentityRecord(name, IdentityKind.DEVICE, IdentityState.ACTIVE, now, now)
        )
    gateway = Gateway(
        load_settings(home_on_free_ports(tmp_path)),
        clock=clock,
        store=store,
        broker_kind=request.param,
        broker_cert_lifetime=LIFETIME,
    )
    try:
        await gateway.start()
        yield Running(gateway, clock)
    finally:
        await gateway.stop()


async def wait_for_renewals(running: Running, count: int) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + WITHIN
    while running.renewals < count:
        assert loop.time() < end, f"{running.renewals} renewals after {WITHIN} s"
        await asyncio.sleep(CHECK_SECONDS)


@pytest.mark.broker
async def test_the_job_serves_a_new_certificate_and_live_sessions_stay(running: Running) -> None:
    gateway = running.gateway
    ports = gateway.ports
    enrollee_tls = server_auth_context(gateway.ca_chain_pem())
    probe_tls = device_context(gateway, PROBE)
    first = await served_on(ports.operational, probe_tls, PROBE)
    assert (await served_on(ports.enrollment, enrollee_tls, ENROLLEE)) == first
    live = await Session.open(ports.operational, device_context(gateway, LONG), LONG)
    try:
        await asyncio.sleep(CHECK_SECONDS * 5)
        assert running.renewals == 0  # a fresh certificate stays

        # past half its life (a week in a real gateway, a minute here)
        running.clock.advance(LIFETIME / 2 + timedelta(seconds=10))
        await wait_for_renewals(running, 1)

        # devices connecting now verify a new certificate against the root they pin
        renewed = await served_on(ports.operational, probe_tls, PROBE)
        assert renewed.serial_number != first.serial_number
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert (await served_on(ports.enrollment, enrollee_tls, ENROLLEE)) == renewed

        # the session that was up stays up, on the handshake it made
        assert live.served == first
        assert await live.ping() == PINGRESP
        assert gateway.broker is not None and LONG in gateway.broker.connected()

        # renewed once: the new certificate has more than half its life ahead
        await asyncio.sleep(CHECK_SECONDS * 5)
        assert running.renewals == 1
    finally:
        await live.close()


# -- the parts -----------------------------------------------------------------------------


def _chain(gateway: Gateway) -> bytes:
    return gateway.broker_tls().server_cert_pem


def test_a_certificate_is_due_once_half_its_life_or_less_is_left(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC))
    gateway = Gateway(load_settings(home_on_free_ports(tmp_path)), clock=clock, store=MemoryStore())
    chain = _chain(gateway)
    half = gateway.broker_cert_lifetime / 2
    end = x509.load_pem_x509_certificates(chain)[0].not_valid_after_utc
    assert not renewal_due(chain, clock.now(), half)
    assert not renewal_due(chain, end - half - timedelta(seconds=1), half)
    assert renewal_due(chain, end - half, half)
    assert renewal_due(chain, end + timedelta(days=1), half)
    # nothing served, or nothing readable: a new one is better than none
    assert renewal_due(None, clock.now(), half)
    assert renewal_due(b"-----BEGIN CERTIFICATE-----\nnope\n", clock.now(), half)


@pytest.mark.parametrize(
    ("lifetime", "error"),
    [(timedelta(seconds=59), ValueError), (60, TypeError)],
)
def test_a_broker_certificate_lifetime_a_leaf_cannot_have_is_refused(
    tmp_path: Path, lifetime: object, error: type[Exception]
) -> None:
    settings = load_settings(home_on_free_ports(tmp_path))
    with pytest.raises(error):
        Gateway(settings, store=MemoryStore(), broker_cert_lifetime=lifetime)  # type: ignore[arg-type]


class RecordingBroker:
    def __init__(self) -> None:
        self.served: list[TlsMaterial] = []

    async def renew_server_certificate(self, tls: TlsMaterial) -> None:
        self.served.append(tls)


async def test_a_cluster_gateway_leaves_the_shared_broker_to_its_keeper(tmp_path: Path) -> None:
    settings = load_settings(home_on_free_ports(tmp_path))
    alone = Gateway(settings, store=MemoryStore(), broker_kind="mosquitto")
    member = Gateway(settings, store=MemoryStore(), broker_kind="mosquitto")
    member.cluster = object()  # type: ignore[assignment]  # the job only asks whether there is one
    for gateway in (alone, member):
        gateway.broker = RecordingBroker()  # type: ignore[assignment]
        await gateway._renew_broker_tls()  # what the hourly job runs; nothing served yet
    assert len(alone.broker.served) == 1  # type: ignore[union-attr]
    assert member.broker.served == []  # type: ignore[union-attr]


async def test_an_external_mosquittos_certificate_is_its_owners(tmp_path: Path) -> None:
    gateway = Gateway(load_settings(home_on_free_ports(tmp_path)), store=MemoryStore())
    external = MosquittoBroker(
        tmp_path / "unused",
        Listeners(enrollment_port=1883, operational_port=1884, internal_port=1885),
        None,
        None,
        external=True,
        admin_password="x" * 24,
    )
    with pytest.raises(ValueError, match="owner"):
        await external.renew_server_certificate(gateway.broker_tls())
    assert not (tmp_path / "unused").exists()


async def test_a_mosquitto_not_running_refuses_a_renewal(tmp_path: Path) -> None:
    gateway = Gateway(load_settings(home_on_free_ports(tmp_path)), store=MemoryStore())
    broker = MosquittoBroker(
        tmp_path / "mosquitto", Listeners(), gateway.broker_tls(), gateway.crl_pem()
    )
    with pytest.raises(MosquittoError) as caught:
        await broker.renew_server_certificate(gateway.broker_tls())
    assert caught.value.reason == "broker_not_running"
    with pytest.raises(TypeError):
        await broker.renew_server_certificate(object())  # type: ignore[arg-type]
