"""The gateway's home folder: what `fleetgate init` creates and what the service loads.

    <home>/fleetgate.toml            settings
    <home>/ca/root.crt, issuing.crt  the gateway's CA certificates (PEM)
    <home>/ca/*.key                  encrypted PKCS#8 keys, mode 0600 (root, issuing, audit)
    <home>/secrets/passphrase        generated passphrase when none was given, mode 0600
    <home>/trust/manufacturers/*.pem manufacturer roots whose birth certificates we trust
    <home>/registry.db               SQLite registry (unless database_url says otherwise)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from gateway.config import CONFIG_NAME, Settings, render_default_config
from gateway.keystore import EncryptedFileKeyStore
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import Clock, SystemClock
from pki.keys import KeyType

ROOT_KEY = "root"
ISSUING_KEY = "issuing"
AUDIT_KEY = "audit"


class HomeExistsError(FileExistsError):
    """`fleetgate init` would overwrite an existing CA."""


@dataclass(frozen=True)
class InitResult:
    home: Path
    config: Path
    root_certificate: Path
    issuing_certificate: Path
    passphrase_file: Path | None  # set when a passphrase was generated
    root: x509.Certificate
    issuing: x509.Certificate


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, created with that mode (no window)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def init_home(
    home: Path,
    *,
    trust_domain: str = "fleetgate.local",
    key_type: KeyType = KeyType.P256,
    passphrase: bytes | None = None,
    force: bool = False,
    clock: Clock | None = None,
) -> InitResult:
    clock = clock or SystemClock()
    ca_dir = home / "ca"
    root_path, issuing_path = ca_dir / "root.crt", ca_dir / "issuing.crt"
    if root_path.exists() and not force:
        raise HomeExistsError(
            f"{root_path} exists: this home already has a CA (use --force to replace it; "
            "every certificate it issued would stop verifying)"
        )
    home.mkdir(parents=True, exist_ok=True)
    generated: Path | None = None
    if passphrase is None:
        generated = home / "secrets" / "passphrase"
        passphrase = secrets.token_urlsafe(32).encode()
        write_private(generated, passphrase + b"\n")

    keys = EncryptedFileKeyStore(ca_dir, passphrase)
    root = create_root_ca(
        keys.generate(ROOT_KEY, key_type, overwrite=force),
        f"Fleetgate Root CA {trust_domain}",
        clock,
        timedelta(days=3650),
    )
    issuing = create_issuing_ca(
        root,
        keys.generate(ISSUING_KEY, key_type, overwrite=force),
        f"Fleetgate Issuing CA {trust_domain}",
        clock,
        timedelta(days=180),
    )
    audit = keys.generate(AUDIT_KEY, key_type, overwrite=force)
    # The audit key's public half sits beside the certificates so `fleetgate audit verify`
    # works without the passphrase: verifying must not need the power to sign.
    (ca_dir / "audit.pub").write_bytes(
        audit.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    root_path.write_bytes(pem(root.certificate))
    issuing_path.write_bytes(pem(issuing.certificate))
    (home / "trust" / "manufacturers").mkdir(parents=True, exist_ok=True)

    config = home / CONFIG_NAME
    if force or not config.exists():
        config.write_text(render_default_config(trust_domain, key_type))
    return InitResult(
        home=home,
        config=config,
        root_certificate=root_path,
        issuing_certificate=issuing_path,
        passphrase_file=generated,
        root=root.certificate,
        issuing=issuing.certificate,
    )


def is_initialised(home: Path) -> bool:
    return (home / "ca" / "root.crt").exists() and (home / CONFIG_NAME).exists()


@dataclass(frozen=True)
class GatewayKeys:
    """The CA hierarchy and keys a running gateway needs, loaded from its home."""

    root: CertificateAuthority
    issuing: CertificateAuthority
    keystore: EncryptedFileKeyStore


def load_keys(settings: Settings) -> GatewayKeys:
    keys = EncryptedFileKeyStore(settings.ca_dir, settings.passphrase())
    root_cert = x509.load_pem_x509_certificate((settings.ca_dir / "root.crt").read_bytes())
    issuing_cert = x509.load_pem_x509_certificate((settings.ca_dir / "issuing.crt").read_bytes())
    root = CertificateAuthority(certificate=root_cert, signer=keys.load(ROOT_KEY), chain=())
    issuing = CertificateAuthority(
        certificate=issuing_cert, signer=keys.load(ISSUING_KEY), chain=(root_cert,)
    )
    return GatewayKeys(root=root, issuing=issuing, keystore=keys)


def load_manufacturer_roots(settings: Settings) -> tuple[x509.Certificate, ...]:
    roots: list[x509.Certificate] = []
    folder = settings.manufacturers_dir
    if folder.is_dir():
        for path in sorted(folder.glob("*.pem")):
            roots.extend(x509.load_pem_x509_certificates(path.read_bytes()))
    return tuple(roots)


def load_audit_public_key(settings: Settings) -> CertificatePublicKeyTypes:
    key = load_pem_public_key((settings.ca_dir / "audit.pub").read_bytes())
    return cast(CertificatePublicKeyTypes, key)
