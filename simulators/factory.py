"""The simulated manufacturer: a factory CA kept in the gateway home, trusted by the gateway.

`fleetgate demo` and `fleetgate sim` use one factory per home (`<home>/factory/`), so the
gateway's trust in it survives restarts. Its root is copied into
`<home>/trust/manufacturers/`, which is how an operator trusts a real manufacturer too.
"""

from __future__ import annotations

import hashlib
import secrets
import tomllib
from pathlib import Path

from cryptography import x509

from gateway.config import CONFIG_NAME, Settings
from gateway.home import pem, write_private
from gateway.keystore import EncryptedFileKeyStore
from pki.ca import CertificateAuthority
from pki.clock import Clock, SystemClock
from pki.factory import FactoryCA
from pki.keys import LocalSigner

MANUFACTURER = "Acme Sensors"
MODEL = "TH-200"
FIRMWARE_VERSION = "1.4.2"
# The simulated firmware image is just this text; its sha256 is what devices report.
FIRMWARE_IMAGE = b"acme-th200-firmware-1.4.2"
FIRMWARE_DIGEST = hashlib.sha256(FIRMWARE_IMAGE).hexdigest()


def _load(folder: Path, clock: Clock) -> FactoryCA:
    keys = EncryptedFileKeyStore(folder, (folder / "passphrase").read_bytes().strip())
    root_cert = x509.load_pem_x509_certificate((folder / "root.crt").read_bytes())
    intermediate_cert = x509.load_pem_x509_certificate((folder / "intermediate.crt").read_bytes())
    root = CertificateAuthority(certificate=root_cert, signer=keys.load("root"), chain=())
    intermediate = CertificateAuthority(
        certificate=intermediate_cert, signer=keys.load("intermediate"), chain=(root_cert,)
    )
    return FactoryCA(MANUFACTURER, root, intermediate, clock)


def load_or_create_factory(folder: Path, clock: Clock | None = None) -> FactoryCA:
    clock = clock or SystemClock()
    if (folder / "root.crt").exists():
        return _load(folder, clock)
    passphrase = secrets.token_urlsafe(24).encode()
    write_private(folder / "passphrase", passphrase)
    factory = FactoryCA.create(MANUFACTURER, clock)
    keys = EncryptedFileKeyStore(folder, passphrase)
    for name, ca in (("root", factory.root_ca), ("intermediate", factory.intermediate_ca)):
        assert isinstance(ca.signer, LocalSigner)  # FactoryCA.create makes in-memory keys
        keys.put(name, ca.signer)
    (folder / "root.crt").write_bytes(pem(factory.root))
    (folder / "intermediate.crt").write_bytes(pem(factory.intermediate))
    return factory


def trust_factory(settings: Settings, clock: Clock | None = None) -> FactoryCA:
    """The home's simulated factory, its root placed among the trusted manufacturers."""
    factory, _ = place_factory_root(settings, clock)
    return factory


def place_factory_root(settings: Settings, clock: Clock | None = None) -> tuple[FactoryCA, bool]:
    """The home's simulated factory and whether its root was newly put into the trust folder
    (a running gateway then needs a moment to pick it up)."""
    factory = load_or_create_factory(settings.home / "factory", clock)
    settings.manufacturers_dir.mkdir(parents=True, exist_ok=True)
    path = settings.manufacturers_dir / "simulated-acme.pem"
    root = pem(factory.root)
    placed = not path.exists() or path.read_bytes() != root
    if placed:
        path.write_bytes(root)
    return factory, placed


def allow_simulated_firmware(home: Path) -> bool:
    """Put the simulated firmware on the home's allow-list for the simulated model, so that a
    device reporting any other image is refused (``firmware_not_allowed``). Returns True when
    the list was added; a gateway already running reads it at its next start.

    Without an allow-list for a model, the gateway accepts any firmware of it (unless
    ``require_known_firmware``): the tamper simulation needs this to have anything to refuse.
    An allow-list the operator already wrote for the model is left as it is."""
    path = home / CONFIG_NAME
    text = path.read_text()
    firmware = tomllib.loads(text).get("policy", {}).get("firmware", {})
    if MODEL in firmware:
        return False
    entry = f'"{MODEL}" = ["{FIRMWARE_DIGEST}"]  # the simulated sensors\' image\n'
    lines = text.splitlines(keepends=True)
    header = next(
        (i for i, line in enumerate(lines) if line.strip().startswith("[policy.firmware]")), None
    )
    if header is None:
        if text and not text.endswith("\n"):
            lines.append("\n")
        lines += ["\n[policy.firmware]\n", entry]
    else:
        lines.insert(header + 1, entry)
    path.write_text("".join(lines))
    return True
