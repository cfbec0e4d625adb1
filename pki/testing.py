"""Test helpers that ship with the package (as trustme ships an in-memory CA): certificate
assertions and a ready-made CA, usable from any test folder as ``pki.testing``.

The assertions raise ``AssertionError`` explicitly, so they still work under ``python -O``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from types import EllipsisType

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import Clock
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, spiffe_id
from pki.serials import SERIAL_BITS

__all__ = ["assert_is_ca", "assert_is_leaf", "assert_profile", "make_issuing_ca"]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _extension(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> x509.Extension[x509.ExtensionType]:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        raise AssertionError(f"{cert.subject.rfc4514_string()}: no {oid._name} extension") from None


def assert_is_ca(cert: x509.Certificate, *, path_length: int | EllipsisType | None = ...) -> None:
    """A CA certificate: BasicConstraints CA:TRUE (critical, with ``path_length`` unless it is
    ``...``), keyCertSign and cRLSign (critical), a subject key identifier, no EKU."""
    constraints = _extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    value = constraints.value
    assert isinstance(value, x509.BasicConstraints)
    _check(constraints.critical, "BasicConstraints must be critical")
    _check(value.ca, "BasicConstraints CA must be TRUE")
    if path_length is not ...:
        _check(value.path_length == path_length, f"path length {value.path_length}")
    usage = _extension(cert, ExtensionOID.KEY_USAGE)
    assert isinstance(usage.value, x509.KeyUsage)
    _check(usage.critical, "KeyUsage must be critical")
    _check(usage.value.key_cert_sign and usage.value.crl_sign, "CA needs keyCertSign and cRLSign")
    _extension(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    _check(
        ExtensionOID.EXTENDED_KEY_USAGE not in {e.oid for e in cert.extensions},
        "a CA certificate must not restrict itself with an EKU",
    )


def assert_is_leaf(
    cert: x509.Certificate,
    *,
    kind: IdentityKind,
    name: str,
    trust_domain: str,
    server: bool = False,
    dns_names: tuple[str, ...] | EllipsisType = ...,
    ip_addresses: tuple[str, ...] | EllipsisType = ...,
) -> None:
    """A Fleetgate leaf for exactly this identity: subject CN=name and nothing else, one
    SPIFFE URI SAN, CA:FALSE, digitalSignature without keyCertSign/cRLSign, one EKU
    (serverAuth if ``server`` else clientAuth), DNS/IP SANs only on server certificates."""
    expected_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    _check(cert.subject == expected_subject, f"subject {cert.subject.rfc4514_string()}")
    constraints = _extension(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert isinstance(constraints.value, x509.BasicConstraints)
    _check(constraints.critical and not constraints.value.ca, "leaf must be CA:FALSE, critical")
    usage = _extension(cert, ExtensionOID.KEY_USAGE)
    assert isinstance(usage.value, x509.KeyUsage)
    _check(usage.critical and usage.value.digital_signature, "leaf needs digitalSignature")
    _check(
        not usage.value.key_cert_sign and not usage.value.crl_sign,
        "leaf must not sign certificates or CRLs",
    )
    eku = _extension(cert, ExtensionOID.EXTENDED_KEY_USAGE).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    _check(list(eku) == [wanted], f"EKU {[u._name for u in eku]} != [{wanted._name}]")
    san = _extension(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert isinstance(san, x509.SubjectAlternativeName)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    _check(uris == [spiffe_id(trust_domain, kind, name)], f"URI SANs {uris}")
    dns = tuple(san.get_values_for_type(x509.DNSName))
    ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    _check(len(san) == 1 + len(dns) + len(ips), "SAN holds names other than URI, DNS and IP")
    if not server:
        _check(not dns and not ips, "client certificates carry no DNS or IP SANs")
    if dns_names is not ...:
        _check(dns == tuple(dns_names), f"DNS SANs {dns} != {dns_names}")
    if ip_addresses is not ...:
        _check(ips == tuple(ip_addresses), f"IP SANs {ips} != {ip_addresses}")


def assert_profile(
    cert: x509.Certificate,
    *,
    issuer: x509.Certificate | None = None,
    now: datetime | None = None,
) -> None:
    """What every certificate we make shares: v3, a positive serial of at most 159 bits, a
    SHA-256/SHA-384/Ed25519 signature, parseable extensions without duplicates, a subject key
    identifier matching the key; with ``issuer``: issuer name, key identifier, signature and a
    validity inside the issuer's; with ``now``: valid at ``now``."""
    _check(cert.version is x509.Version.v3, "not X.509 v3")
    _check(0 < cert.serial_number < (1 << SERIAL_BITS), "serial not a positive 159-bit integer")
    algorithm = cert.signature_hash_algorithm
    _check(
        algorithm is None or isinstance(algorithm, hashes.SHA256 | hashes.SHA384),
        f"signature hash {algorithm}",
    )
    oids = [e.oid for e in cert.extensions]
    _check(len(oids) == len(set(oids)), "duplicate extensions")
    ski = _extension(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    expected_ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    _check(ski == expected_ski, "SubjectKeyIdentifier does not match the key")
    _check(cert.not_valid_before_utc < cert.not_valid_after_utc, "empty validity period")
    if issuer is not None:
        _check(cert.issuer == issuer.subject, "issuer name differs from the issuer's subject")
        aki = _extension(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
        assert isinstance(aki, x509.AuthorityKeyIdentifier)
        issuer_ski = _extension(issuer, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
        assert isinstance(issuer_ski, x509.SubjectKeyIdentifier)
        _check(aki.key_identifier == issuer_ski.digest, "AuthorityKeyIdentifier != issuer SKI")
        cert.verify_directly_issued_by(issuer)
        _check(
            issuer.not_valid_before_utc <= cert.not_valid_before_utc
            and cert.not_valid_after_utc <= issuer.not_valid_after_utc,
            "validity not inside the issuer's",
        )
    if now is not None:
        _check(
            cert.not_valid_before_utc <= now < cert.not_valid_after_utc,
            f"not valid at {now.isoformat()}",
        )


def make_issuing_ca(
    clock: Clock,
    key_type: KeyType = KeyType.P256,
    *,
    root_lifetime: timedelta = timedelta(days=3650),
    issuing_lifetime: timedelta = timedelta(days=180),
) -> CertificateAuthority:
    """A fresh root and an issuing CA under it, in memory; the root is ``.root``."""
    root = create_root_ca(LocalSigner.generate(key_type), "Test Root CA", clock, root_lifetime)
    return create_issuing_ca(
        root, LocalSigner.generate(key_type), "Test Issuing CA", clock, issuing_lifetime
    )
