"""Unknown identities on Mosquitto: each handshake the operational listener refuses reaches
``on_refused`` with its address, time and reason, read from the broker's own log (the lines
below are Mosquitto 2.0.11's, copied from a run), and a real broker reports a rogue CA's
client and a client without a certificate."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_mosquitto_broker import (  # the Mosquitto test kit: PKI, clients, broker
    CLOCK,
    CONNACK_ACCEPTED,
    MOSQUITTO,
    Pki,
    device,
    pki,
    start_broker,
)

from gateway.broker.refusals import RefusalReason, RefusedConnection, remote_host
from gateway.mosquitto import HandshakeRefused, HandshakeWatch, Listeners, MosquittoBroker
from gateway.mosquitto.handshakes import refusal_reason
from gateway.mosquitto.log_lines import logged_peer
from gateway.store import IdentityState
from pki.issue import Issuer
from pki.testing import make_issuing_ca

__all__ = ["pki"]  # a fixture, imported for the tests below

TLS_PORT = 33277

VERIFY_FAILED = "error:0A000086:SSL routines::certificate verify failed"
NO_CERTIFICATE = "error:0A0000C7:SSL routines::peer did not return a certificate"


def refused_handshake(address: str, error: str, port: int = TLS_PORT) -> list[str]:
    return [
        f"1796440174: New connection from {address} on port {port}.",
        f"1796440174: OpenSSL Error[0]: {error}",
        "1796440174: Client <unknown> disconnected: Protocol error.",
    ]


def feed(watch: HandshakeWatch, lines: list[str]) -> list[HandshakeRefused]:
    return [r for r in map(watch.feed, lines) if r is not None]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NO_CERTIFICATE, RefusalReason.NO_CLIENT_CERTIFICATE),
        ("error:0A00045C:SSL routines::tlsv13 alert certificate required",
         RefusalReason.NO_CLIENT_CERTIFICATE),
        (VERIFY_FAILED, RefusalReason.CERTIFICATE_INVALID),
        ("error:0A000418:SSL routines::tlsv1 alert unknown ca",
         RefusalReason.CLIENT_REJECTED_SERVER),
        ("error:0A000126:SSL routines::unexpected eof while reading",
         RefusalReason.CONNECTION_CLOSED),
        ("error:0A00010B:SSL routines::wrong version number", RefusalReason.TLS_HANDSHAKE_FAILED),
        # OpenSSL 1.1's form names the function too
        ("error:14094410:SSL routines:ssl3_read_bytes:sslv3 alert handshake failure",
         RefusalReason.CLIENT_REJECTED_SERVER),
        ("something else entirely", RefusalReason.TLS_HANDSHAKE_FAILED),
    ],
)  # fmt: skip
def test_openssl_errors_get_the_embedded_brokers_reason_codes(
    error: str, reason: RefusalReason
) -> None:
    assert refusal_reason(error) is reason


def test_a_refused_handshake_is_paired_with_its_connection() -> None:
    watch = HandshakeWatch([TLS_PORT])
    lines = [
        "1796440174: New connection from 127.0.0.1:36561 on port 40000.",  # internal listener
        "1796440174: New client connected from 127.0.0.1:36561 as gw (p5, c1, k30, u'_fg_gw').",
        *refused_handshake("127.0.0.3:54465", VERIFY_FAILED),
        *refused_handshake("127.0.0.4:59811", NO_CERTIFICATE),
    ]
    assert feed(watch, lines) == [
        HandshakeRefused("127.0.0.3:54465", TLS_PORT, RefusalReason.CERTIFICATE_INVALID,
                         "certificate verify failed"),
        HandshakeRefused("127.0.0.4:59811", TLS_PORT, RefusalReason.NO_CLIENT_CERTIFICATE,
                         "peer did not return a certificate"),
    ]  # fmt: skip


def test_connections_that_complete_or_leave_quietly_are_no_refusals() -> None:
    watch = HandshakeWatch([TLS_PORT])
    lines = [
        f"New connection from 127.0.0.1:1000 on port {TLS_PORT}.",
        "New client connected from 127.0.0.1:1000 as dev-a (p2, c1, k60, u'dev-a').",
        f"New connection from 127.0.0.1:1001 on port {TLS_PORT}.",
        "Client <unknown> closed its connection.",  # a TLS probe that sent no CONNECT
        # an error of a live session is no refused handshake
        "OpenSSL Error[0]: error:0A000126:SSL routines::unexpected eof while reading",
        "Client dev-a disconnected: Protocol error.",
    ]
    assert feed(watch, lines) == []
    # the table is empty: the next refusal is paired with its own connection, not a stale one
    [refused] = feed(watch, refused_handshake("127.0.0.9:2000", VERIFY_FAILED))
    assert refused.address == "127.0.0.9:2000" and refused.candidates == 1


def test_a_live_sessions_error_is_not_pinned_on_a_later_quiet_connection() -> None:
    """A device's dropped link logs an OpenSSL error before its own disconnect line; a health
    check that connects and leaves without a word afterwards refused nothing."""
    watch = HandshakeWatch([TLS_PORT])
    lines = [
        f"New connection from 10.0.0.5:1000 on port {TLS_PORT}.",
        "New client connected from 10.0.0.5:1000 as dev-a (p2, c1, k60, u'dev-a').",
        "OpenSSL Error[0]: error:0A000126:SSL routines::unexpected eof while reading",
        "Client dev-a disconnected: Protocol error.",
        f"New connection from 10.0.0.9:2000 on port {TLS_PORT}.",
        "Client <unknown> closed its connection.",
    ]
    assert feed(watch, lines) == []
    # a refused handshake's errors, one line after another, are still its own
    [refused] = feed(watch, [
        f"New connection from 10.0.0.7:3000 on port {TLS_PORT}.",
        "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed",
        "OpenSSL Error[1]: error:0A000139:SSL routines::deprecated error",
        "Client <unknown> disconnected: Protocol error.",
    ])  # fmt: skip
    assert (refused.address, refused.reason) == ("10.0.0.7:3000",
                                                 RefusalReason.CERTIFICATE_INVALID)
    assert refused.detail == "certificate verify failed; deprecated error"


def test_ipv6_peers_are_written_in_brackets_and_matched_by_host() -> None:
    """Mosquitto logs "::1:50106" (verified with 2.0.11); the refusal says "[::1]:50106", and a
    handshake refused at once, which Mosquitto names by host alone, finds its port."""
    watch = HandshakeWatch([TLS_PORT])
    [refused] = feed(watch, refused_handshake("2001:db8:::40000", VERIFY_FAILED))
    assert refused.address == "[2001:db8::]:40000"
    [refused] = feed(watch, [
        f"New connection from 2001:db8::7:4242 on port {TLS_PORT}.",
        "Client connection from 2001:db8::7 failed: "
        "error:0A00010B:SSL routines::wrong version number.",
    ])  # fmt: skip
    assert (refused.address, refused.port) == ("[2001:db8::7]:4242", TLS_PORT)
    # the same connection, completed, leaves the table under its bracketed name
    feed(watch, [
        f"New connection from ::1:5000 on port {TLS_PORT}.",
        "New client connected from ::1:5000 as dev-a (p2, c1, k60, u'dev-a').",
    ])  # fmt: skip
    [refused] = feed(watch, refused_handshake("::1:5001", VERIFY_FAILED))
    assert refused.address == "[::1]:5001" and refused.candidates == 1


@pytest.mark.parametrize(
    ("logged", "peer"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("::1:50106", "[::1]:50106"),
        ("2001:db8:::40000", "[2001:db8::]:40000"),
        ("[::1]:50106", "[::1]:50106"),  # already written so
        ("127.0.0.6", "127.0.0.6"),  # a host alone
        ("unknown", "unknown"),
    ],
)
def test_mosquittos_peers_are_written_as_the_embedded_brokers(logged: str, peer: str) -> None:
    assert logged_peer(logged) == peer


def test_overlapping_handshakes_say_the_address_is_uncertain() -> None:
    watch = HandshakeWatch([TLS_PORT])
    lines = [
        f"New connection from 127.0.0.3:1 on port {TLS_PORT}.",
        f"New connection from 127.0.0.4:2 on port {TLS_PORT}.",
        f"OpenSSL Error[0]: {VERIFY_FAILED}",
        "Client <unknown> disconnected: Protocol error.",
    ]
    [refused] = feed(watch, lines)
    assert refused.address == "127.0.0.3:1" and refused.candidates == 2


def test_a_handshake_refused_at_once_names_its_host() -> None:
    watch = HandshakeWatch([TLS_PORT])
    [refused] = feed(watch, [
        "Client connection from 127.0.0.6 failed: "
        "error:0A00010B:SSL routines::wrong version number.",
    ])  # fmt: skip
    assert refused == HandshakeRefused(
        "127.0.0.6", None, RefusalReason.TLS_HANDSHAKE_FAILED, "wrong version number"
    )
    # with its connection line first, the port is known too
    [refused] = feed(watch, [
        f"New connection from 127.0.0.7:4242 on port {TLS_PORT}.",
        "Client connection from 127.0.0.7 failed: error:0A000126:SSL routines::unexpected eof "
        "while reading.",
    ])  # fmt: skip
    assert (refused.address, refused.port) == ("127.0.0.7:4242", TLS_PORT)


def test_an_error_whose_connection_line_was_missed_is_still_a_refusal() -> None:
    watch = HandshakeWatch([TLS_PORT])
    [refused] = feed(watch, refused_handshake("127.0.0.3:1", NO_CERTIFICATE)[1:])
    assert refused.address == "unknown" and refused.port is None


def test_a_restart_forgets_handshakes_under_way_and_lines_must_be_text() -> None:
    watch = HandshakeWatch([TLS_PORT])
    watch.feed(f"New connection from 127.0.0.3:1 on port {TLS_PORT}.")
    watch.clear()
    [refused] = feed(watch, refused_handshake("127.0.0.4:2", VERIFY_FAILED))
    assert refused.address == "127.0.0.4:2" and refused.candidates == 1
    with pytest.raises(TypeError):
        watch.feed(b"New connection")  # type: ignore[arg-type]


# -- a real Mosquitto ----------------------------------------------------------------------------

async def refusals_reported(
    seen: list[RefusedConnection], count: int
) -> list[RefusedConnection]:
    deadline = time.monotonic() + 3
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only {seen} reported"
        await asyncio.sleep(0.02)
    return seen


def _first_answer(port: int, tls: ssl.SSLContext, source: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x05dev-a"
    raw = socket.create_connection(("127.0.0.1", port), 5, source_address=(source, 0))
    with raw, tls.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        conn.sendall(bytes((0x10, len(body))) + body)
        return conn.recv(4)


async def admitted(
    broker: MosquittoBroker, kit: Pki, issuer: Issuer | None, source: str
) -> bool:
    """One CONNECT as dev-a from ``source``, with a certificate of ``issuer`` (None: none)."""
    tls = kit.context(kit.credential("dev-a", issuer=issuer) if issuer else None)
    try:
        answer = await asyncio.to_thread(
            _first_answer, broker.ports["operational"], tls, source
        )
    except (ssl.SSLError, ConnectionError):
        return False
    return answer == CONNACK_ACCEPTED


@pytest.mark.broker
@pytest.mark.skipif(MOSQUITTO is None, reason="Mosquitto is not installed")
async def test_a_rogue_ca_and_a_missing_certificate_are_reported_with_address_and_reason(
    pki: Pki, tmp_path: Path
) -> None:
    seen: list[RefusedConnection] = []
    broker = await start_broker(pki, tmp_path / "run", on_refused=seen.append)
    try:
        await broker.apply("dev-a", IdentityState.ACTIVE)
        before = datetime.now(UTC)
        rogue = Issuer(make_issuing_ca(CLOCK), CLOCK)
        assert not await admitted(broker, pki, rogue, "127.0.0.3")
        assert not await admitted(broker, pki, None, "127.0.0.4")
        first, second = await refusals_reported(seen, 2)
        # "host:port", or the host alone when the handshake failed as it was accepted
        assert remote_host(first.remote) == "127.0.0.3"
        assert first.reason == RefusalReason.CERTIFICATE_INVALID
        assert remote_host(second.remote) == "127.0.0.4"
        assert second.reason == RefusalReason.NO_CLIENT_CERTIFICATE
        for refused in (first, second):
            assert refused.listener == "operational"
            assert before <= refused.at <= datetime.now(UTC)
            # what Mosquitto never logs stays empty rather than guessed
            assert refused.cert_issuer is None and refused.cert_subject is None
            assert refused.client_id is None
        # and counted, for the admin API's metrics and <home>/metrics.prom
        assert broker.metrics["refused.certificate_invalid"] == 1
        assert broker.metrics["refused.no_client_certificate"] == 1
        # a device of ours gets in and is no refusal; a revoked one is one
        async with device(broker, pki, "dev-a", bind_address="127.0.0.5"):
            pass
        await broker.apply("dev-a", IdentityState.REVOKED)
        await broker.publish_crl(pki.crl(pki.credential("dev-a")))
        assert not await admitted(broker, pki, pki.issuer, "127.0.0.6")
        *_, revoked = await refusals_reported(seen, 3)
        assert remote_host(revoked.remote) == "127.0.0.6"
        assert revoked.reason == RefusalReason.CERTIFICATE_INVALID
        assert len(seen) == 3
    finally:
        await broker.stop()


def test_an_external_broker_does_not_pretend_to_report_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refusals"):
        MosquittoBroker(
            tmp_path / "unused",
            Listeners("127.0.0.1", 1883, 1884, 1885),
            None,
            None,
            external=True,
            admin_password="operator-secret-0123",
            on_refused=lambda refused: None,
        )
