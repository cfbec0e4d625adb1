"""Certificate signing requests: accept a CSR only as a proof of possession of a public key.

Nothing a CSR says beyond its key is ever copied into a certificate: the registry decides
what a certificate contains. What is checked here is that the CSR is well formed, self-signed
by its key, that the key is one we accept, and that it does not ask for more than a leaf of
its identity gets (CA powers, an unknown critical extension, another identity's names): such
a request is refused as ``csr_overreach`` rather than quietly trimmed, since an honest device
never makes it and the refusal is worth counting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from pki._build import spki_der
from pki.errors import CsrRejected, Reason
from pki.keys import LocalSigner, hash_for_public_key

__all__ = [
    "CheckedCsr",
    "CsrIdentity",
    "CsrPolicy",
    "certificate_fingerprint",
    "check_csr",
    "make_csr",
    "public_key_fingerprint",
]

_PEM_MARKER = b"-----BEGIN"
# MD5 and SHA-1 self-signatures prove little: collisions let one signature cover two requests.
_WEAK_HASHES = (hashes.MD5, hashes.SHA1)


def public_key_fingerprint(key: CertificatePublicKeyTypes) -> str:
    """sha256 hex of the SubjectPublicKeyInfo DER."""
    return hashlib.sha256(spki_der(key)).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the certificate DER."""
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass(frozen=True)
class CsrPolicy:
    """Which keys a CSR may carry, and how big it may be."""

    min_rsa_bits: int = 2048
    allowed_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1"})
    allow_ed25519: bool = True
    max_bytes: int = 8192
    # Verifying a huge RSA signature is a cheap way to make the gateway work hard.
    max_rsa_bits: int = 8192

    def __post_init__(self) -> None:
        for label in ("min_rsa_bits", "max_bytes", "max_rsa_bits"):
            value = getattr(self, label)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{label} must be an int")
        if self.min_rsa_bits < 1024 or self.max_rsa_bits < self.min_rsa_bits:
            raise ValueError("need 1024 <= min_rsa_bits <= max_rsa_bits")
        if self.max_bytes < 128:
            raise ValueError("max_bytes must be at least 128")
        if not isinstance(self.allow_ed25519, bool):
            raise TypeError("allow_ed25519 must be a bool")
        curves = self.allowed_curves
        if isinstance(curves, str) or not all(isinstance(c, str) for c in curves):
            raise TypeError("allowed_curves must be a set of curve names")
        object.__setattr__(self, "allowed_curves", frozenset(curves))


@dataclass(frozen=True)
class CheckedCsr:
    """What survives a CSR check: the key, and the bytes evidence binds to."""

    public_key: CertificatePublicKeyTypes
    der: bytes = field(repr=False)
    digest: bytes  # sha256 of ``der``
    key_fingerprint: str  # public_key_fingerprint(public_key)


@dataclass(frozen=True)
class CsrIdentity:
    """The names a CSR may carry for the identity it is sent for: the common name (device id)
    and the SPIFFE ID. Optional in the request; anything else named there is overreach."""

    common_name: str
    spiffe_id: str


# Extensions a CSR may mark critical because we know what they ask (and refuse the part a
# leaf does not get); any other critical extension asks for something we cannot honour.
_KNOWN_CRITICAL = (
    x509.BasicConstraints,
    x509.KeyUsage,
    x509.ExtendedKeyUsage,
    x509.SubjectAlternativeName,
    x509.SubjectKeyIdentifier,
)


def _check_overreach(csr: x509.CertificateSigningRequest, identity: CsrIdentity | None) -> None:
    for ext in csr.extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise CsrRejected(Reason.CSR_OVERREACH, "CSR asks for a CA certificate (CA:TRUE)")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise CsrRejected(Reason.CSR_OVERREACH, "CSR asks for keyCertSign or cRLSign")
        if ext.critical and not isinstance(value, _KNOWN_CRITICAL):
            unknown = ext.oid.dotted_string
            raise CsrRejected(Reason.CSR_OVERREACH, f"CSR marks extension {unknown} critical")
        if identity is not None and isinstance(value, x509.SubjectAlternativeName):
            for name in value:
                if name != x509.UniformResourceIdentifier(identity.spiffe_id):
                    raise CsrRejected(
                        Reason.CSR_OVERREACH, f"CSR names {name.value!r}, not {identity.spiffe_id}"
                    )
    if identity is not None:
        for attribute in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            if attribute.value != identity.common_name:
                raise CsrRejected(
                    Reason.CSR_OVERREACH,
                    f"CSR common name {attribute.value!r} is not {identity.common_name!r}",
                )


def _parse(data: bytes) -> x509.CertificateSigningRequest:
    try:
        # PEM may follow text (`openssl req -text` prints the request before it), as OpenSSL
        # and cryptography allow; DER starts with a SEQUENCE and has no marker.
        if _PEM_MARKER in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        # InvalidVersion is not a ValueError: without it a CSR claiming version 2 escaped as
        # an unexpected exception (found with the cryptography-vectors bad-version CSR).
        raise CsrRejected(Reason.BAD_ENCODING, f"not a PKCS#10 request: {exc}") from None


def _check_key(csr: x509.CertificateSigningRequest, policy: CsrPolicy) -> CertificatePublicKeyTypes:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise CsrRejected(Reason.KEY_NOT_ALLOWED, "public key algorithm not supported") from None
    if isinstance(key, rsa.RSAPublicKey):
        if not policy.min_rsa_bits <= key.key_size <= policy.max_rsa_bits:
            raise CsrRejected(
                Reason.KEY_NOT_ALLOWED,
                f"RSA key of {key.key_size} bits; allowed "
                f"{policy.min_rsa_bits}..{policy.max_rsa_bits}",
            )
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in policy.allowed_curves:
            raise CsrRejected(Reason.KEY_NOT_ALLOWED, f"curve {key.curve.name} not allowed")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        if not policy.allow_ed25519:
            raise CsrRejected(Reason.KEY_NOT_ALLOWED, "Ed25519 keys not allowed")
        return key
    raise CsrRejected(Reason.KEY_NOT_ALLOWED, f"{type(key).__name__} keys not allowed")


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        weak = isinstance(csr.signature_hash_algorithm, _WEAK_HASHES)
        valid = not weak and csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CsrRejected(Reason.BAD_SIGNATURE, "CSR self-signature does not verify")


def check_csr(
    data: bytes,
    policy: CsrPolicy = CsrPolicy(),
    forbidden_keys: Iterable[CertificatePublicKeyTypes] = (),
    identity: CsrIdentity | None = None,
) -> CheckedCsr:
    """Parse a PEM or DER CSR, check it, and keep only its public key.

    ``forbidden_keys`` are keys the CSR must not carry (a device's birth key: the operational
    key must be new). With ``identity``, the CSR may name no one else (CSR_OVERREACH).
    Raises ``CsrRejected`` with the reason of the first failed check.
    ``digest`` is sha256 over the DER form, also when the CSR arrived as PEM.
    """
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"CSR must be bytes, not {type(data).__name__}")
    if not isinstance(policy, CsrPolicy):
        raise TypeError("policy must be a CsrPolicy")
    if len(data) > policy.max_bytes:
        raise CsrRejected(
            Reason.BAD_ENCODING, f"CSR is {len(data)} bytes, limit {policy.max_bytes}"
        )
    csr = _parse(bytes(data))
    # Extensions are parsed lazily; touching them now turns a malformed or duplicated
    # extension into a rejection here instead of an exception somewhere later.
    try:
        csr.extensions  # noqa: B018  parsing is the point
    except x509.DuplicateExtension as exc:
        raise CsrRejected(
            Reason.DUPLICATE_EXTENSION, f"duplicate extension {exc.oid.dotted_string}"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrRejected(Reason.BAD_ENCODING, f"extensions do not parse: {exc}") from None
    key = _check_key(csr, policy)
    _check_signature(csr)
    # After the signature: only what the key's holder really asked for counts as overreach.
    _check_overreach(csr, identity)
    key_der = spki_der(key)
    if any(spki_der(forbidden) == key_der for forbidden in forbidden_keys):
        raise CsrRejected(Reason.FORBIDDEN_KEY, "this key may not be certified here")
    der = csr.public_bytes(serialization.Encoding.DER)
    return CheckedCsr(
        public_key=key,
        der=der,
        digest=hashlib.sha256(der).digest(),
        key_fingerprint=hashlib.sha256(key_der).hexdigest(),
    )


def make_csr(signer: LocalSigner, common_name: str) -> bytes:
    """A DER CSR for ``signer``'s key, as a device or simulator would send it."""
    if not isinstance(signer, LocalSigner):
        raise TypeError(f"signer must be a LocalSigner, not {type(signer).__name__}")
    if not isinstance(common_name, str) or not common_name:
        raise ValueError("common_name must be a non-empty str")
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    csr = builder.sign(signer.private_key, hash_for_public_key(signer.public_key()))
    return csr.public_bytes(serialization.Encoding.DER)
