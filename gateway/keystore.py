"""Keys on disk, encrypted: ``EncryptedFileKeyStore`` implements ``pki.keys.KeyStore``.

Each key is one ``<name>.key`` file holding PEM PKCS#8 encrypted under the store's
passphrase. Files are created with mode 0600 in a directory of mode 0700; the mode is given
to ``os.open`` so there is never a moment when the file exists with wider permissions.
Issuance only sees the ``Signer`` a store returns, so a PKCS#11 store can sit beside this one
without any change to the CA code.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from pki.errors import KeyStoreError, Reason
from pki.keys import KeyType, LocalSigner, decrypt_private_key, encrypt_private_key
from pki.profile import check_identity_name

__all__ = ["DIRECTORY_MODE", "FILE_MODE", "EncryptedFileKeyStore"]

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_SUFFIX = ".key"


class EncryptedFileKeyStore:
    def __init__(self, directory: Path, passphrase: bytes) -> None:
        if not isinstance(passphrase, bytes | bytearray):
            raise TypeError("passphrase must be bytes")
        if not passphrase:
            raise ValueError("passphrase must not be empty")
        self._directory = Path(directory)
        self._passphrase = bytes(passphrase)
        self._prepare_directory()

    @property
    def directory(self) -> Path:
        return self._directory

    def _prepare_directory(self) -> None:
        try:
            self._directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"{self._directory} exists and is not a directory") from None
        if not self._directory.is_dir():
            raise NotADirectoryError(f"{self._directory} is not a directory")
        mode = stat.S_IMODE(self._directory.stat().st_mode)
        if mode & 0o077:
            # A directory made by someone else (or an older release) may be group or world
            # readable; the key files in it are 0600 anyway, but listing them should not be
            # open to everyone either.
            os.chmod(self._directory, DIRECTORY_MODE)

    def _path(self, name: str) -> Path:
        check_identity_name(name, "key name")
        return self._directory / f"{name}{_SUFFIX}"

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    def generate(
        self, name: str, key_type: KeyType = KeyType.P256, *, overwrite: bool = False
    ) -> LocalSigner:
        """A new key written as ``<name>.key``; KeyStoreError(KEY_EXISTS) if that file exists
        and ``overwrite`` is not set."""
        path = self._path(name)
        if path.exists() and not overwrite:
            raise KeyStoreError(Reason.KEY_EXISTS, f"key {name!r} already exists in {path.parent}")
        signer = LocalSigner.generate(key_type)
        self._write(path, encrypt_private_key(signer, self._passphrase), overwrite=overwrite)
        return signer

    def put(self, name: str, signer: LocalSigner, *, overwrite: bool = False) -> None:
        """Store an existing key as ``<name>.key`` (e.g. one made by another component)."""
        self._write(
            self._path(name), encrypt_private_key(signer, self._passphrase), overwrite=overwrite
        )

    def load(self, name: str) -> LocalSigner:
        path = self._path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(
                Reason.KEY_NOT_FOUND, f"no key named {name!r} in {path.parent}"
            ) from None
        try:
            return decrypt_private_key(data, self._passphrase)
        except KeyStoreError as exc:
            raise KeyStoreError(exc.reason, f"{path}: {exc.detail}") from None

    def _write(self, path: Path, data: bytes, *, overwrite: bool) -> None:
        # Written to a private temporary file first, then moved into place, so a crash never
        # leaves a half-written key under the real name.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if overwrite:
                os.replace(temporary, path)
            else:
                try:
                    # link() refuses an existing target: no overwrite even if another process
                    # created the key since the check in generate().
                    os.link(temporary, path)
                except FileExistsError:
                    raise KeyStoreError(
                        Reason.KEY_EXISTS, f"key {path.stem!r} already exists in {path.parent}"
                    ) from None
        finally:
            temporary.unlink(missing_ok=True)
        self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self._directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __repr__(self) -> str:
        return f"EncryptedFileKeyStore({str(self._directory)!r})"
