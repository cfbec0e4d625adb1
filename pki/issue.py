"""Issuing leaf certificates in three steps, after SPIRE's CA: build from the template, sign,
then validate what was signed before it leaves the process.

Only the public key comes from the requester. Subject, SANs, key usages and lifetime come from
the ``LeafTemplate``, which the registry fills in.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import _der
from pki._build import authority_key_identifier, leaf_key_usage, spki_der, whole_seconds
from pki.ca import CertificateAuthority
from pki.clock import Clock, require_aware
from pki.errors import IssuanceError, Reason
from pki.profile import LeafTemplate
from pki.serials import SERIAL_BITS, new_serial_number

__all__ = ["DEFAULT_BACKDATE", "Issuer", "expected_leaf_extensions", "validate_issued"]

DEFAULT_BACKDATE = timedelta(seconds=60)
_MAX_BACKDATE = timedelta(hours=1)
_ALLOWED_LEAF_KEYS = (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)

# Immutable values shared by every leaf, built once instead of per certificate.
_NOT_A_CA = x509.BasicConstraints(ca=False, path_length=None)
_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
_SERVER_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
_SIGNING_KEY_USAGE = leaf_key_usage()
_RSA_KEY_USAGE = leaf_key_usage(key_encipherment=True)
# ECDSA() validates its argument in Python on every construction; one instance per hash will do.
_ECDSA_BY_HASH = {
    "sha256": ec.ECDSA(hashes.SHA256()),
    "sha384": ec.ECDSA(hashes.SHA384()),
    "sha512": ec.ECDSA(hashes.SHA512()),
}

_Extensions = list[tuple[x509.ExtensionType, bool]]


def _fixed_extensions(server: bool, rsa_key: bool) -> tuple[_Extensions, bytes]:
    extensions: _Extensions = [
        (_NOT_A_CA, True),
        (_RSA_KEY_USAGE if rsa_key else _SIGNING_KEY_USAGE, True),
        (_SERVER_AUTH if server else _CLIENT_AUTH, False),
    ]
    return extensions, b"".join(_der.extension(value, critical) for value, critical in extensions)


# The first three extensions depend only on (server, RSA key): built and encoded once.
_FIXED = {
    (server, rsa_key): _fixed_extensions(server, rsa_key)
    for server in (False, True)
    for rsa_key in (False, True)
}


# isinstance() against cryptography's key ABCs costs enough to show per certificate, and the
# answer depends only on the concrete key class: worked out once per class (class -> is RSA).
_LEAF_KEY_CLASSES: dict[type, bool] = {}


def _leaf_key_is_rsa(public_key: object) -> bool:
    """Whether an acceptable leaf key is RSA. check_csr applies the configured policy; this is
    the floor no caller can lower: only keys that can sign (and so authenticate in TLS) get a
    certificate, others raise IssuanceError(KEY_NOT_ALLOWED)."""
    is_rsa = _LEAF_KEY_CLASSES.get(type(public_key))
    if is_rsa is None:
        if not isinstance(public_key, _ALLOWED_LEAF_KEYS):
            raise IssuanceError(
                Reason.KEY_NOT_ALLOWED,
                f"cannot issue a certificate for a {type(public_key).__name__}",
            )
        is_rsa = _LEAF_KEY_CLASSES[type(public_key)] = isinstance(public_key, rsa.RSAPublicKey)
    return is_rsa


def _subject_alt_name(template: LeafTemplate) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(template.spiffe_id)]
    names.extend(x509.DNSName(name) for name in template.dns_names)
    names.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in template.ip_addresses)
    return x509.SubjectAlternativeName(names)


@dataclass(frozen=True)
class _LeafPlan:
    """One leaf as decided before signing: objects for the builder, and the exact DER the
    signed TBSCertificate must consist of around the signer's AlgorithmIdentifier."""

    subject: x509.Name
    extensions: _Extensions
    serial: int
    not_before: datetime
    not_after: datetime
    tbs_head: bytes  # version, serialNumber
    tbs_tail: bytes  # issuer, validity, subject, subjectPublicKeyInfo, extensions


def _plan_leaf(
    template: LeafTemplate,
    public_key: CertificatePublicKeyTypes,
    *,
    issuer_name_der: bytes,
    authority_key_id: x509.AuthorityKeyIdentifier,
    authority_key_id_der: bytes,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> _LeafPlan:
    spki = spki_der(public_key)
    # RFC 5280 method 1 from the SPKI needed anyway: what from_public_key computes, cheaper.
    ski_digest = hashlib.sha1(_der.spki_key_bits(spki), usedforsecurity=False).digest()
    ski = x509.SubjectKeyIdentifier(ski_digest)
    san = _subject_alt_name(template)
    fixed, fixed_der = _FIXED[(template.server, _leaf_key_is_rsa(public_key))]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, template.name)])
    encoded_extensions = b"".join(
        (fixed_der, _der.extension(san, False), authority_key_id_der, _der.extension(ski, False))
    )
    return _LeafPlan(
        subject=subject,
        extensions=[*fixed, (san, False), (authority_key_id, False), (ski, False)],
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        tbs_head=_der.VERSION_3 + _der.integer(serial),
        tbs_tail=b"".join(
            (
                issuer_name_der,
                _der.validity(not_before, not_after),
                subject.public_bytes(),
                spki,
                _der.extensions_field(encoded_extensions),
            )
        ),
    )


def expected_leaf_extensions(
    template: LeafTemplate,
    public_key: CertificatePublicKeyTypes,
    authority_key_id: x509.AuthorityKeyIdentifier,
) -> list[tuple[x509.ExtensionType, bool]]:
    """The complete, ordered extension list (value, critical) of a leaf for ``template``: what
    the issuer adds and what validation demands, from one definition."""
    fixed, _ = _FIXED[(template.server, _leaf_key_is_rsa(public_key))]
    return [
        *fixed,
        (_subject_alt_name(template), False),
        (authority_key_id, False),
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
    ]


def _fail(detail: str) -> IssuanceError:
    return IssuanceError(Reason.ISSUANCE_FAILED, detail)


def validate_issued(
    cert: x509.Certificate,
    ca: CertificateAuthority,
    template: LeafTemplate,
    public_key: CertificatePublicKeyTypes,
    now: datetime,
) -> None:
    """Check a signed leaf against what was asked for: IssuanceError(ISSUANCE_FAILED) naming the
    first difference. Cheap on purpose (one signature check, no chain building, nothing parsed
    back on success): it runs on every issuance."""
    if not isinstance(cert, x509.Certificate):
        raise TypeError("cert must be an x509.Certificate")
    if not isinstance(template, LeafTemplate):
        raise TypeError("template must be a LeafTemplate")
    _leaf_key_is_rsa(public_key)
    if not 0 < cert.serial_number < (1 << SERIAL_BITS):
        raise _fail("serial number is not a positive 159-bit integer")
    issuer = ca.certificate
    aki = authority_key_identifier(issuer)
    # Serial and validity are read from the certificate (nothing else records them); the
    # byte comparison in _validate then covers every other field.
    plan = _plan_leaf(
        template,
        public_key,
        issuer_name_der=issuer.subject.public_bytes(),
        authority_key_id=aki,
        authority_key_id_der=_der.extension(aki, False),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
    _validate(
        cert,
        plan,
        public_key=public_key,
        issuer=issuer,
        issuer_key=issuer.public_key(),
        lifetime=template.lifetime,
        now=require_aware(now, "now"),
    )


def _verify_signature(
    cert: x509.Certificate,
    tbs: bytes,
    issuer: x509.Certificate,
    issuer_key: CertificatePublicKeyTypes,
) -> bool:
    # With the issuer's key parsed once per Issuer this beats verify_directly_issued_by, which
    # parses it again for every certificate; other key types take that general path.
    try:
        if isinstance(issuer_key, ec.EllipticCurvePublicKey):
            algorithm = cert.signature_hash_algorithm
            ecdsa = _ECDSA_BY_HASH.get(algorithm.name) if algorithm is not None else None
            if ecdsa is None:
                return False
            issuer_key.verify(cert.signature, tbs, ecdsa)
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey):
            issuer_key.verify(cert.signature, tbs)
        else:
            cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _explain_mismatch(
    cert: x509.Certificate,
    plan: _LeafPlan,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
) -> str:
    """Only on failure: parse the certificate back to say which field differs."""
    try:
        if cert.version is not x509.Version.v3:
            return "certificate is not X.509 v3"
        if cert.serial_number != plan.serial:
            return "serial number differs from the one chosen"
        if cert.issuer != issuer.subject:
            return "issuer name does not match the issuing CA"
        if cert.subject != plan.subject:
            return f"subject {cert.subject.rfc4514_string()} is not the template's"
        if (cert.not_valid_before_utc, cert.not_valid_after_utc) != (
            plan.not_before,
            plan.not_after,
        ):
            return "validity differs from the one chosen"
        if spki_der(cert.public_key()) != spki_der(public_key):
            return "certified public key differs from the requested one"
        found = list(cert.extensions)
    except (ValueError, UnsupportedAlgorithm) as exc:
        return f"certificate does not parse back: {exc}"
    if [e.oid for e in found] != [value.oid for value, _ in plan.extensions]:
        return f"extensions are {[e.oid.dotted_string for e in found]}, not the template's"
    for ext, (value, critical) in zip(found, plan.extensions, strict=True):
        if ext.critical != critical or ext.value != value:
            return f"extension {value.oid.dotted_string} differs from the template"
    return "certificate is encoded differently from what was built"


def _validate(
    cert: x509.Certificate,
    plan: _LeafPlan,
    *,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
    issuer_key: CertificatePublicKeyTypes,
    lifetime: timedelta,
    now: datetime,
) -> None:
    if not plan.not_before <= now < plan.not_after:
        raise _fail(f"validity {plan.not_before} .. {plan.not_after} does not cover {now}")
    if plan.not_after > now + lifetime:
        raise _fail("certificate outlives the template's lifetime")
    if plan.not_before < issuer.not_valid_before_utc or plan.not_after > issuer.not_valid_after_utc:
        raise _fail("certificate validity is not inside the issuing CA's")
    # The signed bytes must be exactly the planned ones: version, serial, issuer, validity,
    # subject, key and every extension (value, criticality, order, nothing extra) in one
    # comparison, several times cheaper than parsing them back.
    tbs = cert.tbs_certificate_bytes
    if not _der.matches_tbs(tbs, plan.tbs_head, plan.tbs_tail):
        raise _fail(_explain_mismatch(cert, plan, public_key, issuer))
    if not _verify_signature(cert, tbs, issuer, issuer_key):
        raise _fail("signature does not verify under the issuing CA's key")


class Issuer:
    """Issues leaf certificates from one issuing CA."""

    def __init__(
        self,
        ca: CertificateAuthority,
        clock: Clock,
        *,
        random_bits: Callable[[int], int] = secrets.randbits,
        backdate: timedelta = DEFAULT_BACKDATE,
    ) -> None:
        if not isinstance(ca, CertificateAuthority):
            raise TypeError("ca must be a CertificateAuthority")
        if not isinstance(backdate, timedelta):
            raise TypeError("backdate must be a timedelta")
        if not timedelta(0) <= backdate <= _MAX_BACKDATE:
            raise ValueError(f"backdate must be between 0 and {_MAX_BACKDATE}")
        self._ca = ca
        self._clock = clock
        self._random_bits = random_bits
        self._backdate = backdate
        # Computed once: every leaf carries the same issuer name, key identifier and key.
        certificate = ca.certificate
        self._issuer_name = certificate.subject
        self._issuer_name_der = certificate.subject.public_bytes()
        self._authority_key_id = authority_key_identifier(certificate)
        self._authority_key_id_der = _der.extension(self._authority_key_id, False)
        self._issuer_key = certificate.public_key()
        self._chain = (certificate, *ca.chain)

    @property
    def ca(self) -> CertificateAuthority:
        return self._ca

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The issuing CA certificate, then the certificates above it: what a device is sent
        after its leaf."""
        return self._chain

    def issue(
        self, template: LeafTemplate, public_key: CertificatePublicKeyTypes
    ) -> x509.Certificate:
        """Build a leaf from ``template`` for ``public_key``, sign it with the CA's signer and
        validate the result. IssuanceError: KEY_NOT_ALLOWED for a key that cannot sign,
        ISSUANCE_FAILED if the CA has expired, the signer fails or validation finds a fault."""
        if not isinstance(template, LeafTemplate):
            raise TypeError("template must be a LeafTemplate")
        _leaf_key_is_rsa(public_key)
        now = whole_seconds(require_aware(self._clock.now(), "clock.now()"))
        issuer = self._ca.certificate
        # Clamped to the issuing CA's window: a leaf valid before or after its issuer is
        # refused by strict verifiers, and the issuer's notAfter caps the leaf's.
        not_before = max(now - self._backdate, issuer.not_valid_before_utc)
        not_after = min(now + template.lifetime, issuer.not_valid_after_utc)
        if not_after <= now:
            raise _fail(f"issuing CA expired at {issuer.not_valid_after_utc.isoformat()}")
        plan = _plan_leaf(
            template,
            public_key,
            issuer_name_der=self._issuer_name_der,
            authority_key_id=self._authority_key_id,
            authority_key_id_der=self._authority_key_id_der,
            serial=new_serial_number(self._random_bits),
            not_before=not_before,
            not_after=not_after,
        )
        # The constructor rather than the fluent setters: each setter copies the builder and
        # re-checks its argument, and the plan's values are settled already (validation below
        # compares the signed bytes with them anyway).
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=plan.subject,
            public_key=public_key,
            serial_number=plan.serial,
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=[x509.Extension(v.oid, critical, v) for v, critical in plan.extensions],
        )
        try:
            cert = self._ca.signer.sign_certificate(builder)
        except Exception as exc:
            # A signer may be a token or a remote service; whatever broke, the caller gets one
            # typed error, and the cause stays chained for the log.
            raise _fail(f"signer failed: {type(exc).__name__}") from exc
        _validate(
            cert,
            plan,
            public_key=public_key,
            issuer=issuer,
            issuer_key=self._issuer_key,
            lifetime=template.lifetime,
            now=now,
        )
        return cert
