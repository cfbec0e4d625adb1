"""Pieces shared by every certificate Fleetgate builds (CAs, leaves, birth certificates)."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


def spki_der(key: CertificatePublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER: the one comparison of public keys that works for every type."""
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def whole_seconds(when: datetime) -> datetime:
    """X.509 times have one-second resolution; truncating first keeps the builder's values and
    the signed certificate's equal, so validation can compare them exactly."""
    return when.replace(microsecond=0)


def ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def leaf_key_usage(*, key_encipherment: bool = False) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for RSA keys (TLS 1.2 RSA key exchange encrypts
    with the leaf key)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    """The certificate's own SKI, or the RFC 5280 method-1 value when it has none."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        subject_key_identifier(issuer)
    )
