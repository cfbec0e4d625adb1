"""CA keys in a PKCS#11 token (an HSM, a smart card, SoftHSM2): ``Pkcs11KeyStore`` implements
``pki.keys.KeyStore`` and hands out ``Pkcs11Signer``s that implement ``pki.keys.Signer``.

The private key is generated inside the token as sensitive and not extractable, and every
signature is made there: this process only ever holds a handle. Issuance does not know the
difference, because ``Signer`` is all it sees.

cryptography cannot sign a certificate with a key it does not hold, so certificates and CRLs
are signed in three steps: the builder signs with a throwaway key of the same algorithm (which
fixes the to-be-signed bytes, signature algorithm included), the token signs those TBS bytes,
and the DER is put back together with the token's signature in place of the throwaway one.
``pki.issue.Issuer`` then verifies the result against the CA certificate, as it does for every
certificate, so a wrong reassembly could never leave the process.

Elliptic-curve keys only (P-256, P-384): the token hashes nothing, the digest is computed here
and signed with ``CKM_ECDSA``, which every token offers (SoftHSM2 lacks ``CKM_ECDSA_SHA256``).
The PIN is kept for the session's life and shown nowhere: not in ``repr``, not in errors.

Needs the ``python-pkcs11`` package and the token's PKCS#11 module (Debian: ``softhsm2``).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key

from pki.errors import KeyStoreError, Reason
from pki.keys import KeyType
from pki.profile import check_identity_name

__all__ = ["Pkcs11KeyStore", "Pkcs11Signer"]

_CURVES: dict[KeyType, ec.EllipticCurve] = {
    KeyType.P256: ec.SECP256R1(),
    KeyType.P384: ec.SECP384R1(),
}
_KEY_TYPES = {"secp256r1": KeyType.P256, "secp384r1": KeyType.P384}


def _hash_for(curve: ec.EllipticCurve) -> hashes.SHA256 | hashes.SHA384:
    # The same pairing as pki.keys: SHA-384 with P-384, SHA-256 with P-256.
    return hashes.SHA384() if curve.key_size > 256 else hashes.SHA256()


# -- DER, only as much as reassembling a signed structure needs -----------------------------------


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _read_tlv(der: bytes, offset: int) -> tuple[int, int]:
    """Start of the value and end of the element that begins at ``offset``."""
    first = der[offset + 1]
    if first < 0x80:
        start, length = offset + 2, first
    else:
        size = first & 0x7F
        start = offset + 2 + size
        length = int.from_bytes(der[offset + 2 : start], "big")
    return start, start + length


def _resign(signed_der: bytes, tbs: bytes, signature: bytes) -> bytes:
    """``signed_der`` (SEQUENCE { tbs, AlgorithmIdentifier, BIT STRING }) with the BIT STRING
    replaced by ``signature``; tbs and algorithm stay byte for byte."""
    content_start, _ = _read_tlv(signed_der, 0)
    if signed_der[content_start : content_start + len(tbs)] != tbs:
        raise ValueError("the signed structure does not start with its TBS bytes")
    algorithm_at = content_start + len(tbs)
    _, algorithm_end = _read_tlv(signed_der, algorithm_at)
    algorithm = signed_der[algorithm_at:algorithm_end]
    bit_string = b"\x03" + _der_length(len(signature) + 1) + b"\x00" + signature
    body = tbs + algorithm + bit_string
    return b"\x30" + _der_length(len(body)) + body


class Pkcs11Signer:
    """A ``pki.keys.Signer`` whose private key stays in the token."""

    def __init__(self, store: Pkcs11KeyStore, label: str, private: Any, public_der: bytes) -> None:
        public = load_der_public_key(public_der)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyStoreError(Reason.KEY_NOT_ALLOWED, f"token key {label!r} is not an EC key")
        key_type = _KEY_TYPES.get(public.curve.name)
        if key_type is None:
            raise KeyStoreError(
                Reason.KEY_NOT_ALLOWED, f"token key {label!r} is on curve {public.curve.name}"
            )
        self._store = store
        self._label = label
        self._private = private
        self._public = public
        self._key_type = key_type
        self._hash = _hash_for(public.curve)
        # Fixes the TBS bytes only; whatever it signs is thrown away.
        self._stand_in = ec.generate_private_key(public.curve)

    @property
    def label(self) -> str:
        return self._label

    @property
    def key_type(self) -> KeyType:
        return self._key_type

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        """ECDSA over ``data`` with the curve's hash, DER-encoded, as ``LocalSigner.sign``."""
        digest = hashes.Hash(self._hash)
        digest.update(bytes(data))
        raw = self._store._sign_digest(self._private, digest.finalize())
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        draft = builder.sign(self._stand_in, self._hash)
        tbs = draft.tbs_certificate_bytes
        return x509.load_der_x509_certificate(
            _resign(draft.public_bytes(Encoding.DER), tbs, self.sign(tbs))
        )

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        draft = builder.sign(self._stand_in, self._hash)
        tbs = draft.tbs_certlist_bytes
        signed = _resign(draft.public_bytes(Encoding.DER), tbs, self.sign(tbs))
        return x509.load_der_x509_crl(signed)

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self._label!r}, {self._key_type.value})"


class Pkcs11KeyStore:
    """Named EC keys in one PKCS#11 token; a ``pki.keys.KeyStore``.

    ``module`` is the token's PKCS#11 library (``/usr/lib/softhsm/libsofthsm2.so``), the token
    is found by its label, and ``pin`` is the user PIN. Use as a context manager, or call
    ``close()``, to end the session.
    """

    def __init__(self, module: str | Path, *, token_label: str, pin: str) -> None:
        try:
            import pkcs11
            from pkcs11 import exceptions
        except ImportError as exc:
            raise ImportError("Pkcs11KeyStore needs the python-pkcs11 package") from exc
        if not isinstance(pin, str) or not pin:
            raise TypeError("pin must be a non-empty str")
        self._pkcs11 = pkcs11
        self._errors = exceptions
        self._token_label = token_label
        self._lock = threading.Lock()
        self._closed = False
        try:
            library = pkcs11.lib(str(module))
        except (OSError, RuntimeError, exceptions.PKCS11Error) as exc:
            raise KeyStoreError(
                Reason.KEY_NOT_FOUND, f"cannot load the PKCS#11 module {str(module)!r}"
            ) from exc
        try:
            token = library.get_token(token_label=token_label)
        except exceptions.NoSuchToken:
            raise KeyStoreError(
                Reason.KEY_NOT_FOUND, f"no PKCS#11 token labelled {token_label!r}"
            ) from None
        except exceptions.MultipleTokensReturned:
            raise KeyStoreError(
                Reason.KEY_EXISTS, f"several PKCS#11 tokens are labelled {token_label!r}"
            ) from None
        try:
            self._session = token.open(rw=True, user_pin=pin)
        except exceptions.UserAlreadyLoggedIn:
            # PKCS#11 logs in per application, not per session: another store of this process
            # holds the login, and this session shares it.
            self._session = token.open(rw=True)
        except (exceptions.PinIncorrect, exceptions.PinLenRange, exceptions.PinInvalid):
            # Dropped on purpose: the exception might carry the PIN.
            raise KeyStoreError(
                Reason.WRONG_PASSPHRASE, f"the PIN of token {token_label!r} was refused"
            ) from None
        except exceptions.PinLocked:
            raise KeyStoreError(
                Reason.WRONG_PASSPHRASE, f"token {token_label!r} is locked (too many bad PINs)"
            ) from None
        except exceptions.PKCS11Error as exc:
            # Removed, not initialised, out of sessions...: the error's name says which; its
            # text is not shown, for the same reason as above.
            raise KeyStoreError(
                Reason.KEY_NOT_FOUND,
                f"cannot open a session on token {token_label!r} ({type(exc).__name__})",
            ) from None

    # -- KeyStore ------------------------------------------------------------------------------

    def generate(self, name: str, key_type: KeyType = KeyType.P256) -> Pkcs11Signer:
        """A new key pair made inside the token, labelled ``name``; KeyStoreError(KEY_EXISTS)
        if the token has one by that name, KEY_NOT_ALLOWED for a type other than P-256/P-384."""
        check_identity_name(name, "key name")
        curve = _CURVES.get(KeyType(key_type))
        if curve is None:
            raise KeyStoreError(
                Reason.KEY_NOT_ALLOWED, f"{KeyType(key_type).value} keys are not made in tokens"
            )
        from pkcs11 import Attribute
        from pkcs11 import KeyType as TokenKeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        with self._lock:
            if self._find(name) is not None:
                raise KeyStoreError(Reason.KEY_EXISTS, f"key {name!r} already exists in the token")
            parameters = self._session.create_domain_parameters(
                TokenKeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(curve.name)},
                local=True,
            )
            identifier = name.encode()
            parameters.generate_keypair(
                store=True,
                label=name,
                id=identifier,
                public_template={Attribute.TOKEN: True, Attribute.VERIFY: True},
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.SIGN: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                },
            )
        return self.load(name)

    def load(self, name: str) -> Pkcs11Signer:
        check_identity_name(name, "key name")
        with self._lock:
            found = self._find(name)
        if found is None:
            raise KeyStoreError(Reason.KEY_NOT_FOUND, f"no key named {name!r} in the token")
        private, public_der = found
        return Pkcs11Signer(self, name, private, public_der)

    def exists(self, name: str) -> bool:
        check_identity_name(name, "key name")
        with self._lock:
            return self._find(name) is not None

    def delete(self, name: str) -> bool:
        """Destroy the key pair labelled ``name`` (what `fleetgate init --force` replaces);
        False if the token holds none. There is no undo: a token key has no other copy."""
        from pkcs11 import ObjectClass

        check_identity_name(name, "key name")
        kinds = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
        with self._lock:
            # listed before any is destroyed: the search must not run over a changing set
            labelled = list(self._session.get_objects({self._pkcs11.Attribute.LABEL: name}))
            keys = [item for item in labelled if item.object_class in kinds]
            for key in keys:
                key.destroy()
        return bool(keys)

    # -- the token -----------------------------------------------------------------------------

    def _find(self, name: str) -> tuple[Any, bytes] | None:
        from pkcs11 import ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        errors = self._errors
        try:
            private = self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=name)
            public = self._session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=name)
        except errors.NoSuchKey:
            return None
        except errors.MultipleObjectsReturned:
            raise KeyStoreError(
                Reason.KEY_EXISTS, f"the token holds several keys named {name!r}"
            ) from None
        return private, encode_ec_public_key(public)  # type: ignore[arg-type]  # a PublicKey

    def _sign_digest(self, private: Any, digest: bytes) -> bytes:
        with self._lock:
            signature: bytes = private.sign(digest, mechanism=self._pkcs11.Mechanism.ECDSA)
        return signature

    def close(self) -> None:
        """Log out and end the session; once is enough, and a token already gone (removed,
        its session invalid) is not an error here: there is nothing left to close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(self._errors.PKCS11Error):
                self._session.close()

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(token {self._token_label!r})"
