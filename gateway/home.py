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

from gateway.config import (
    CONFIG_NAME,
    CaSettings,
    Settings,
    load_settings,
    render_default_config,
)
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
    notes: tuple[str, ...]  # what the operator must still do
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


def _leftovers(home: Path) -> list[Path]:
    """Files a new CA would overwrite: the certificates, keys and generated passphrase."""
    ca_dir = home / "ca"
    found = [ca_dir / "root.crt", ca_dir / "issuing.crt", home / "secrets" / "passphrase"]
    found += [ca_dir / f"{name}.key" for name in (ROOT_KEY, ISSUING_KEY, AUDIT_KEY)]
    return [path for path in found if path.exists()]


def init_home(
    home: Path,
    *,
    trust_domain: str = "fleetgate.local",
    key_type: KeyType = KeyType.P256,
    passphrase: bytes | None = None,
    passphrase_file: Path | None = None,
    force: bool = False,
    clock: Clock | None = None,
) -> InitResult:
    """Create the CA hierarchy, keys and settings in ``home``.

    The keys are encrypted with ``passphrase``; without one a passphrase is generated into
    ``secrets/passphrase``. ``passphrase_file`` (where ``passphrase`` was read from) is
    recorded in a new fleetgate.toml so the gateway finds it again. Nothing is written
    unless the home is free of an earlier CA's files (or ``force``): a half-made home must
    not lose the passphrase that opens the keys still in it."""
    clock = clock or SystemClock()
    ca_dir = home / "ca"
    root_path, issuing_path = ca_dir / "root.crt", ca_dir / "issuing.crt"
    if not force and (found := _leftovers(home)):
        if root_path in found:
            raise HomeExistsError(
                f"{root_path} exists: this home already has a CA (use --force to replace it; "
                "every certificate it issued would stop verifying)"
            )
        raise HomeExistsError(
            f"{found[0]} exists: this home holds part of an earlier CA (move it away, or use "
            "--force to replace it)"
        )
    home.mkdir(parents=True, exist_ok=True)
    config = home / CONFIG_NAME
    ca_settings = load_settings(home).ca if config.exists() else CaSettings(key_type=key_type)
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
        timedelta(days=ca_settings.root_lifetime_days),
    )
    issuing = create_issuing_ca(
        root,
        keys.generate(ISSUING_KEY, key_type, overwrite=force),
        f"Fleetgate Issuing CA {trust_domain}",
        clock,
        timedelta(days=ca_settings.issuing_lifetime_days),
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

    # An existing fleetgate.toml is the operator's (ports, policy, database): kept, even on
    # --force, which replaces the CA only.
    notes: list[str] = []
    if not config.exists():
        config.write_text(
            render_default_config(trust_domain, key_type, _recorded(home, passphrase_file))
        )
    else:
        kept = load_settings(home).passphrase_path.resolve()
        source = generated if generated is not None else passphrase_file
        if source is not None and source.resolve() != kept:
            notes.append(
                f"{config} keeps passphrase_file pointing at {kept}: set it to {source}, "
                "or the gateway cannot open its new keys"
            )
    return InitResult(
        home=home,
        config=config,
        root_certificate=root_path,
        issuing_certificate=issuing_path,
        passphrase_file=generated,
        notes=tuple(notes),
        root=root.certificate,
        issuing=issuing.certificate,
    )


def _recorded(home: Path, passphrase_file: Path | None) -> str | None:
    """How fleetgate.toml names a given passphrase file: relative inside the home (the home
    may move), absolute outside it."""
    if passphrase_file is None:
        return None
    path = passphrase_file.resolve()
    try:
        return str(path.relative_to(home.resolve()))
    except ValueError:
        return str(path)


def is_initialised(home: Path) -> bool:
    return (home / "ca" / "root.crt").exists() and (home / CONFIG_NAME).exists()


@dataclass(frozen=True)
class GatewayKeys:
    """What a running gateway needs from its home: the issuing CA with its key, and the root
    certificate (not its key: nothing at runtime signs with the root, so `ca/root.key` may be
    moved off the box after `fleetgate init`)."""

    root_certificate: x509.Certificate
    issuing: CertificateAuthority
    keystore: EncryptedFileKeyStore


def load_keys(settings: Settings) -> GatewayKeys:
    keys = EncryptedFileKeyStore(settings.ca_dir, settings.passphrase())
    root_cert = x509.load_pem_x509_certificate((settings.ca_dir / "root.crt").read_bytes())
    issuing_cert = x509.load_pem_x509_certificate((settings.ca_dir / "issuing.crt").read_bytes())
    issuing = CertificateAuthority(
        certificate=issuing_cert, signer=keys.load(ISSUING_KEY), chain=(root_cert,)
    )
    return GatewayKeys(root_certificate=root_cert, issuing=issuing, keystore=keys)


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
