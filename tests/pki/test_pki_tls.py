"""A real mutual-TLS handshake over loopback with certificates from our CA (trustme style)."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.ca import CertificateAuthority
from pki.clock import FakeClock
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

TRUST_DOMAIN = "fleet.example"


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _write_identity(
    directory: Path, name: str, cert: x509.Certificate, chain: tuple[x509.Certificate, ...],
    signer: LocalSigner,
) -> tuple[Path, Path]:  # fmt: skip
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(_pem(cert, *chain[:-1]))  # leaf + issuing CA; the root stays out
    key_path.write_bytes(
        signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Server:
    """One-connection TLS server on 127.0.0.1 in a thread; records what it saw."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(10)
        self.port = self._listener.getsockname()[1]
        self._context = context
        self.peer: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            raw, _ = self._listener.accept()
            raw.settimeout(10)
            with self._context.wrap_socket(raw, server_side=True) as tls:
                self.peer = tls.getpeercert()
                tls.sendall(b"hello " + tls.version().encode())  # type: ignore[union-attr]
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
        finally:
            self._listener.close()

    def join(self) -> None:
        self._thread.join(timeout=10)


def _contexts(
    tmp_path: Path, root: x509.Certificate, issuer: Issuer, client_issuer: Issuer, key_type: KeyType
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server_signer, client_signer = LocalSigner.generate(key_type), LocalSigner.generate(key_type)
    server_template = LeafTemplate(
        IdentityKind.SERVICE,
        "broker",
        TRUST_DOMAIN,
        timedelta(hours=1),
        server=True,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )
    client_template = LeafTemplate(
        IdentityKind.DEVICE, "sensor-1", TRUST_DOMAIN, timedelta(hours=1)
    )
    server_cert = issuer.issue(server_template, server_signer.public_key())
    client_cert = client_issuer.issue(client_template, client_signer.public_key())

    server_files = _write_identity(tmp_path, "server", server_cert, issuer.chain, server_signer)
    client_files = _write_identity(
        tmp_path, "client", client_cert, client_issuer.chain, client_signer
    )
    root_pem = _pem(root).decode()

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*server_files)
    server_context.verify_mode = ssl.CERT_REQUIRED
    server_context.load_verify_locations(cadata=root_pem)

    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks hostname (here: the IP)
    client_context.load_cert_chain(*client_files)
    client_context.load_verify_locations(cadata=root_pem)
    return server_context, client_context


def _wall_clock_ca(key_type: KeyType) -> tuple[CertificateAuthority, Issuer]:
    # TLS checks validity against the wall clock, so the fake clock starts at the real now.
    clock = FakeClock(datetime.now(UTC))
    ca = make_issuing_ca(clock, key_type)
    return ca, Issuer(ca, clock)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_mutual_tls_handshake_with_our_certificates(tmp_path: Path, key_type: KeyType) -> None:
    ca, issuer = _wall_clock_ca(key_type)
    server_context, client_context = _contexts(tmp_path, ca.root, issuer, issuer, key_type)
    server = _Server(server_context)
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        greeting = tls.recv(64)
        server_seen_by_client = tls.getpeercert()
    server.join()

    assert server.error is None, server.error
    assert greeting.startswith(b"hello TLSv1.")
    assert server.peer is not None
    assert ("URI", "spiffe://fleet.example/device/sensor-1") in server.peer["subjectAltName"]
    assert server_seen_by_client is not None
    assert ("IP Address", "127.0.0.1") in server_seen_by_client["subjectAltName"]


def test_client_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca, issuer = _wall_clock_ca(KeyType.P256)
    _, stranger_issuer = _wall_clock_ca(KeyType.P256)
    server_context, client_context = _contexts(
        tmp_path, ca.root, issuer, stranger_issuer, KeyType.P256
    )
    server = _Server(server_context)
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.recv(64)  # TLS 1.3 reports a refused client certificate on first read
    server.join()
    assert isinstance(server.error, ssl.SSLError)
    assert server.peer is None
