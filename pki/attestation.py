"""Device attestation: evidence signed by the birth key, appraised against manufacturer roots.

The device is the attester and the gateway the verifier (RFC 9334 background check). The
device signs ``EvidenceClaims`` with the key of its birth certificate; ``verify_attestation``
returns a verdict listing every reason the evidence fails, and never raises on bad input.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from pki.clock import require_aware
from pki.csr import certificate_fingerprint
from pki.errors import PkiError, Reason
from pki.keys import Signer, verify_signature
from pki.profile import check_identity_name, is_identity_name

__all__ = [
    "EVIDENCE_DOMAIN",
    "MAX_CHAIN_LENGTH",
    "AttestationVerdict",
    "BirthIdentity",
    "EvidenceClaims",
    "read_birth_identity",
    "sign_evidence",
    "verify_attestation",
]

EVIDENCE_DOMAIN = b"fleetgate-evidence-v1\x00"
MIN_NONCE_BYTES = 16
MAX_NONCE_BYTES = 64
MAX_FIRMWARE_VERSION = 64
# Birth certificate plus intermediates; real manufacturer hierarchies are 2 or 3 deep.
MAX_CHAIN_LENGTH = 4
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _check_nonce(value: object, what: str) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if not MIN_NONCE_BYTES <= len(value) <= MAX_NONCE_BYTES:
        raise ValueError(f"{what} must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")


@dataclass(frozen=True)
class EvidenceClaims:
    """What the device asserts, bound to one enrollment by both nonces and the CSR digest.

    ``device_id`` matches ``IDENTITY_NAME_PATTERN``; nonces are 16 to 64 bytes; ``csr_digest``
    is the 32-byte sha256 of the CSR DER; ``firmware_version`` is 1 to 64 printable
    characters; ``firmware_digest`` is 64 lower-case hex characters (sha256 of the image).
    """

    device_id: str
    gateway_nonce: bytes
    device_nonce: bytes
    csr_digest: bytes
    firmware_version: str
    firmware_digest: str

    def __post_init__(self) -> None:
        check_identity_name(self.device_id, "device_id")
        _check_nonce(self.gateway_nonce, "gateway_nonce")
        _check_nonce(self.device_nonce, "device_nonce")
        if not isinstance(self.csr_digest, bytes):
            raise TypeError("csr_digest must be bytes")
        if len(self.csr_digest) != 32:
            raise ValueError("csr_digest must be a 32-byte sha256 digest")
        if not isinstance(self.firmware_version, str):
            raise TypeError("firmware_version must be a str")
        version = self.firmware_version
        if not 0 < len(version) <= MAX_FIRMWARE_VERSION or not version.isprintable():
            raise ValueError(
                f"firmware_version must be 1 to {MAX_FIRMWARE_VERSION} printable characters"
            )
        if not isinstance(self.firmware_digest, str):
            raise TypeError("firmware_digest must be a str")
        if _SHA256_HEX.fullmatch(self.firmware_digest) is None:
            raise ValueError("firmware_digest must be 64 lower-case hex characters")

    def to_bytes(self) -> bytes:
        """The exact bytes the birth key signs.

        Layout, with no padding or separators beyond what is listed::

            "fleetgate-evidence-v1" 0x00         22 bytes of domain separation
            then, for each field in this order:
              device_id         (UTF-8 text)
              gateway_nonce     (raw bytes)
              device_nonce      (raw bytes)
              csr_digest        (raw 32 bytes: sha256 of the CSR DER)
              firmware_version  (UTF-8 text)
              firmware_digest   (UTF-8 text: the 64 lower-case hex characters, not raw bytes)
            each field written as a 4-byte unsigned big-endian length, then that many bytes.

        Example: device_id "sn-1" is written as ``00 00 00 04 73 6e 2d 31``.
        The signature over these bytes is ECDSA with SHA-256 (P-256 keys) or SHA-384 (P-384),
        DER-encoded, or plain Ed25519 (64 bytes); RSA keys sign with PKCS#1 v1.5 and SHA-256.
        """
        fields = (
            self.device_id.encode("utf-8"),
            self.gateway_nonce,
            self.device_nonce,
            self.csr_digest,
            self.firmware_version.encode("utf-8"),
            self.firmware_digest.encode("utf-8"),
        )
        return EVIDENCE_DOMAIN + b"".join(struct.pack(">I", len(f)) + f for f in fields)


def sign_evidence(signer: Signer, claims: EvidenceClaims) -> bytes:
    if not isinstance(claims, EvidenceClaims):
        raise TypeError("claims must be EvidenceClaims")
    return signer.sign(claims.to_bytes())


@dataclass(frozen=True)
class BirthIdentity:
    """Who a birth certificate says its device is. Trust it only from a passing verdict."""

    serial_number: str
    model: str
    manufacturer: str
    fingerprint: str  # sha256 hex of the birth certificate DER
    public_key: CertificatePublicKeyTypes = field(repr=False)

    def __post_init__(self) -> None:
        check_identity_name(self.serial_number, "serial number")
        for label in ("model", "manufacturer"):
            value = getattr(self, label)
            if not isinstance(value, str) or not value.strip() or not value.isprintable():
                raise ValueError(f"{label} must be non-empty printable text")
        if not isinstance(self.fingerprint, str) or _SHA256_HEX.fullmatch(self.fingerprint) is None:
            raise ValueError("fingerprint must be 64 lower-case hex characters")


def _single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, label: str) -> str:
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise PkiError(
            Reason.BIRTH_CERT_MALFORMED, f"subject must hold exactly one {label}, has {len(values)}"
        )
    value = values[0].value
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise PkiError(Reason.BIRTH_CERT_MALFORMED, f"subject {label} is empty or not text")
    return value


def read_birth_identity(cert: x509.Certificate) -> BirthIdentity:
    """Read O, OU and serialNumber from a birth certificate's subject.

    PkiError(BIRTH_CERT_MALFORMED) if one is missing, repeated, empty, or the serial number is
    not a valid identity name (it becomes the device id).
    """
    if not isinstance(cert, x509.Certificate):
        raise PkiError(Reason.BIRTH_CERT_MALFORMED, "not a certificate")
    try:
        subject = cert.subject
        public_key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PkiError(Reason.BIRTH_CERT_MALFORMED, f"certificate does not parse: {exc}") from None
    manufacturer = _single_attribute(subject, NameOID.ORGANIZATION_NAME, "organizationName")
    model = _single_attribute(subject, NameOID.ORGANIZATIONAL_UNIT_NAME, "organizationalUnitName")
    serial = _single_attribute(subject, NameOID.SERIAL_NUMBER, "serialNumber")
    if not is_identity_name(serial):
        raise PkiError(Reason.BIRTH_CERT_MALFORMED, f"serialNumber {serial!r} is not a device id")
    return BirthIdentity(
        serial_number=serial,
        model=model,
        manufacturer=manufacturer,
        fingerprint=certificate_fingerprint(cert),
        public_key=public_key,
    )


@dataclass(frozen=True)
class AttestationVerdict:
    """``ok`` only when ``reasons`` is empty. ``identity`` is what the birth certificate claims
    whenever it could be read (useful for audit even on failure); trust it only when ``ok``."""

    ok: bool
    reasons: tuple[Reason, ...]
    identity: BirthIdentity | None

    def __post_init__(self) -> None:
        if self.ok == bool(self.reasons):
            raise ValueError("a verdict is ok exactly when it has no reasons")


def _birth_verifier_policy() -> ExtensionPolicy:
    # 802.1AR IDevIDs (and Matter DACs) carry no SAN; the web PKI end-entity defaults demand
    # one. Everything else (key usage, basic constraints, EKU clientAuth when an EKU is
    # present) keeps the defaults.
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )


def _organization(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return str(values[0].value) if len(values) == 1 else None


def _chain_reason(
    chain: Sequence[x509.Certificate],
    identity: BirthIdentity | None,
    trusted_roots: Sequence[x509.Certificate],
    now: datetime,
) -> Reason | None:
    try:
        top_issuer = chain[-1].issuer
    except ValueError:
        # Names are parsed lazily: a damaged issuer name surfaces here, not at load time.
        return Reason.CHAIN_INVALID
    manufacturer = identity.manufacturer if identity is not None else None
    # A root is "ours" for this chain if it names the chain's top issuer, or if it belongs to
    # the manufacturer the birth certificate names: a chain that lost its intermediate still
    # comes from a manufacturer we know, and that is a broken chain, not a stranger.
    known = any(
        root.subject == top_issuer
        or (manufacturer is not None and _organization(root.subject) == manufacturer)
        for root in trusted_roots
    )
    if not known:
        return Reason.UNKNOWN_MANUFACTURER
    if len(chain) > MAX_CHAIN_LENGTH:
        return Reason.CHAIN_INVALID
    verifier = (
        PolicyBuilder()
        .store(Store(list(trusted_roots)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_LENGTH)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_birth_verifier_policy()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(chain[0], list(chain[1:]))
    except (VerificationError, ValueError, TypeError):
        return Reason.CHAIN_INVALID
    return None


def verify_attestation(
    chain: Sequence[x509.Certificate],
    claims: EvidenceClaims,
    signature: bytes,
    *,
    trusted_roots: Sequence[x509.Certificate],
    denied_fingerprints: Collection[str],
    now: datetime,
) -> AttestationVerdict:
    """Appraise one device's evidence.

    ``chain[0]`` is the birth certificate, the rest its intermediates. Reasons, in order:
    BIRTH_CERT_MALFORMED (subject unreadable); BIRTH_CERT_NOT_YET_VALID / BIRTH_CERT_EXPIRED
    (judged first, so a dated certificate is not reported as a broken chain);
    UNKNOWN_MANUFACTURER / CHAIN_INVALID; BIRTH_CERT_DENIED (fingerprint deny-listed);
    DEVICE_ID_MISMATCH (claims.device_id is not the birth serialNumber);
    EVIDENCE_SIGNATURE_INVALID.
    """
    if not isinstance(claims, EvidenceClaims):
        raise TypeError("claims must be EvidenceClaims")
    now = require_aware(now, "now")
    certs = list(chain) if isinstance(chain, Sequence) else []
    if not certs or not all(isinstance(c, x509.Certificate) for c in certs):
        return AttestationVerdict(False, (Reason.BIRTH_CERT_MALFORMED,), None)
    roots = [r for r in trusted_roots if isinstance(r, x509.Certificate)]
    birth = certs[0]
    reasons: list[Reason] = []

    identity: BirthIdentity | None = None
    try:
        identity = read_birth_identity(birth)
    except PkiError as exc:
        reasons.append(exc.reason)

    if now < birth.not_valid_before_utc:
        reasons.append(Reason.BIRTH_CERT_NOT_YET_VALID)
    elif now > birth.not_valid_after_utc:
        reasons.append(Reason.BIRTH_CERT_EXPIRED)
    else:
        chain_problem = _chain_reason(certs, identity, roots, now)
        if chain_problem is not None:
            reasons.append(chain_problem)

    if certificate_fingerprint(birth) in denied_fingerprints:
        reasons.append(Reason.BIRTH_CERT_DENIED)

    if identity is not None and claims.device_id != identity.serial_number:
        reasons.append(Reason.DEVICE_ID_MISMATCH)

    try:
        public_key = birth.public_key()
    except (ValueError, UnsupportedAlgorithm):
        signature_ok = False
    else:
        signature_ok = verify_signature(public_key, signature, claims.to_bytes())
    if not signature_ok:
        reasons.append(Reason.EVIDENCE_SIGNATURE_INVALID)

    return AttestationVerdict(not reasons, tuple(reasons), identity)
