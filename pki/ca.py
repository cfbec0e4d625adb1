"""Certificate authorities: a root, and issuing CAs signed by it.

The gateway runs root -> issuing CA -> leaves; the factory simulator runs the same shape as
Matter's PAA -> PAI -> DAC. Both are made here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

from pki._build import authority_key_identifier, ca_key_usage, spki_der, whole_seconds
from pki.clock import Clock, require_aware
from pki.keys import Signer
from pki.serials import new_serial_number

__all__ = ["CA_BACKDATE", "CertificateAuthority", "create_issuing_ca", "create_root_ca"]

# Same allowance for clock skew as leaves get (step-ca backdates by one minute too).
CA_BACKDATE = timedelta(seconds=60)
_MIN_CA_LIFETIME = timedelta(hours=1)
_MAX_NAME = 64  # X.520 upper bound for commonName and organizationName


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with the signer for its key and the certificates above it.

    ``chain`` is nearest first, root last, and empty for a root.
    """

    certificate: x509.Certificate
    signer: Signer
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.certificate, x509.Certificate):
            raise TypeError("certificate must be an x509.Certificate")
        if not isinstance(self.signer, Signer):
            raise TypeError(f"signer must be a Signer, not {type(self.signer).__name__}")
        chain = tuple(self.chain)
        if not all(isinstance(c, x509.Certificate) for c in chain):
            raise TypeError("chain must hold x509.Certificate objects")
        object.__setattr__(self, "chain", chain)
        try:
            constraints = self.certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            raise ValueError("certificate has no BasicConstraints: not a CA") from None
        if not constraints.ca:
            raise ValueError("certificate is not a CA (BasicConstraints CA:FALSE)")
        if spki_der(self.signer.public_key()) != spki_der(self.certificate.public_key()):
            raise ValueError("signer's key does not match the CA certificate's key")

    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1] if self.chain else self.certificate

    @property
    def is_root(self) -> bool:
        return not self.chain


def _ca_name(common_name: str, organization: str | None) -> x509.Name:
    for label, value in (("common_name", common_name), ("organization", organization)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f"{label} must be a str, not {type(value).__name__}")
        if not value.strip() or len(value) > _MAX_NAME or not value.isprintable():
            raise ValueError(f"{label} must be 1 to {_MAX_NAME} printable characters")
    attributes = []
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _check_lifetime(lifetime: object) -> timedelta:
    if not isinstance(lifetime, timedelta):
        raise TypeError(f"lifetime must be a timedelta, not {type(lifetime).__name__}")
    if lifetime < _MIN_CA_LIFETIME:
        raise ValueError(f"a CA lifetime must be at least {_MIN_CA_LIFETIME}")
    return lifetime


def _ca_builder(
    subject: x509.Name, signer: Signer, serial: int, path_length: int | None
) -> x509.CertificateBuilder:
    if path_length is not None and (not isinstance(path_length, int) or path_length < 0):
        raise ValueError("path_length must be None or a non-negative int")
    public_key = signer.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def create_root_ca(
    signer: Signer,
    common_name: str,
    clock: Clock,
    lifetime: timedelta = timedelta(days=3650),
    *,
    random_bits: Callable[[int], int] = secrets.randbits,
    organization: str | None = None,
    path_length: int | None = 1,
) -> CertificateAuthority:
    """A self-signed root. ``path_length`` 1 allows exactly one layer of issuing CAs below it."""
    subject = _ca_name(common_name, organization)
    lifetime = _check_lifetime(lifetime)
    now = whole_seconds(require_aware(clock.now(), "clock.now()"))
    ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
    builder = (
        _ca_builder(subject, signer, new_serial_number(random_bits), path_length)
        .issuer_name(subject)
        .not_valid_before(now - CA_BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return CertificateAuthority(signer.sign_certificate(builder), signer, ())


def create_issuing_ca(
    parent: CertificateAuthority,
    signer: Signer,
    common_name: str,
    clock: Clock,
    lifetime: timedelta = timedelta(days=180),
    *,
    random_bits: Callable[[int], int] = secrets.randbits,
    organization: str | None = None,
) -> CertificateAuthority:
    """An issuing CA under ``parent``: path length 0 (it signs leaves only), validity kept
    inside the parent's so the chain never outlives its top."""
    if not isinstance(parent, CertificateAuthority):
        raise TypeError("parent must be a CertificateAuthority")
    subject = _ca_name(common_name, organization)
    lifetime = _check_lifetime(lifetime)
    now = whole_seconds(require_aware(clock.now(), "clock.now()"))
    parent_cert = parent.certificate
    not_before = max(now - CA_BACKDATE, parent_cert.not_valid_before_utc)
    not_after = min(now + lifetime, parent_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"parent CA {parent_cert.subject.rfc4514_string()} has expired")
    builder = (
        _ca_builder(subject, signer, new_serial_number(random_bits), 0)
        .issuer_name(parent_cert.subject)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(authority_key_identifier(parent_cert), critical=False)
    )
    certificate = parent.signer.sign_certificate(builder)
    return CertificateAuthority(certificate, signer, (parent_cert, *parent.chain))

