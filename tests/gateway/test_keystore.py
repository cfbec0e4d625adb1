from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway.keystore import EncryptedFileKeyStore
from pki.errors import KeyStoreError, Reason
from pki.keys import KeyStore, KeyType, verify_signature

PASSPHRASE = b"correct horse battery staple"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> EncryptedFileKeyStore:
    return EncryptedFileKeyStore(tmp_path / "keys", PASSPHRASE)


def test_directory_is_created_private(tmp_path: Path) -> None:
    EncryptedFileKeyStore(tmp_path / "a" / "keys", PASSPHRASE)
    assert mode(tmp_path / "a" / "keys") == 0o700


def test_loose_existing_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    EncryptedFileKeyStore(directory, PASSPHRASE)
    assert mode(directory) == 0o700


@pytest.mark.parametrize("key_type", list(KeyType))
def test_round_trip_each_key_type(tmp_path: Path, key_type: KeyType) -> None:
    store: KeyStore = EncryptedFileKeyStore(tmp_path / "keys", PASSPHRASE)
    signer = store.generate("issuing-ca", key_type)
    reopened = EncryptedFileKeyStore(tmp_path / "keys", PASSPHRASE)
    loaded = reopened.load("issuing-ca")
    assert loaded.key_type is key_type
    assert loaded.public_key() == signer.public_key()
    assert verify_signature(signer.public_key(), loaded.sign(b"data"), b"data")


def test_key_file_is_0600_encrypted_pem(store: EncryptedFileKeyStore) -> None:
    store.generate("root-ca")
    path = store.directory / "root-ca.key"
    assert mode(path) == 0o600
    content = path.read_bytes()
    assert content.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert b"BEGIN PRIVATE KEY" not in content
    # no temporary files left behind
    assert sorted(p.name for p in store.directory.iterdir()) == ["root-ca.key"]


def test_file_mode_holds_under_a_permissive_umask(store: EncryptedFileKeyStore) -> None:
    previous = os.umask(0)
    try:
        store.generate("audit")
    finally:
        os.umask(previous)
    assert mode(store.directory / "audit.key") == 0o600


def test_wrong_passphrase_is_a_clear_error(tmp_path: Path) -> None:
    EncryptedFileKeyStore(tmp_path / "keys", PASSPHRASE).generate("root-ca")
    wrong = EncryptedFileKeyStore(tmp_path / "keys", b"not it")
    with pytest.raises(KeyStoreError) as caught:
        wrong.load("root-ca")
    assert caught.value.reason is Reason.WRONG_PASSPHRASE
    assert "root-ca.key" in caught.value.detail
    assert "passphrase" in caught.value.detail


def test_damaged_file_is_not_blamed_on_the_passphrase(store: EncryptedFileKeyStore) -> None:
    store.generate("root-ca")
    (store.directory / "root-ca.key").write_bytes(b"overwritten by accident")
    with pytest.raises(KeyStoreError) as caught:
        store.load("root-ca")
    assert caught.value.reason is Reason.BAD_ENCODING


def test_exists_and_missing_keys(store: EncryptedFileKeyStore) -> None:
    assert not store.exists("root-ca")
    with pytest.raises(KeyStoreError) as caught:
        store.load("root-ca")
    assert caught.value.reason is Reason.KEY_NOT_FOUND
    store.generate("root-ca")
    assert store.exists("root-ca")


def test_generate_refuses_to_overwrite(store: EncryptedFileKeyStore) -> None:
    first = store.generate("root-ca")
    before = (store.directory / "root-ca.key").read_bytes()
    with pytest.raises(KeyStoreError) as caught:
        store.generate("root-ca")
    assert caught.value.reason is Reason.KEY_EXISTS
    assert (store.directory / "root-ca.key").read_bytes() == before
    assert store.load("root-ca").public_key() == first.public_key()


def test_generate_overwrites_when_asked(store: EncryptedFileKeyStore) -> None:
    first = store.generate("root-ca")
    second = store.generate("root-ca", overwrite=True)
    assert store.load("root-ca").public_key() == second.public_key() != first.public_key()
    assert mode(store.directory / "root-ca.key") == 0o600


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65])
def test_key_names_cannot_leave_the_directory(store: EncryptedFileKeyStore, name: str) -> None:
    for call in (store.exists, store.load, store.generate):
        with pytest.raises(ValueError):
            call(name)


def test_passphrase_must_be_non_empty_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EncryptedFileKeyStore(tmp_path / "keys", b"")
    with pytest.raises(TypeError):
        EncryptedFileKeyStore(tmp_path / "keys", "text")  # type: ignore[arg-type]


def test_directory_path_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        EncryptedFileKeyStore(tmp_path / "keys", PASSPHRASE)
