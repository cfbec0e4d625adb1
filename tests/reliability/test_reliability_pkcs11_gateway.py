"""A running gateway whose issuing CA's key lives in a PKCS#11 token (SoftHSM2): `fleetgate
init --key-store pkcs11` makes the key there, `fleetgate run` signs every certificate there,
and a wrong PIN, a missing token or a replaced key stop it with a clear error that never shows
the PIN.

Everything that touches the token runs in a child process (the CLI, or a small probe): a
PKCS#11 login belongs to a process, and SoftHSM2 reads its configuration once per process, so
the test process itself never loads the module.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import PolicyBuilder, Store
from reliability_support import FieldDevice, GatewayProcess, fleetgate, free_port
from softhsm_support import softhsm_folder

from gateway.config import CONFIG_NAME, PKCS11_PIN_ENV, load_settings
from simulators.factory import MODEL, trust_factory

pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")
pytestmark = pytest.mark.slow  # every test runs `fleetgate` a few times

PIN = "730215-user"
SO_PIN = "118634-so"
WRONG_PIN = "999999-wrong"


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 token folder of its own (not the user's), for child processes only."""

    module: str
    config: Path

    def env(self, pin: str | None = PIN) -> dict[str, str]:
        environment = {"SOFTHSM2_CONF": str(self.config)}
        if pin is not None:
            environment[PKCS11_PIN_ENV] = pin
        return environment

    def add_token(self, label: str) -> None:
        made = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
             "--pin", PIN],
            capture_output=True, text=True, check=False, timeout=30,
            env={**os.environ, **self.env()},
        )
        assert made.returncode == 0, made.stderr

    def init(self, home: Path, label: str, *extra: str, pin: str | None = PIN) -> (
        subprocess.CompletedProcess[str]
    ):
        return fleetgate(
            "init", "--home", str(home), "--key-store", "pkcs11", "--pkcs11-module", self.module,
            "--pkcs11-token", label, *extra,
            env=self._without_pin(pin),
        )

    def run(self, home: Path, pin: str | None = PIN) -> subprocess.CompletedProcess[str]:
        """`fleetgate run` expected to stop at start: its output, whatever the exit code."""
        return fleetgate("run", "--home", str(home), env=self._without_pin(pin), timeout=60)

    def _without_pin(self, pin: str | None) -> dict[str, str]:
        # os.environ may hold a PIN of the user's: a test of a missing one must not see it.
        environment = {k: v for k, v in os.environ.items() if k != PKCS11_PIN_ENV}
        # wide enough that rich does not break a message (or a path in it) across lines
        return {**environment, "COLUMNS": "500", **self.env(pin)}


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    module, config = softhsm_folder(tmp_path_factory)
    yield SoftHsm(module, config)


PROBE = """
import json, os, sys
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import AttributeSensitive
from gateway.keystore_pkcs11 import Pkcs11KeyStore

module, label = sys.argv[1:3]
with Pkcs11KeyStore(module, token_label=label, pin=os.environ["FLEETGATE_PKCS11_PIN"]) as token:
    private = token._session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="issuing")
    try:
        private[Attribute.VALUE]
        value_readable = True
    except AttributeSensitive:
        value_readable = False
    public = token.load("issuing").public_key()
    print(json.dumps({
        "sensitive": private[Attribute.SENSITIVE],
        "extractable": private[Attribute.EXTRACTABLE],
        "never_extractable": private[Attribute.NEVER_EXTRACTABLE],
        "local": private[Attribute.LOCAL],
        "value_readable": value_readable,
        "public": public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex(),
    }))
"""


def token_key(softhsm: SoftHsm, label: str) -> dict[str, object]:
    """What the token says about its issuing key, asked from a process of its own."""
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, softhsm.module, label],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, **softhsm.env()},
    )
    assert probe.returncode == 0, probe.stderr
    found: dict[str, object] = json.loads(probe.stdout)
    return found


def on_free_ports(home: Path) -> None:
    path = home / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["broker"]["enrollment_port"] = free_port()
    data["broker"]["operational_port"] = free_port()
    path.write_text(tomli_w.dumps(data))


def private_key_files(home: Path) -> set[str]:
    """The files of the home holding a private key, but for the simulated manufacturer's
    (``factory/``, which trust_factory puts there for the test devices)."""
    return {
        str(path.relative_to(home))
        for path in home.rglob("*")
        if path.is_file()
        and path.relative_to(home).parts[0] != "factory"
        and b"PRIVATE KEY" in path.read_bytes()
    }


def spki(certificate: x509.Certificate) -> str:
    key = certificate.public_key()
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo).hex()


@pytest.mark.broker
async def test_a_gateway_issues_with_its_issuing_key_in_the_token(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    softhsm.add_token("fg-run")
    home = tmp_path / "gw"
    made = softhsm.init(home, "fg-run", "--key-type", "p384")
    assert made.returncode == 0, made.stdout + made.stderr
    assert "PKCS#11 token 'fg-run'" in made.stdout
    settings = load_settings(home)
    assert settings.ca.uses_token
    assert (settings.ca.pkcs11_module, settings.ca.pkcs11_token_label) == (softhsm.module, "fg-run")
    # The root and audit keys are encrypted files; the issuing key is nowhere in the home.
    assert not (home / "ca" / "issuing.key").exists()
    assert private_key_files(home) == {"ca/root.key", "ca/audit.key"}

    # Made in the token, sensitive and not extractable: the token says so itself.
    key = token_key(softhsm, "fg-run")
    assert key["sensitive"] is True and key["extractable"] is False
    assert key["never_extractable"] is True and key["local"] is True
    assert key["value_readable"] is False
    root = x509.load_pem_x509_certificate((home / "ca" / "root.crt").read_bytes())
    issuing = x509.load_pem_x509_certificate((home / "ca" / "issuing.crt").read_bytes())
    assert key["public"] == spki(issuing)

    on_free_ports(home)
    settings = load_settings(home)
    factory = trust_factory(settings)
    gateway = GatewayProcess(settings)
    gateway.start(env=softhsm.env())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, gateway.wait_ready)
    try:
        device = FieldDevice(
            factory.mint("hsm-0001", MODEL),
            (home / "ca" / "root.crt").read_bytes(),
            settings,
            renewals=1,
        )
        run = await device.go(loop.time() + 45)
    finally:
        assert gateway.stop() == 0, gateway.output()
    assert run.rejections == []
    assert len(run.certificates) == 2  # the enrollment and one renewal, both signed in the token
    for leaf in run.certificates:
        verified = (
            PolicyBuilder()
            .store(Store([root]))
            .time(leaf.not_valid_before_utc)
            .build_client_verifier()
            .verify(leaf, [issuing])
        )
        assert verified.chain == [leaf, issuing, root]
    assert PIN not in gateway.output()
    assert private_key_files(home) == {"ca/root.key", "ca/audit.key"}


def test_a_wrong_or_missing_pin_stops_init_and_run_without_showing_it(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    softhsm.add_token("fg-pin")
    refused = softhsm.init(tmp_path / "wrong", "fg-pin", pin=WRONG_PIN)
    assert refused.returncode == 1
    assert "the PIN of token 'fg-pin' was refused" in refused.stderr
    assert f"${PKCS11_PIN_ENV}" in refused.stderr
    assert not (tmp_path / "wrong").exists()  # nothing written before the token said yes
    no_pin = softhsm.init(tmp_path / "nopin", "fg-pin", pin=None)
    assert no_pin.returncode == 1 and f"no PKCS#11 PIN: set ${PKCS11_PIN_ENV}" in no_pin.stderr

    home = tmp_path / "gw"
    assert softhsm.init(home, "fg-pin").returncode == 0
    wrong = softhsm.run(home, pin=WRONG_PIN)
    assert wrong.returncode == 1
    assert (
        "cannot open the gateway's keys: wrong_passphrase: the PIN of token 'fg-pin' was refused"
        in wrong.stderr
    )
    missing = softhsm.run(home, pin=None)
    assert missing.returncode == 1
    assert f"no PKCS#11 PIN: set ${PKCS11_PIN_ENV}" in missing.stderr
    for result in (refused, no_pin, wrong, missing):
        output = result.stdout + result.stderr
        assert WRONG_PIN not in output and PIN not in output
        assert "Traceback" not in output


def test_a_missing_token_or_key_stops_the_gateway_with_what_is_missing(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    softhsm.add_token("fg-home")
    softhsm.add_token("fg-empty")
    home = tmp_path / "gw"
    assert softhsm.init(home, "fg-home").returncode == 0
    config = home / CONFIG_NAME
    original = config.read_text()

    config.write_text(original.replace('"fg-home"', '"fg-absent"'))
    absent = softhsm.run(home)
    assert absent.returncode == 1
    assert "no PKCS#11 token labelled 'fg-absent'" in absent.stderr

    config.write_text(original.replace('"fg-home"', '"fg-empty"'))
    empty = softhsm.run(home)
    assert empty.returncode == 1
    assert "token 'fg-empty' holds no key named 'issuing'" in empty.stderr

    config.write_text(original.replace(softhsm.module, "/nonexistent/libpkcs11.so"))
    no_module = softhsm.run(home)
    assert no_module.returncode == 1 and "ca.pkcs11_module" in no_module.stderr
    for result in (absent, empty, no_module):
        assert PIN not in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_init_refuses_a_token_that_holds_an_issuing_key_unless_forced(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    softhsm.add_token("fg-force")
    first, second = tmp_path / "first", tmp_path / "second"
    assert softhsm.init(first, "fg-force").returncode == 0
    first_key = token_key(softhsm, "fg-force")["public"]

    taken = softhsm.init(second, "fg-force")
    assert taken.returncode == 1
    assert "token 'fg-force' already holds a key named 'issuing'" in taken.stderr
    assert not second.exists()
    assert token_key(softhsm, "fg-force")["public"] == first_key  # untouched

    forced = softhsm.init(second, "fg-force", "--force")
    assert forced.returncode == 0, forced.stderr
    second_issuing = x509.load_pem_x509_certificate((second / "ca" / "issuing.crt").read_bytes())
    assert token_key(softhsm, "fg-force")["public"] == spki(second_issuing) != first_key
    # The first home's issuing.crt no longer matches the token's key: refused at start, not
    # found out at the first certificate that fails to verify.
    stale = softhsm.run(first)
    assert stale.returncode == 1
    assert "is not the key of" in stale.stderr and "issuing.crt" in stale.stderr

    # An ed25519 CA cannot be made in a token; refused before anything is written.
    edwards = softhsm.init(tmp_path / "edwards", "fg-force", "--key-type", "ed25519")
    assert edwards.returncode == 1 and "p256 or p384" in edwards.stderr
    assert not (tmp_path / "edwards").exists()
    assert token_key(softhsm, "fg-force")["public"] == spki(second_issuing)


def test_init_keeps_to_the_key_store_an_existing_file_names(
    softhsm: SoftHsm, tmp_path: Path
) -> None:
    """fleetgate.toml written before init is kept: options that contradict it are refused, and
    without options it decides where the key goes."""
    softhsm.add_token("fg-toml")
    home = tmp_path / "gw"
    home.mkdir()
    (home / CONFIG_NAME).write_text('[ca]\nkey_store = "file"\n')
    contradicted = softhsm.init(home, "fg-toml")
    assert contradicted.returncode == 1
    assert "ca.key_store = 'file', not 'pkcs11'" in contradicted.stderr
    assert not (home / "ca").exists()

    (home / CONFIG_NAME).write_text(
        f'[ca]\nkey_store = "pkcs11"\npkcs11_module = "{softhsm.module}"\n'
        'pkcs11_token_label = "fg-toml"\n'
    )
    decided = fleetgate("init", "--home", str(home), env=softhsm.env())
    assert decided.returncode == 0, decided.stderr
    assert not (home / "ca" / "issuing.key").exists()
    issuing = x509.load_pem_x509_certificate((home / "ca" / "issuing.crt").read_bytes())
    assert token_key(softhsm, "fg-toml")["public"] == spki(issuing)
