"""CA keys in a PKCS#11 token (SoftHSM2): issuance through ``pki.issue.Issuer`` unchanged, a
chain that verifies, CRLs, and a private key that never leaves the token."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from softhsm_support import softhsm_folder

from gateway.enrollment import EnrollmentService
from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.protocol import IssuedCertificate
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.crl import RevokedEntry, build_crl
from pki.errors import KeyStoreError, Reason
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner, Signer, verify_signature
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import assert_is_leaf, assert_profile

pkcs11 = pytest.importorskip("pkcs11", reason="python-pkcs11 is not installed")

from gateway.keystore_pkcs11 import Pkcs11KeyStore, Pkcs11Signer  # noqa: E402  after the skip

LABEL = "fleetgate-test"
# the root (kept in memory), the issuing CA whose key is in the token, and their clock
Hierarchy = tuple[CertificateAuthority, CertificateAuthority, FakeClock]
PIN = "483920-user"
SO_PIN = "771204-so"


def pkilint() -> ModuleType:
    """``lint_support``: the RFC 5280 lints test_reliability_lint.py runs on every certificate
    we issue. Where pkilint is not installed the calling test skips, after its own checks."""
    pytest.importorskip("pkilint", reason="pkilint is not installed")
    import lint_support

    return lint_support


@pytest.fixture(scope="module")
def module_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    module, config = softhsm_folder(tmp_path_factory)
    previous = os.environ.get("SOFTHSM2_CONF")
    # Read by the module when it is first loaded in this process.
    os.environ["SOFTHSM2_CONF"] = str(config)
    made = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", LABEL, "--so-pin", SO_PIN,
         "--pin", PIN],
        capture_output=True, text=True, check=False, timeout=30,
    )
    assert made.returncode == 0, made.stderr
    yield module
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture(scope="module")
def token(module_path: str) -> Iterator[Pkcs11KeyStore]:
    with Pkcs11KeyStore(module_path, token_label=LABEL, pin=PIN) as store:
        yield store


@pytest.fixture(scope="module")
def hierarchy(token: Pkcs11KeyStore) -> Hierarchy:
    """A root kept in memory (as on an offline machine) and an issuing CA whose key lives in the
    token."""
    clock = FakeClock()
    root = create_root_ca(LocalSigner.generate(), "Fleetgate Test Root", clock)
    issuing_key = token.generate("issuing")
    issuing = create_issuing_ca(root, issuing_key, "Fleetgate Token Issuing", clock)
    return root, issuing, clock


def test_a_token_signer_is_a_signer_whose_signatures_verify(token: Pkcs11KeyStore) -> None:
    for key_type in (KeyType.P256, KeyType.P384):
        signer = token.generate(f"plain-{key_type.value}", key_type)
        assert isinstance(signer, Signer) and signer.key_type is key_type
        signature = signer.sign(b"fleetgate")
        assert verify_signature(signer.public_key(), signature, b"fleetgate")
        assert not verify_signature(signer.public_key(), signature, b"fleetgatE")


def test_a_leaf_issued_with_the_token_key_verifies_up_to_the_root(hierarchy: Hierarchy) -> None:
    root, issuing, clock = hierarchy
    template = LeafTemplate(IdentityKind.DEVICE, "dev-1", "fleet.test", timedelta(hours=1))
    device_key = LocalSigner.generate()
    leaf = Issuer(issuing, clock).issue(template, device_key.public_key())
    assert_is_leaf(leaf, kind=IdentityKind.DEVICE, name="dev-1", trust_domain="fleet.test")
    assert_profile(leaf, issuer=issuing.certificate, now=clock.now())
    leaf.verify_directly_issued_by(issuing.certificate)
    verifier = (
        PolicyBuilder()
        .store(Store([root.certificate]))
        .time(clock.now())
        .build_client_verifier()
    )
    verified = verifier.verify(leaf, [issuing.certificate])
    assert verified.chain == [leaf, issuing.certificate, root.certificate]
    # The token signs a TBS that cryptography built; the certificate around it is reassembled
    # by hand (keystore_pkcs11._resign), so it gets the same RFC 5280 lint as every other.
    lints = pkilint()
    assert lints.lint(leaf) == []
    assert lints.lint_chain(issuing.certificate, leaf) == []


def test_a_root_can_live_in_the_token_too(token: Pkcs11KeyStore) -> None:
    clock = FakeClock()
    root = create_root_ca(token.generate("root", KeyType.P384), "Fleetgate Token Root", clock)
    root.certificate.verify_directly_issued_by(root.certificate)
    issuing = create_issuing_ca(root, LocalSigner.generate(), "Fleetgate Issuing", clock)
    issuing.certificate.verify_directly_issued_by(root.certificate)
    lints = pkilint()
    assert lints.lint(root.certificate) == [] and lints.lint(issuing.certificate) == []
    assert lints.lint_chain(root.certificate, root.certificate) == []
    assert lints.lint_chain(root.certificate, issuing.certificate) == []


def test_a_crl_signed_in_the_token_verifies(hierarchy: Hierarchy) -> None:
    _, issuing, clock = hierarchy
    crl = build_crl(issuing, [RevokedEntry(4711, clock.now())], clock, timedelta(days=1), 7)
    ca_key = issuing.certificate.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.get_revoked_certificate_by_serial_number(4711) is not None
    assert pkilint().lint_crl(crl) == []


def test_a_device_enrolls_against_a_token_backed_ca(hierarchy: Hierarchy) -> None:
    _, issuing, clock = hierarchy
    gw = LoopbackGateway(clock=clock)
    gw.issuer = Issuer(issuing, clock)
    gw.service = EnrollmentService(gw.store, gw.issuer, gw.policy, clock)
    credential = gw.mint("dev-7")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask("dev-7", request)
    assert isinstance(answer, IssuedCertificate)
    x509.load_der_x509_certificate(answer.certificate).verify_directly_issued_by(
        issuing.certificate
    )


def test_the_private_key_never_leaves_the_token(
    token: Pkcs11KeyStore, hierarchy: Hierarchy
) -> None:
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import AttributeSensitive

    signer = token.load("issuing")
    private = token._session.get_key(object_class=ObjectClass.PRIVATE_KEY, label="issuing")
    assert private[Attribute.SENSITIVE] is True
    assert private[Attribute.EXTRACTABLE] is False
    assert private[Attribute.NEVER_EXTRACTABLE] is True
    assert private[Attribute.LOCAL] is True  # generated inside, never imported
    with pytest.raises(AttributeSensitive):
        private[Attribute.VALUE]
    # The only private key this process holds is the stand-in, which is not the CA's.
    held = [v for v in vars(signer).values() if isinstance(v, ec.EllipticCurvePrivateKey)]
    assert len(held) == 1
    assert held[0].public_key() != signer.public_key()


WRONG_PIN_PROBE = """
import sys
from gateway.keystore_pkcs11 import Pkcs11KeyStore
from pki.errors import KeyStoreError
try:
    Pkcs11KeyStore(sys.argv[1], token_label=sys.argv[2], pin="000000-wrong")
except KeyStoreError as error:
    print(error.reason.value, error)
"""


def test_a_wrong_pin_is_refused_without_showing_it(module_path: str) -> None:
    # In a process of its own: a PKCS#11 login is per process, and this one is logged in.
    probe = subprocess.run(
        [sys.executable, "-c", WRONG_PIN_PROBE, module_path, LABEL],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert probe.stdout.startswith("wrong_passphrase "), probe.stdout + probe.stderr
    assert "000000-wrong" not in probe.stdout + probe.stderr


def test_token_errors_are_typed_and_hold_no_pin(module_path: str, token: Pkcs11KeyStore) -> None:
    with pytest.raises(KeyStoreError) as no_token:
        Pkcs11KeyStore(module_path, token_label="no-such-token", pin=PIN)
    assert no_token.value.reason is Reason.KEY_NOT_FOUND
    with pytest.raises(KeyStoreError) as no_module:
        Pkcs11KeyStore("/nonexistent/libpkcs11.so", token_label=LABEL, pin=PIN)
    assert no_module.value.reason is Reason.KEY_NOT_FOUND
    with pytest.raises(KeyStoreError) as missing:
        token.load("absent")
    assert missing.value.reason is Reason.KEY_NOT_FOUND
    assert not token.exists("absent")
    token.generate("taken")
    assert token.exists("taken")
    with pytest.raises(KeyStoreError) as exists:
        token.generate("taken")
    assert exists.value.reason is Reason.KEY_EXISTS
    with pytest.raises(KeyStoreError) as ed25519:
        token.generate("edwards", KeyType.ED25519)
    assert ed25519.value.reason is Reason.KEY_NOT_ALLOWED
    with pytest.raises(ValueError):
        token.load("../escape")
    with pytest.raises(TypeError):
        Pkcs11KeyStore(module_path, token_label=LABEL, pin="")
    assert PIN not in repr(token) and PIN not in repr(token.load("taken"))
    assert isinstance(token.load("taken"), Pkcs11Signer)


def test_a_deleted_key_is_gone_and_a_store_closes_once(
    module_path: str, token: Pkcs11KeyStore
) -> None:
    """What `fleetgate init --force` relies on to replace a token's issuing key, and what a
    gateway's shutdown relies on to end its session without an error."""
    first = token.generate("replaced")
    assert token.delete("replaced") is True
    assert not token.exists("replaced")
    assert token.delete("replaced") is False  # nothing left to destroy
    second = token.generate("replaced")
    assert second.public_key() != first.public_key()
    with pytest.raises(ValueError):
        token.delete("../escape")
    # A second store of this process (it shares the login): closed twice, quietly.
    other = Pkcs11KeyStore(module_path, token_label=LABEL, pin=PIN)
    other.close()
    other.close()
    assert token.exists("replaced")  # the first store's session is untouched
