"""TLS for the broker's listeners: server contexts, client-certificate verification with a CRL,
and seeing the certificate of a client we refuse.

Why the refused client's certificate is visible: OpenSSL verifies the client chain inside the
handshake and, on failure, throws the certificate away; Python's ``ssl`` offers no verify
callback to keep it. What Python does offer is the TLS message callback
(``SSLContext._msg_callback``, in CPython since 3.8, used by its own test suite): it is handed
every handshake message *after decryption* and *before* OpenSSL processes it, so the client's
Certificate message (encrypted on the wire in TLS 1.3) can be read there. The callback runs
inside the transport, not in the task that owns the connection, so ``CapturingContext.wrap_bio``
ties each ``SSLObject`` to the connection's ``PeerCapture`` through a context variable that the
connection's task sets right before ``start_tls`` (``wrap_bio`` runs synchronously inside it).
If a future Python drops the hook, refusals are still reported, only without certificate
details.

Verification itself stays with OpenSSL (CERT_REQUIRED, VERIFY_CRL_CHECK_LEAF when a CRL is
loaded); nothing here accepts a certificate OpenSSL rejected.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import contextvars
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.broker.refusals import RefusalReason

__all__ = [
    "TLS_READ_BUFFER_BYTES",
    "CapturingContext",
    "CertificateInfo",
    "PeerCapture",
    "TlsMaterial",
    "build_server_context",
    "capturing_peer",
    "certificate_info",
    "classify_handshake_error",
    "compact_read_buffer",
    "renewal_due",
    "revoked_serials",
]

_TLS_1_3 = 0x0304
_HANDSHAKE = 22
_CERTIFICATE = 11


def _pem_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    if not isinstance(data, bytes):
        raise TypeError(f"{what} must be bytes, not {type(data).__name__}")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"{what} is not PEM certificates: {exc}") from None
    if not certs:
        raise ValueError(f"{what} holds no certificate")
    return certs


def _public_der(key: Any) -> bytes:
    result: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return result


@dataclass(frozen=True)
class TlsMaterial:
    """The broker's server certificate chain (leaf first) and key, and the CA certificates
    (issuing CA and root) that client certificates must chain to on the operational listener."""

    server_cert_pem: bytes
    server_key_pem: bytes = field(repr=False)
    client_ca_pem: bytes

    def __post_init__(self) -> None:
        leaf = _pem_certificates(self.server_cert_pem, "server_cert_pem")[0]
        _pem_certificates(self.client_ca_pem, "client_ca_pem")
        if not isinstance(self.server_key_pem, bytes):
            raise TypeError("server_key_pem must be bytes")
        try:
            key = serialization.load_pem_private_key(self.server_key_pem, password=None)
        except (ValueError, TypeError):
            # never echo the key material itself
            raise ValueError("server_key_pem is not an unencrypted PEM private key") from None
        if not isinstance(
            key,
            ec.EllipticCurvePrivateKey
            | rsa.RSAPrivateKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        ):
            raise ValueError(f"unsupported server key type {type(key).__name__}")
        if _public_der(key.public_key()) != _public_der(leaf.public_key()):
            raise ValueError("server_key_pem does not belong to the first certificate")


def renewal_due(server_cert_pem: bytes | None, now: datetime, margin: timedelta) -> bool:
    """Whether the broker should serve a new server certificate: the one it serves
    (``server_cert_pem``, a PEM chain, leaf first) has ``margin`` or less left at ``now``.
    None or a chain that does not parse is due too: better a fresh certificate than none.

    Every device verifies this certificate, so one that lapses locks the whole fleet out;
    renewing at half its lifetime leaves the other half for a renewal that failed to be
    tried again."""
    if server_cert_pem is None:
        return True
    try:
        leaf = _pem_certificates(server_cert_pem, "server_cert_pem")[0]
    except (TypeError, ValueError):
        return True
    return leaf.not_valid_after_utc - now <= margin


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can read ``data`` from. Key material goes into an anonymous in-memory
    file on Linux; elsewhere into a private temporary file removed at once."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("fleetgate-tls", 0)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="fleetgate-tls-")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class PeerCapture:
    """What the client sent in its Certificate message (DER, leaf first), for one handshake."""

    __slots__ = ("chain", "presented")

    def __init__(self) -> None:
        self.chain: list[bytes] = []
        self.presented = False

    @property
    def leaf(self) -> bytes | None:
        return self.chain[0] if self.chain else None


_CURRENT_CAPTURE: contextvars.ContextVar[PeerCapture | None] = contextvars.ContextVar(
    "fleetgate_peer_capture", default=None
)
_CAPTURE_ATTR = "_fleetgate_peer_capture"


@contextlib.contextmanager
def capturing_peer() -> Iterator[PeerCapture]:
    """Around ``start_tls``: the handshake started inside records the client's certificate."""
    capture = PeerCapture()
    token = _CURRENT_CAPTURE.set(capture)
    try:
        yield capture
    finally:
        _CURRENT_CAPTURE.reset(token)


def _u24(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 3], "big")


def parse_certificate_message(message: bytes, tls13: bool) -> list[bytes]:
    """The DER certificates in a TLS Certificate handshake message (RFC 8446 4.4.2 / RFC 5246
    7.4.2), header included. Malformed input gives what could be read, never an exception."""
    chain: list[bytes] = []
    at = 4  # msg_type (1) + length (3)
    if tls13:
        if len(message) <= at:
            return chain
        at += 1 + message[at]  # certificate_request_context
    if len(message) < at + 3:
        return chain
    end = min(len(message), at + 3 + _u24(message, at))
    at += 3
    while at + 3 <= end:
        size = _u24(message, at)
        at += 3
        if size == 0 or at + size > end:
            break
        chain.append(bytes(message[at : at + size]))
        at += size
        if tls13:  # per-certificate extensions
            if at + 2 > end:
                break
            at += 2 + int.from_bytes(message[at : at + 2], "big")
    return chain


def _record_client_certificate(
    conn: object,
    direction: str,
    version: object,
    content_type: object,
    msg_type: object,
    data: bytes,
) -> None:
    # Called for every TLS record of every connection on the context: return fast.
    if direction != "read" or content_type != _HANDSHAKE or msg_type != _CERTIFICATE:
        return
    capture = getattr(conn, _CAPTURE_ATTR, None)
    if capture is None:
        return
    capture.presented = True
    capture.chain = parse_certificate_message(data, version == _TLS_1_3)


class CapturingContext(ssl.SSLContext):
    """An SSLContext whose connections record the client's Certificate message."""

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        sslobj = super().wrap_bio(*args, **kwargs)
        capture = _CURRENT_CAPTURE.get()
        if capture is not None:
            setattr(sslobj, _CAPTURE_ATTR, capture)
        return sslobj


def build_server_context(
    tls: TlsMaterial, *, verify_clients: bool, crl_pem: bytes | None = None
) -> ssl.SSLContext:
    """A server context; with ``verify_clients`` a client certificate chaining to
    ``tls.client_ca_pem`` is required, and checked against ``crl_pem`` when given."""
    ctx = CapturingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with (
        _memory_file(tls.server_cert_pem) as cert_path,
        _memory_file(tls.server_key_pem) as key_path,
    ):
        ctx.load_cert_chain(cert_path, key_path)
    if not verify_clients:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.verify_mode = ssl.CERT_REQUIRED
    if crl_pem is not None:
        # cadata= takes certificates only; a CRL must come through a file.
        with _memory_file(tls.client_ca_pem + b"\n" + crl_pem) as trust_path:
            ctx.load_verify_locations(cafile=trust_path)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.load_verify_locations(cadata=tls.client_ca_pem.decode("ascii"))
    # The hook is private API (see module docstring); without it refusals lose the cert details.
    with contextlib.suppress(AttributeError, TypeError):
        ctx._msg_callback = _record_client_certificate  # type: ignore[attr-defined]
    return ctx


# asyncio gives every TLS connection a 256 KiB receive buffer (``SSLProtocol.max_size``), written
# to zero when the connection is made, so all of it is resident for as long as the connection
# lives: measured with 1,000 device sessions, 358 kB per device at 256 KiB, 134 kB at 32 KiB,
# 105 kB at 4 KiB. It only bounds how many ciphertext bytes one socket read takes (and how
# many plaintext bytes one SSLObject.read returns): a TLS record of up to 16 KiB arrives over a
# few reads instead of one, and nothing is lost or reordered. MQTT packets here are small.
TLS_READ_BUFFER_BYTES = 4 * 1024


def compact_read_buffer(
    writer: asyncio.StreamWriter, size: int = TLS_READ_BUFFER_BYTES
) -> bool:
    """Give this connection's TLS layer a ``size``-byte receive buffer instead of asyncio's
    256 KiB. Call right after ``start_tls`` has returned (handshake done, no read running).

    Per connection, not process-wide: asyncio has no parameter for it, and its class
    attribute would change every asyncio TLS connection of the process (database drivers,
    HTTP clients), not only the broker's. The cost is private names of
    ``asyncio.sslproto.SSLProtocol`` (CPython 3.11's rewrite of it has them); without them this
    returns False and the connection keeps asyncio's buffer, nothing worse."""
    protocol = getattr(writer.transport, "_ssl_protocol", None)
    if not isinstance(protocol, asyncio.sslproto.SSLProtocol):
        return False
    if not hasattr(protocol, "_ssl_buffer") or not hasattr(protocol, "_ssl_buffer_view"):
        return False
    # get_buffer() hands the transport min(max_size, buffer length) bytes per read; an
    # instance attribute keeps the class (every other connection) as it is
    protocol.max_size = size  # type: ignore[misc]  # on purpose: this instance only
    buffer = bytearray(size)
    protocol._ssl_buffer = buffer
    protocol._ssl_buffer_view = memoryview(buffer)
    return True


def revoked_serials(crl_pem: bytes) -> frozenset[int]:
    """Serials on the CRL. Also checked after the handshake, because a resumed TLS session
    skips certificate verification (and with it the CRL)."""
    if not isinstance(crl_pem, bytes):
        raise TypeError(f"crl_pem must be bytes, not {type(crl_pem).__name__}")
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as exc:
        raise ValueError(f"crl_pem is not a PEM CRL: {exc}") from None
    return frozenset(entry.serial_number for entry in crl)


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    issuer: str
    fingerprint: str
    serial: int
    certificate: x509.Certificate = field(repr=False, compare=False)


def certificate_info(der: bytes | None) -> CertificateInfo | None:
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
        return CertificateInfo(
            subject=cert.subject.rfc4514_string(),
            issuer=cert.issuer.rfc4514_string(),
            fingerprint=hashlib.sha256(der).hexdigest(),
            serial=cert.serial_number,
            certificate=cert,
        )
    except ValueError:
        return None


# OpenSSL X509_V_ERR_* codes (x509_vfy.h) as they appear in SSLCertVerificationError.verify_code.
_VERIFY_REASONS: dict[int, RefusalReason] = {
    2: RefusalReason.UNKNOWN_CA,  # unable to get issuer certificate
    3: RefusalReason.CRL_UNUSABLE,  # unable to get certificate CRL
    9: RefusalReason.CERTIFICATE_NOT_YET_VALID,
    10: RefusalReason.CERTIFICATE_EXPIRED,
    11: RefusalReason.CRL_UNUSABLE,  # CRL not yet valid
    12: RefusalReason.CRL_UNUSABLE,  # CRL has expired
    18: RefusalReason.UNKNOWN_CA,  # self-signed certificate
    19: RefusalReason.UNKNOWN_CA,  # self-signed certificate in chain
    20: RefusalReason.UNKNOWN_CA,  # unable to get local issuer certificate
    21: RefusalReason.UNKNOWN_CA,  # unable to verify the first certificate
    23: RefusalReason.CERTIFICATE_REVOKED,
    26: RefusalReason.CERTIFICATE_WRONG_PURPOSE,
}


def classify_handshake_error(exc: BaseException) -> tuple[RefusalReason, str]:
    """Map a failed server-side handshake to a reason code and a short detail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = _VERIFY_REASONS.get(exc.verify_code or -1, RefusalReason.CERTIFICATE_INVALID)
        return reason, str(exc.verify_message or exc.reason or exc)
    if isinstance(exc, ssl.SSLError):
        code = str(exc.reason or "")
        if code in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED"):
            return RefusalReason.NO_CLIENT_CERTIFICATE, code.lower()
        if code.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return RefusalReason.CLIENT_REJECTED_SERVER, code.lower()
        return RefusalReason.TLS_HANDSHAKE_FAILED, code.lower() or str(exc)
    if isinstance(exc, TimeoutError):
        return RefusalReason.TLS_HANDSHAKE_TIMEOUT, "no handshake in time"
    if isinstance(exc, ConnectionAbortedError) and "timed out" in str(exc):
        # asyncio reports its own handshake timeout this way
        return RefusalReason.TLS_HANDSHAKE_TIMEOUT, str(exc)
    return RefusalReason.CONNECTION_CLOSED, type(exc).__name__
