"""TLS contexts for simulated devices, with keys that never touch the disk."""

from __future__ import annotations

import functools
import os
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from pki.keys import LocalSigner

# Request/reply over MQTT waits 40-90 ms on delayed ACKs with Nagle on (measured): every
# simulated connection turns it off, as a well-configured device would.
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def server_auth_context(ca_pem: bytes) -> ssl.SSLContext:
    """Enrollment listener: verify the gateway's broker against its root; no client cert."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@functools.lru_cache(maxsize=8)
def shared_server_auth_context(ca_pem: bytes) -> ssl.SSLContext:
    """One enrollment context per CA for a whole simulated fleet: building one costs ~0.35 ms
    of CPU, which thousands of simulated devices on the gateway's machine would take from it.
    Never modify the returned context."""
    return server_auth_context(ca_pem)


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
