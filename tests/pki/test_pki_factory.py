from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID

from pki.clock import FakeClock
from pki.factory import BirthCredential, FactoryCA
from pki.keys import KeyType, LocalSigner
from pki.testing import assert_is_ca, assert_profile


@pytest.fixture
def factory(clock: FakeClock) -> FactoryCA:
    return FactoryCA.create("Acme Sensors", clock)


def test_factory_is_root_and_one_intermediate(factory: FactoryCA, clock: FakeClock) -> None:
    assert_is_ca(factory.root, path_length=1)
    assert_is_ca(factory.intermediate, path_length=0)
    assert_profile(factory.intermediate, issuer=factory.root, now=clock.now())
    for cert in (factory.root, factory.intermediate):
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        assert [a.value for a in orgs] == ["Acme Sensors"]
    assert factory.manufacturer == "Acme Sensors"
    assert factory.intermediate_ca.certificate == factory.intermediate


@pytest.mark.parametrize("key_type", list(KeyType))
def test_birth_certificate_is_an_idevid(
    factory: FactoryCA, clock: FakeClock, key_type: KeyType
) -> None:
    credential = factory.mint("SN-0001", "TH-200", key_type=key_type)
    cert = credential.certificate
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {
        NameOID.ORGANIZATION_NAME: "Acme Sensors",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "TH-200",
        NameOID.SERIAL_NUMBER: "SN-0001",
        NameOID.COMMON_NAME: "TH-200 SN-0001",
    }
    oids = {e.oid for e in cert.extensions}
    assert oids == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }  # no SAN, no EKU
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert_profile(cert, issuer=factory.intermediate, now=clock.now())
    assert credential.chain == (factory.intermediate,)
    assert credential.presented_chain == (cert, factory.intermediate)
    assert credential.signer.key_type is key_type
    assert credential.signer.public_key() == cert.public_key()
    assert (credential.serial_number, credential.model, credential.manufacturer) == (
        "SN-0001",
        "TH-200",
        "Acme Sensors",
    )
    assert credential.device_id == "SN-0001"


def test_mint_window_is_adjustable(factory: FactoryCA, clock: FakeClock) -> None:
    default = factory.mint("a1", "M").certificate
    assert default.not_valid_before_utc == clock.now() - timedelta(seconds=60)
    assert default.not_valid_after_utc == default.not_valid_before_utc + timedelta(days=3650)
    start = clock.now() + timedelta(days=2)
    future = factory.mint("a2", "M", not_before=start, lifetime=timedelta(days=1)).certificate
    assert future.not_valid_before_utc == start
    assert future.not_valid_after_utc == start + timedelta(days=1)


@pytest.mark.parametrize("serial", ["", "has space", "a/b", "-x", "x" * 65])
def test_serial_number_must_be_a_device_id(factory: FactoryCA, serial: str) -> None:
    with pytest.raises(ValueError):
        factory.mint(serial, "TH-200")


@pytest.mark.parametrize("model", ["", "   ", "x" * 65, "line\nbreak"])
def test_model_must_be_printable_text(factory: FactoryCA, model: str) -> None:
    with pytest.raises(ValueError):
        factory.mint("SN-1", model)


def test_bad_mint_windows(factory: FactoryCA, clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        factory.mint("SN-1", "M", lifetime=timedelta(0))
    with pytest.raises(TypeError):
        factory.mint("SN-1", "M", lifetime=10)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        factory.mint("SN-1", "M", not_before=clock.now().replace(tzinfo=None))


def test_manufacturer_ca_keys_are_ecdsa(clock: FakeClock) -> None:
    assert FactoryCA.create("Acme", clock, KeyType.P384).root.signature_hash_algorithm is not None
    with pytest.raises(ValueError, match="P-256 or P-384"):
        FactoryCA.create("Acme", clock, KeyType.ED25519)


def test_manufacturer_must_be_printable_text(clock: FakeClock) -> None:
    with pytest.raises(ValueError):
        FactoryCA.create("", clock)
    with pytest.raises(TypeError):
        FactoryCA.create(None, clock)  # type: ignore[arg-type]


def test_factory_refuses_an_intermediate_from_another_root(clock: FakeClock) -> None:
    one, two = FactoryCA.create("One", clock), FactoryCA.create("Two", clock)
    with pytest.raises(ValueError, match="not issued by root"):
        FactoryCA("One", one.root_ca, two.intermediate_ca, clock)


def test_credential_validates_its_fields(factory: FactoryCA) -> None:
    good = factory.mint("SN-1", "M")
    with pytest.raises(ValueError):
        BirthCredential(good.signer, good.certificate, good.chain, "bad id", "M", "Acme")
    with pytest.raises(TypeError):
        BirthCredential("key", good.certificate, good.chain, "SN-1", "M", "Acme")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BirthCredential(LocalSigner.generate(), b"der", (), "SN-1", "M", "Acme")  # type: ignore[arg-type]
