"""Keys as signers, and where they are kept.

Issuance only ever talks to a ``Signer``: a key in memory, in an encrypted file or in a token
(PKCS#11) all look the same to the CA code, in the way SPIRE's key manager plugins do.
"""

from __future__ import annotations

import threading
from enum import StrEnum
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from pki.errors import KeyStoreError, Reason
from pki.profile import check_identity_name

__all__ = [
    "KeyStore",
    "KeyType",
    "LocalSigner",
    "MemoryKeyStore",
    "Signer",
    "decrypt_private_key",
    "encrypt_private_key",
    "hash_for_public_key",
    "verify_signature",
]


class KeyType(StrEnum):
    P256 = "p256"
    P384 = "p384"
    ED25519 = "ed25519"


SigningPrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_CURVES: dict[str, KeyType] = {"secp256r1": KeyType.P256, "secp384r1": KeyType.P384}


@runtime_checkable
class Signer(Protocol):
    """A private key that can sign but need not reveal itself."""

    @property
    def key_type(self) -> KeyType: ...

    def public_key(self) -> CertificatePublicKeyTypes: ...

    def sign(self, data: bytes) -> bytes:
        """ECDSA: DER signature over SHA-256 (P-256) or SHA-384 (P-384); Ed25519: raw 64 bytes."""
        ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate: ...

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList: ...


def hash_for_public_key(key: CertificatePublicKeyTypes) -> hashes.SHA256 | hashes.SHA384 | None:
    """The hash every signature in Fleetgate uses with this key: matched to the curve's strength
    for ECDSA (RFC 5480 section 4), none for Ed25519 (the algorithm hashes internally), SHA-256
    for RSA."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _ecdsa_hash(key.curve)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return None
    return hashes.SHA256()


def _ecdsa_hash(curve: ec.EllipticCurve) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA384() if curve.key_size > 256 else hashes.SHA256()


class LocalSigner:
    """A ``Signer`` over a private key held in this process."""

    __slots__ = ("_hash", "_key_type", "_private_key", "_public_key")

    def __init__(self, private_key: SigningPrivateKey) -> None:
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            key_type = _CURVES.get(private_key.curve.name)
            if key_type is None:
                raise ValueError(f"curve {private_key.curve.name} is not supported")
        elif isinstance(private_key, ed25519.Ed25519PrivateKey):
            key_type = KeyType.ED25519
        else:
            raise TypeError(
                f"expected a P-256, P-384 or Ed25519 private key, not {type(private_key).__name__}"
            )
        self._private_key = private_key
        self._key_type = key_type
        self._public_key: CertificatePublicKeyTypes = private_key.public_key()
        self._hash = hash_for_public_key(self._public_key)

    @classmethod
    def generate(cls, key_type: KeyType = KeyType.P256) -> LocalSigner:
        key_type = KeyType(key_type)
        if key_type is KeyType.P256:
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if key_type is KeyType.P384:
            return cls(ec.generate_private_key(ec.SECP384R1()))
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    @property
    def private_key(self) -> SigningPrivateKey:
        return self._private_key

    def public_key(self) -> CertificatePublicKeyTypes:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        key = self._private_key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        return key.sign(data, ec.ECDSA(_ecdsa_hash(key.curve)))

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._private_key, self._hash)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._private_key, self._hash)

    def __repr__(self) -> str:
        return f"LocalSigner({self._key_type.value})"


def verify_signature(public_key: CertificatePublicKeyTypes, signature: bytes, data: bytes) -> bool:
    """True if ``signature`` over ``data`` was made by the key behind ``public_key``, with the
    hash ``Signer.sign`` uses; RSA keys (other people's birth certificates) use PKCS#1 v1.5 with
    SHA-256. Any bad, malformed or unsupported signature is simply False."""
    if not isinstance(signature, bytes | bytearray) or not isinstance(data, bytes | bytearray):
        return False
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            algorithm = ec.ECDSA(_ecdsa_hash(public_key.curve))
            public_key.verify(bytes(signature), bytes(data), algorithm)
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(bytes(signature), bytes(data))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(bytes(signature), bytes(data), padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


def encrypt_private_key(signer: LocalSigner, passphrase: bytes) -> bytes:
    """PEM PKCS#8 encrypted under ``passphrase`` with the best scheme cryptography offers.

    In cryptography 50 that is PBES2: AES-256-CBC keyed by PBKDF2-HMAC-SHA256 with 2048
    iterations, readable by OpenSSL. That count slows guessing little, so the passphrase has
    to carry the strength (a long random one, not a word)."""
    if not isinstance(signer, LocalSigner):
        raise TypeError(f"signer must be a LocalSigner, not {type(signer).__name__}")
    _check_passphrase(passphrase)
    return signer.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(bytes(passphrase)),
    )


_ENCRYPTED_PEM_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def decrypt_private_key(data: bytes, passphrase: bytes) -> LocalSigner:
    """Inverse of ``encrypt_private_key``. Messages name the problem, never the key."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    _check_passphrase(passphrase)
    # cryptography raises the same ValueError for a wrong passphrase and for garbage; the PEM
    # marker tells the two apart so an operator is not told to retype a correct passphrase.
    if _ENCRYPTED_PEM_MARKER not in data:
        raise KeyStoreError(Reason.BAD_ENCODING, "not an encrypted PKCS#8 PEM private key")
    try:
        key = serialization.load_pem_private_key(bytes(data), password=bytes(passphrase))
    except (ValueError, TypeError):
        # The exception text is dropped on purpose: it is not ours to promise it holds no secret.
        raise KeyStoreError(
            Reason.WRONG_PASSPHRASE, "wrong passphrase, or the key file is damaged"
        ) from None
    except UnsupportedAlgorithm:
        raise KeyStoreError(
            Reason.KEY_NOT_ALLOWED, "the key file uses an unsupported algorithm"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise KeyStoreError(Reason.KEY_NOT_ALLOWED, f"unsupported key type {type(key).__name__}")
    try:
        return LocalSigner(key)
    except ValueError as exc:
        raise KeyStoreError(Reason.KEY_NOT_ALLOWED, str(exc)) from None


def _check_passphrase(passphrase: object) -> None:
    if not isinstance(passphrase, bytes | bytearray):
        raise TypeError(f"passphrase must be bytes, not {type(passphrase).__name__}")
    if not passphrase:
        raise ValueError("passphrase must not be empty")


class KeyStore(Protocol):
    """Named keys, each usable only as a ``Signer``."""

    def generate(self, name: str, key_type: KeyType = KeyType.P256) -> Signer: ...

    def load(self, name: str) -> Signer:
        """KeyStoreError(KEY_NOT_FOUND) if there is no key by that name."""
        ...

    def exists(self, name: str) -> bool: ...


class MemoryKeyStore:
    """Keys in a dict: tests, simulators, and gateways that re-create their CA at every start."""

    def __init__(self) -> None:
        self._keys: dict[str, LocalSigner] = {}
        self._lock = threading.Lock()

    def generate(
        self, name: str, key_type: KeyType = KeyType.P256, *, overwrite: bool = False
    ) -> LocalSigner:
        signer = LocalSigner.generate(key_type)
        self.put(name, signer, overwrite=overwrite)
        return signer

    def put(self, name: str, signer: LocalSigner, *, overwrite: bool = False) -> None:
        check_identity_name(name, "key name")
        if not isinstance(signer, LocalSigner):
            raise TypeError(f"signer must be a LocalSigner, not {type(signer).__name__}")
        with self._lock:
            if name in self._keys and not overwrite:
                raise KeyStoreError(Reason.KEY_EXISTS, f"key {name!r} already exists")
            self._keys[name] = signer

    def load(self, name: str) -> LocalSigner:
        check_identity_name(name, "key name")
        with self._lock:
            signer = self._keys.get(name)
        if signer is None:
            raise KeyStoreError(Reason.KEY_NOT_FOUND, f"no key named {name!r}")
        return signer

    def exists(self, name: str) -> bool:
        check_identity_name(name, "key name")
        with self._lock:
            return name in self._keys

    def __repr__(self) -> str:
        return f"MemoryKeyStore({len(self._keys)} keys)"
