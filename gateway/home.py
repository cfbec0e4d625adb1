"""The gateway's home folder: what `fleetgate init` creates and what the service loads.

    <home>/fleetgate.toml            settings
    <home>/ca/root.crt, issuing.crt  the gateway's CA certificates (PEM)
    <home>/ca/*.key                  encrypted PKCS#8 keys, mode 0600 (root, issuing, audit;
                                     no issuing.key when ca.key_store = "pkcs11": that key is
                                     in the token, sensitive and not extractable)
    <home>/secrets/passphrase        generated passphrase when none was given, mode 0600
    <home>/trust/manufacturers/*.pem manufacturer roots whose birth certificates we trust
    <home>/registry.db               SQLite registry (unless database_url says otherwise)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, replace
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
    DEFAULT_TRUST_DOMAIN,
    PKCS11_PIN_ENV,
    CaSettings,
    ConfigError,
    Settings,
    load_settings,
    pkcs11_pin,
    render_default_config,
)
from gateway.keystore import EncryptedFileKeyStore
from gateway.keystore_pkcs11 import Pkcs11KeyStore
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import Clock, SystemClock
from pki.csr import public_key_fingerprint
from pki.errors import KeyStoreError, Reason
from pki.keys import KeyType, Signer

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
    token_label: str | None = None  # set when the issuing key was made in a PKCS#11 token
    config_written: bool = True  # False: an existing fleetgate.toml was kept as it was


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only, created with that mode (no window)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.PEM)


def _leftovers(home: Path, generating_passphrase: bool) -> list[Path]:
    """Files a new CA would overwrite: the certificates, the keys, and the generated passphrase
    when a new one would be generated (a passphrase given in a file there is only read)."""
    ca_dir = home / "ca"
    found = [ca_dir / "root.crt", ca_dir / "issuing.crt"]
    if generating_passphrase:
        found.append(home / "secrets" / "passphrase")
    found += [ca_dir / f"{name}.key" for name in (ROOT_KEY, ISSUING_KEY, AUDIT_KEY)]
    return [path for path in found if path.exists()]


def init_home(
    home: Path,
    *,
    trust_domain: str | None = None,
    key_type: KeyType | None = None,
    passphrase: bytes | None = None,
    passphrase_file: Path | None = None,
    force: bool = False,
    clock: Clock | None = None,
    key_store: str | None = None,
    pkcs11_module: str | None = None,
    pkcs11_token_label: str | None = None,
    pin: str | None = None,
) -> InitResult:
    """Create the CA hierarchy, keys and settings in ``home``.

    The keys are encrypted with ``passphrase``; without one a passphrase is generated into
    ``secrets/passphrase``. ``passphrase_file`` (where ``passphrase`` was read from) is
    recorded in a new fleetgate.toml so the gateway finds it again. Nothing is written
    unless the home is free of an earlier CA's files (or ``force``): a half-made home must
    not lose the passphrase that opens the keys still in it.

    An existing fleetgate.toml is kept (``force`` included): ``trust_domain`` and ``key_type``
    left out come from it (else fleetgate.local and P-256), and given ones that disagree with
    it are a ConfigError before anything is written.

    ``key_store = "pkcs11"`` makes the issuing key in the token ``pkcs11_token_label`` of
    ``pkcs11_module``, logged in with ``pin`` (default $FLEETGATE_PKCS11_PIN); the root and
    audit keys stay encrypted files. Left out, these come from an existing fleetgate.toml,
    else the issuing key is a file too."""
    clock = clock or SystemClock()
    ca_dir = home / "ca"
    root_path = ca_dir / "root.crt"
    if not force and (found := _leftovers(home, generating_passphrase=passphrase is None)):
        if root_path in found:
            raise HomeExistsError(
                f"{root_path} exists: this home already has a CA (use --force to replace it; "
                "every certificate it issued would stop verifying)"
            )
        raise HomeExistsError(
            f"{found[0]} exists: this home holds part of an earlier CA (move it away, or use "
            "--force to replace it)"
        )
    config = home / CONFIG_NAME
    kept = load_settings(home) if config.exists() else None
    trust_domain, key_type = _chosen_identity(config, kept, trust_domain, key_type)
    ca_settings = _chosen_key_store(
        config,
        kept.ca if kept is not None else None,
        key_type,
        {
            "key_store": key_store,
            "pkcs11_module": pkcs11_module,
            "pkcs11_token_label": pkcs11_token_label,
        },
    )
    # The token is opened (and its PIN checked) before anything is written.
    token = _token_for_init(ca_settings, key_type, pin, force) if ca_settings.uses_token else None
    try:
        return _create(
            home, trust_domain, key_type, passphrase, passphrase_file, force, clock,
            ca_settings, token, kept,
        )
    finally:
        if token is not None:
            token.close()


def _chosen_identity(
    config: Path, kept: Settings | None, trust_domain: str | None, key_type: KeyType | None
) -> tuple[str, KeyType]:
    """The trust domain and key type of the new CA: the options, else those of an existing
    fleetgate.toml. That file is kept and the gateway reads it: it issues identities in its
    trust_domain whatever the CA is named for, and its ca.key_type is the record of the keys'
    type, so an option that disagrees with it is refused rather than silently ignored."""
    if kept is None:
        return trust_domain or DEFAULT_TRUST_DOMAIN, key_type or KeyType.P256
    asked = (
        ("trust_domain", "--trust-domain", trust_domain, kept.trust_domain),
        ("ca.key_type", "--key-type", key_type.value if key_type else None, kept.ca.key_type.value),
    )
    for name, option, given, recorded in asked:
        if given is not None and given != recorded:
            raise ConfigError(
                f"{config} has {name} = {recorded!r}, not {given!r} ({option}): init keeps "
                f"that file and the gateway reads it, so edit {name} there to match (or leave "
                f"{option} out)"
            )
    return kept.trust_domain, kept.ca.key_type


def _chosen_key_store(
    config: Path, existing: CaSettings | None, key_type: KeyType, asked: dict[str, str | None]
) -> CaSettings:
    """The [ca] settings init works with: the key store the options ask for, else the one an
    existing fleetgate.toml names. That file is kept, and the gateway reads it, so one that
    names another store is refused: the gateway would look for the key where init did not
    put it."""
    base = existing if existing is not None else CaSettings()
    given = {name: value for name, value in asked.items() if value is not None}
    if existing is not None:
        for name, value in given.items():
            if getattr(existing, name) != value:
                raise ConfigError(
                    f"{config} has ca.{name} = {getattr(existing, name)!r}, not {value!r}: the "
                    "gateway reads that file, so edit it to match (or leave the option out)"
                )
    # replace() runs the checks again: the module exists, the label is set.
    return replace(
        base,
        key_type=key_type,
        key_store=given.get("key_store", base.key_store),
        pkcs11_module=given.get("pkcs11_module", base.pkcs11_module),
        pkcs11_token_label=given.get("pkcs11_token_label", base.pkcs11_token_label),
    )


def _token_for_init(
    ca: CaSettings, key_type: KeyType, pin: str | None, force: bool
) -> Pkcs11KeyStore:
    if key_type not in (KeyType.P256, KeyType.P384):
        raise ConfigError(
            f"a PKCS#11 token holds p256 or p384 CA keys, not {key_type.value}: choose one of "
            "them (--key-type)"
        )
    token = open_token(ca, pin)
    try:
        taken = token.exists(ISSUING_KEY)
    except BaseException:
        token.close()
        raise
    if taken and not force:
        token.close()
        raise HomeExistsError(
            f"token {ca.pkcs11_token_label!r} already holds a key named {ISSUING_KEY!r} (another "
            "gateway's issuing CA, or an earlier init): use --force to destroy it and make a new "
            "one; every certificate the old key issued would stop verifying"
        )
    return token


def _create(
    home: Path,
    trust_domain: str,
    key_type: KeyType,
    passphrase: bytes | None,
    passphrase_file: Path | None,
    force: bool,
    clock: Clock,
    ca_settings: CaSettings,
    token: Pkcs11KeyStore | None,
    kept: Settings | None,
) -> InitResult:
    ca_dir = home / "ca"
    root_path, issuing_path = ca_dir / "root.crt", ca_dir / "issuing.crt"
    config = home / CONFIG_NAME
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
        timedelta(days=ca_settings.root_lifetime_days),
    )
    issuing_key: Signer
    if token is None:
        issuing_key = keys.generate(ISSUING_KEY, key_type, overwrite=force)
    else:
        token.delete(ISSUING_KEY)  # there is one only with --force (checked before)
        issuing_key = token.generate(ISSUING_KEY, key_type)
        # An earlier CA's key file (--force) would only mislead whoever reads the home.
        (ca_dir / f"{ISSUING_KEY}.key").unlink(missing_ok=True)
    issuing = create_issuing_ca(
        root,
        issuing_key,
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
    config_written = kept is None
    if kept is None:
        config.write_text(
            render_default_config(
                trust_domain, key_type, _recorded(home, passphrase_file), ca_settings
            )
        )
    else:
        recorded = kept.passphrase_path.resolve()
        source = generated if generated is not None else passphrase_file
        if source is not None and source.resolve() != recorded:
            notes.append(
                f"{config} keeps passphrase_file pointing at {recorded}: set it to {source}, "
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
        token_label=ca_settings.pkcs11_token_label if token is not None else None,
        config_written=config_written,
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
    moved off the box after `fleetgate init`). ``keystore`` holds the audit key; ``token``,
    with ca.key_store = "pkcs11", the session the issuing CA signs through."""

    root_certificate: x509.Certificate
    issuing: CertificateAuthority
    keystore: EncryptedFileKeyStore
    token: Pkcs11KeyStore | None = None

    def close(self) -> None:
        """End the token session (nothing to do for file keys). The issuing CA cannot sign
        afterwards."""
        if self.token is not None:
            self.token.close()


def open_token(ca: CaSettings, pin: str | None = None) -> Pkcs11KeyStore:
    """The token ``ca`` names, logged in with ``pin`` or $FLEETGATE_PKCS11_PIN. A missing PIN
    is a ConfigError; a missing module, token or package, or a refused PIN, a KeyStoreError
    that says where it looked and never shows the PIN."""
    secret = pin or pkcs11_pin(ca)
    try:
        return Pkcs11KeyStore(ca.pkcs11_module, token_label=ca.pkcs11_token_label, pin=secret)
    except ImportError:
        raise KeyStoreError(
            Reason.KEY_NOT_FOUND,
            "ca.key_store = 'pkcs11' needs the python-pkcs11 package (fleetgate[pkcs11])",
        ) from None
    except KeyStoreError as exc:
        hint = (
            f"check ${PKCS11_PIN_ENV}"
            if exc.reason is Reason.WRONG_PASSPHRASE
            else f"ca.pkcs11_module = {ca.pkcs11_module}"
        )
        raise KeyStoreError(exc.reason, f"{exc.detail} ({hint})") from None


def _token_issuing_key(
    token: Pkcs11KeyStore, ca: CaSettings, certificate: x509.Certificate, where: Path
) -> Signer:
    try:
        signer = token.load(ISSUING_KEY)
    except KeyStoreError as exc:
        raise KeyStoreError(
            exc.reason,
            f"token {ca.pkcs11_token_label!r} holds no key named {ISSUING_KEY!r}: "
            "run `fleetgate init --key-store pkcs11` for this home, or name the token that does",
        ) from None
    if public_key_fingerprint(signer.public_key()) != public_key_fingerprint(
        certificate.public_key()
    ):
        # Checked here with a message of its own: CertificateAuthority would only say "does not
        # match", and a gateway signing with the wrong key issues nothing that verifies.
        raise KeyStoreError(
            Reason.KEY_NOT_FOUND,
            f"the key {ISSUING_KEY!r} in token {ca.pkcs11_token_label!r} is not the key of "
            f"{where} (was the token's key replaced by another init?)",
        )
    return signer


def load_keys(settings: Settings) -> GatewayKeys:
    """The issuing CA (its key from ca/issuing.key or from the token fleetgate.toml names) and
    the store of the audit key. Call ``close()`` on the result when done with the token."""
    keys = EncryptedFileKeyStore(settings.ca_dir, settings.passphrase())
    root_cert = x509.load_pem_x509_certificate((settings.ca_dir / "root.crt").read_bytes())
    issuing_path = settings.ca_dir / "issuing.crt"
    issuing_cert = x509.load_pem_x509_certificate(issuing_path.read_bytes())
    if not settings.ca.uses_token:
        issuing = CertificateAuthority(
            certificate=issuing_cert, signer=keys.load(ISSUING_KEY), chain=(root_cert,)
        )
        return GatewayKeys(root_certificate=root_cert, issuing=issuing, keystore=keys)
    token = open_token(settings.ca)
    try:
        signer = _token_issuing_key(token, settings.ca, issuing_cert, issuing_path)
        issuing = CertificateAuthority(certificate=issuing_cert, signer=signer, chain=(root_cert,))
    except BaseException:
        token.close()
        raise
    return GatewayKeys(root_certificate=root_cert, issuing=issuing, keystore=keys, token=token)


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
