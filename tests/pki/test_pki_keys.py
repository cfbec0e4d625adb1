from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, x25519

from pki.errors import KeyStoreError, Reason
from pki.keys import (
    KeyStore,
    KeyType,
    LocalSigner,
    MemoryKeyStore,
    Signer,
    decrypt_private_key,
    encrypt_private_key,
    verify_signature,
)

DATA = b"evidence bytes"


@pytest.mark.parametrize("key_type", list(KeyType))
def test_generated_signer_signs_what_verify_signature_accepts(key_type: KeyType) -> None:
    signer = LocalSigner.generate(key_type)
    assert isinstance(signer, Signer)
    assert signer.key_type is key_type
    signature = signer.sign(DATA)
    assert verify_signature(signer.public_key(), signature, DATA)
    assert not verify_signature(signer.public_key(), signature, DATA + b"!")
    other = LocalSigner.generate(key_type)
    assert not verify_signature(other.public_key(), signature, DATA)


def test_ecdsa_hash_follows_the_curve() -> None:
    p256, p384 = LocalSigner.generate(KeyType.P256), LocalSigner.generate(KeyType.P384)
    p256_key = p256.public_key()
    p384_key = p384.public_key()
    assert isinstance(p256_key, ec.EllipticCurvePublicKey)
    assert isinstance(p384_key, ec.EllipticCurvePublicKey)
    # Verifying with the documented hash directly is what a C implementation would do.
    p256_key.verify(p256.sign(DATA), DATA, ec.ECDSA(hashes.SHA256()))
    p384_key.verify(p384.sign(DATA), DATA, ec.ECDSA(hashes.SHA384()))


def test_ed25519_signature_is_raw_64_bytes() -> None:
    assert len(LocalSigner.generate(KeyType.ED25519).sign(DATA)) == 64


def test_verify_signature_accepts_rsa_pkcs1v15_sha256() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signature = key.sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    assert verify_signature(key.public_key(), signature, DATA)
    pss = key.sign(
        DATA, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
    )
    assert not verify_signature(key.public_key(), pss, DATA)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x30\x02\x01", b"garbage" * 20])
@pytest.mark.parametrize("key_type", list(KeyType))
def test_verify_signature_never_raises_on_junk(key_type: KeyType, signature: bytes) -> None:
    key = LocalSigner.generate(key_type).public_key()
    assert verify_signature(key, signature, DATA) is False


def test_verify_signature_is_false_for_non_signing_keys_and_non_bytes() -> None:
    x_key = x25519.X25519PrivateKey.generate().public_key()
    assert verify_signature(x_key, b"\x00" * 64, DATA) is False
    key = LocalSigner.generate()
    assert verify_signature(key.public_key(), "text", DATA) is False  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ec.generate_private_key(ec.SECP521R1()),
    ],
)
def test_local_signer_refuses_unsupported_curves(make_key: object) -> None:
    with pytest.raises(ValueError, match="curve"):
        LocalSigner(make_key())  # type: ignore[operator]


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ed448.Ed448PrivateKey.generate(),
        lambda: dsa.generate_private_key(key_size=1024),
        lambda: b"not a key",
    ],
)
def test_local_signer_refuses_other_key_types(make_key: object) -> None:
    with pytest.raises(TypeError):
        LocalSigner(make_key())  # type: ignore[operator]


def test_signer_repr_shows_no_key_material() -> None:
    signer = LocalSigner.generate(KeyType.P256)
    assert repr(signer) == "LocalSigner(p256)"


@pytest.mark.parametrize("key_type", list(KeyType))
def test_encrypt_decrypt_round_trip(key_type: KeyType) -> None:
    signer = LocalSigner.generate(key_type)
    pem = encrypt_private_key(signer, b"correct horse")
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    restored = decrypt_private_key(pem, b"correct horse")
    assert restored.key_type is key_type
    assert restored.public_key() == signer.public_key()
    assert verify_signature(signer.public_key(), restored.sign(DATA), DATA)


def test_wrong_passphrase_is_a_clear_error_without_key_material() -> None:
    signer = LocalSigner.generate()
    pem = encrypt_private_key(signer, b"right")
    with pytest.raises(KeyStoreError) as caught:
        decrypt_private_key(pem, b"wrong")
    assert caught.value.reason is Reason.WRONG_PASSPHRASE
    assert "passphrase" in str(caught.value)
    secret = signer.private_key.private_numbers().private_value  # type: ignore[union-attr]
    assert str(secret) not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_decrypt_refuses_unencrypted_or_garbage_input() -> None:
    plain = LocalSigner.generate().private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for data in (plain, b"garbage", b""):
        with pytest.raises(KeyStoreError) as caught:
            decrypt_private_key(data, b"pass")
        assert caught.value.reason is Reason.BAD_ENCODING


def test_decrypt_refuses_unsupported_key_types() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass"),
    )
    with pytest.raises(KeyStoreError) as caught:
        decrypt_private_key(pem, b"pass")
    assert caught.value.reason is Reason.KEY_NOT_ALLOWED


def test_empty_or_textual_passphrases_are_refused() -> None:
    signer = LocalSigner.generate()
    with pytest.raises(ValueError):
        encrypt_private_key(signer, b"")
    with pytest.raises(TypeError):
        encrypt_private_key(signer, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        decrypt_private_key(encrypt_private_key(signer, b"p"), "p")  # type: ignore[arg-type]


def test_memory_key_store() -> None:
    store: KeyStore = MemoryKeyStore()
    assert not store.exists("root-ca")
    signer = store.generate("root-ca", KeyType.P384)
    assert store.exists("root-ca")
    assert store.load("root-ca") is signer
    assert signer.key_type is KeyType.P384


def test_memory_key_store_errors() -> None:
    store = MemoryKeyStore()
    with pytest.raises(KeyStoreError) as caught:
        store.load("missing")
    assert caught.value.reason is Reason.KEY_NOT_FOUND
    first = store.generate("k")
    with pytest.raises(KeyStoreError) as caught:
        store.generate("k")
    assert caught.value.reason is Reason.KEY_EXISTS
    assert store.load("k") is first
    replaced = store.generate("k", overwrite=True)
    assert store.load("k") is replaced
    with pytest.raises(ValueError):
        store.generate("../escape")
    with pytest.raises(TypeError):
        store.put("x", ed25519.Ed25519PrivateKey.generate())  # type: ignore[arg-type]
