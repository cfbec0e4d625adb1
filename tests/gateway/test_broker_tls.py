"""Broker value objects and TLS helpers, without sockets: TLS material, the Certificate-message
reader, handshake error mapping, CRLs, refusals and configuration."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from hypothesis import given
from hypothesis import strategies as st

from gateway.acl import TopicAcl
from gateway.broker import (
    EmbeddedBroker,
    ListenerConfig,
    RefusalReason,
    RefusedConnection,
    TlsMaterial,
)
from gateway.broker.tls import (
    build_server_context,
    certificate_info,
    classify_handshake_error,
    parse_certificate_message,
    revoked_serials,
)
from pki.ca import CertificateAuthority
from pki.clock import FakeClock
from pki.crl import RevokedEntry, build_crl
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

CLOCK = FakeClock()
BROKEN_PEM = b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n"


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def key_pem(signer: LocalSigner, password: bytes | None = None) -> bytes:
    encryption = BestAvailableEncryption(password) if password else NoEncryption()
    return signer.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return make_issuing_ca(CLOCK)


@pytest.fixture(scope="module")
def server(ca: CertificateAuthority) -> tuple[x509.Certificate, LocalSigner]:
    signer = LocalSigner.generate()
    template = LeafTemplate(
        IdentityKind.SERVICE, "broker", "fleet.test", timedelta(days=1), server=True,
        ip_addresses=("127.0.0.1",),
    )
    return Issuer(ca, CLOCK).issue(template, signer.public_key()), signer


@pytest.fixture(scope="module")
def material(ca: CertificateAuthority, server: tuple[x509.Certificate, LocalSigner]) -> TlsMaterial:
    cert, signer = server
    return TlsMaterial(pem(cert) + pem(ca.certificate), key_pem(signer), pem(ca.certificate))


def crl_pem(ca: CertificateAuthority, *serials: int) -> bytes:
    entries = [RevokedEntry(serial=s, revoked_at=CLOCK.now()) for s in serials]
    return build_crl(ca, entries, CLOCK, timedelta(hours=1), 1).public_bytes(Encoding.PEM)


# -- TlsMaterial ------------------------------------------------------------------------------


def test_tls_material_accepts_a_matching_chain_and_key_and_hides_the_key(
    material: TlsMaterial,
) -> None:
    assert "PRIVATE KEY" not in repr(material)


def test_tls_material_refuses_a_key_of_another_certificate(
    ca: CertificateAuthority, server: tuple[x509.Certificate, LocalSigner]
) -> None:
    cert, _ = server
    with pytest.raises(ValueError, match="does not belong"):
        TlsMaterial(pem(cert), key_pem(LocalSigner.generate()), pem(ca.certificate))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("server_cert_pem", b"not pem", ValueError),
        ("server_cert_pem", b"", ValueError),
        ("server_cert_pem", "text", TypeError),
        ("client_ca_pem", BROKEN_PEM, ValueError),
        ("server_key_pem", b"garbage", ValueError),
        ("server_key_pem", "text", TypeError),
    ],
)
def test_tls_material_refuses_bad_input(
    material: TlsMaterial, field: str, value: object, error: type[Exception]
) -> None:
    values = {
        "server_cert_pem": material.server_cert_pem,
        "server_key_pem": material.server_key_pem,
        "client_ca_pem": material.client_ca_pem,
        field: value,
    }
    with pytest.raises(error):
        TlsMaterial(**values)  # type: ignore[arg-type]


def test_tls_material_refuses_an_encrypted_key_without_echoing_it(
    ca: CertificateAuthority, server: tuple[x509.Certificate, LocalSigner]
) -> None:
    cert, signer = server
    encrypted = key_pem(signer, b"secret")
    with pytest.raises(ValueError) as caught:
        TlsMaterial(pem(cert), encrypted, pem(ca.certificate))
    assert "ENCRYPTED" not in str(caught.value)


# -- server contexts --------------------------------------------------------------------------


def test_server_contexts_require_client_certificates_only_where_asked(
    material: TlsMaterial, ca: CertificateAuthority
) -> None:
    enrollment = build_server_context(material, verify_clients=False)
    assert enrollment.verify_mode == ssl.CERT_NONE
    operational = build_server_context(material, verify_clients=True)
    assert operational.verify_mode == ssl.CERT_REQUIRED
    assert not operational.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    with_crl = build_server_context(material, verify_clients=True, crl_pem=crl_pem(ca, 7))
    assert with_crl.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert with_crl.minimum_version == ssl.TLSVersion.TLSv1_2


def test_revoked_serials_reads_the_crl(ca: CertificateAuthority) -> None:
    assert revoked_serials(crl_pem(ca, 7, 11)) == {7, 11}
    assert revoked_serials(crl_pem(ca)) == frozenset()
    with pytest.raises(ValueError):
        revoked_serials(b"-----BEGIN X509 CRL-----\nAA==\n-----END X509 CRL-----\n")
    with pytest.raises(TypeError):
        revoked_serials("pem")  # type: ignore[arg-type]


# -- the client's Certificate message -----------------------------------------------------------


def _u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def certificate_message(ders: list[bytes], tls13: bool) -> bytes:
    entries = b""
    for der in ders:
        entries += _u24(len(der)) + der + (b"\x00\x00" if tls13 else b"")
    body = (b"\x00" if tls13 else b"") + _u24(len(entries)) + entries
    return b"\x0b" + _u24(len(body)) + body


@pytest.mark.parametrize("tls13", [True, False])
def test_certificate_message_yields_the_chain_leaf_first(
    ca: CertificateAuthority, server: tuple[x509.Certificate, LocalSigner], tls13: bool
) -> None:
    ders = [server[0].public_bytes(Encoding.DER), ca.certificate.public_bytes(Encoding.DER)]
    assert parse_certificate_message(certificate_message(ders, tls13), tls13) == ders
    assert parse_certificate_message(certificate_message([], tls13), tls13) == []


def test_certificate_message_truncated_gives_what_was_complete(
    server: tuple[x509.Certificate, LocalSigner],
) -> None:
    der = server[0].public_bytes(Encoding.DER)
    message = certificate_message([der, der], True)
    assert parse_certificate_message(message[:-10], True) == [der]


@given(st.binary(max_size=300), st.booleans())
def test_certificate_message_parser_never_raises(data: bytes, tls13: bool) -> None:
    for chunk in parse_certificate_message(data, tls13):
        assert chunk


def test_certificate_info_describes_a_certificate_and_tolerates_garbage(
    server: tuple[x509.Certificate, LocalSigner],
) -> None:
    cert = server[0]
    info = certificate_info(cert.public_bytes(Encoding.DER))
    assert info is not None
    assert (info.subject, info.issuer) == ("CN=broker", "CN=Test Issuing CA")
    assert info.fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert info.serial == cert.serial_number
    assert certificate_info(None) is None
    assert certificate_info(b"\x30\x03garbage") is None


# -- handshake errors -------------------------------------------------------------------------


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_code = code
    error.verify_message = message
    return error


def _ssl_error(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, reason)
    error.reason = reason
    return error


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (_verify_error(20, "unable to get local issuer certificate"), RefusalReason.UNKNOWN_CA),
        (_verify_error(18, "self-signed certificate"), RefusalReason.UNKNOWN_CA),
        (_verify_error(23, "certificate revoked"), RefusalReason.CERTIFICATE_REVOKED),
        (_verify_error(10, "certificate has expired"), RefusalReason.CERTIFICATE_EXPIRED),
        (_verify_error(9, "not yet valid"), RefusalReason.CERTIFICATE_NOT_YET_VALID),
        (_verify_error(26, "unsupported purpose"), RefusalReason.CERTIFICATE_WRONG_PURPOSE),
        (_verify_error(12, "CRL has expired"), RefusalReason.CRL_UNUSABLE),
        (_verify_error(999, "something new"), RefusalReason.CERTIFICATE_INVALID),
        (_ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), RefusalReason.NO_CLIENT_CERTIFICATE),
        (_ssl_error("TLSV1_ALERT_UNKNOWN_CA"), RefusalReason.CLIENT_REJECTED_SERVER),
        (_ssl_error("WRONG_VERSION_NUMBER"), RefusalReason.TLS_HANDSHAKE_FAILED),
        (TimeoutError(), RefusalReason.TLS_HANDSHAKE_TIMEOUT),
        (ConnectionAbortedError("SSL handshake is taking longer than 10 seconds: aborting the connection timed out"), RefusalReason.TLS_HANDSHAKE_TIMEOUT),  # noqa: E501  asyncio's own text
        (ConnectionResetError(), RefusalReason.CONNECTION_CLOSED),
    ],
)
def test_handshake_errors_map_to_reasons(exc: BaseException, reason: RefusalReason) -> None:
    got, detail = classify_handshake_error(exc)
    assert got == reason
    assert isinstance(detail, str)


# -- refusals and configuration ---------------------------------------------------------------


def test_refused_connection_validates() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    record = RefusedConnection("operational", "1.2.3.4:5", "unknown_ca", None, None, None, None, at)
    assert record.at == at and record.detail == ""
    with pytest.raises(ValueError):
        RefusedConnection("operational", "1:2", "", None, None, None, None, at)
    with pytest.raises(ValueError):
        RefusedConnection("operational", "1:2", "x", None, None, None, "nothex", at)
    with pytest.raises(ValueError):
        RefusedConnection("operational", "1:2", "x", None, None, None, None, datetime(2026, 1, 1))
    with pytest.raises(TypeError):
        RefusedConnection("operational", "1:2", "x", None, None, None, None, "now")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": ""},
        {"enrollment_port": -1},
        {"operational_port": 65536},
        {"internal_port": True},
        {"internal_port": "1883"},
    ],
)
def test_listener_config_refuses_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ListenerConfig(**kwargs)  # type: ignore[arg-type]


def _broker(material: TlsMaterial, **kwargs: object) -> EmbeddedBroker:
    values: dict[str, object] = {"internal_password": "p" * 24}
    values.update(kwargs)
    return EmbeddedBroker(ListenerConfig(), material, TopicAcl(dict().get), **values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"internal_password": "short"}, ValueError),
        ({"internal_password": None}, TypeError),
        ({"internal_username": "bad/name"}, ValueError),
        ({"handshake_timeout": 0}, ValueError),
        ({"connect_timeout": -1}, ValueError),
        ({"max_packet_bytes": True}, ValueError),
        ({"crl_pem": b"not a crl"}, ValueError),
    ],
)
def test_broker_refuses_bad_settings(
    material: TlsMaterial, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _broker(material, **kwargs)


def test_broker_refuses_wrong_collaborators(material: TlsMaterial) -> None:
    acl = TopicAcl(dict().get)
    with pytest.raises(TypeError):
        EmbeddedBroker("listeners", material, acl, internal_password="p" * 24)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        EmbeddedBroker(ListenerConfig(), b"pem", acl, internal_password="p" * 24)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        EmbeddedBroker(ListenerConfig(), material, None, internal_password="p" * 24)  # type: ignore[arg-type]
    broker = _broker(material)
    with pytest.raises(TypeError):
        broker.update_server_tls(b"pem")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        broker.update_crl(b"not a crl")


def test_ports_are_unknown_before_start(material: TlsMaterial) -> None:
    with pytest.raises(RuntimeError):
        _ = _broker(material).ports
