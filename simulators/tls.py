"""TLS contexts for simulated devices, with keys that never touch the disk."""

from __future__ import annotations

import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pki.keys import LocalSigner


def server_auth_context(ca_pem: bytes) -> ssl.SSLContext:
    """Enrollment listener: verify the gateway's broker against its root; no client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def mutual_context(
    ca_pem: bytes,
    signer: LocalSigner,
    certificate: x509.Certificate,
    chain: tuple[x509.Certificate, ...] = (),
) -> ssl.SSLContext:
    """Operational listener: present the issued certificate, verify the broker."""
    ctx = server_auth_context(ca_pem)
    key_pem = signer.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    cert_pem = b"".join(c.public_bytes(Encoding.PEM) for c in (certificate, *chain))
    # ssl can only load a certificate chain from a path; an anonymous memory file gives it one
    # without writing the private key to disk (Linux memfd).
    fd = os.memfd_create("device-credential")
    try:
        os.write(fd, cert_pem + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx
