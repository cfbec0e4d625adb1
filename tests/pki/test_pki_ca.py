from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import assert_is_ca, assert_profile


@pytest.mark.parametrize("key_type", list(KeyType))
def test_root_and_issuing_ca_profiles(clock: FakeClock, key_type: KeyType) -> None:
    root = create_root_ca(LocalSigner.generate(key_type), "Fleet Root", clock)
    issuing = create_issuing_ca(root, LocalSigner.generate(key_type), "Fleet Issuing", clock)
    assert_is_ca(root.certificate, path_length=1)
    assert_is_ca(issuing.certificate, path_length=0)
    assert_profile(root.certificate, issuer=root.certificate, now=clock.now())
    assert_profile(issuing.certificate, issuer=root.certificate, now=clock.now())
    assert root.chain == () and root.is_root and root.root == root.certificate
    assert issuing.chain == (root.certificate,) and issuing.root == root.certificate
    assert not issuing.is_root
    assert issuing.certificate.subject.rfc4514_string() == "CN=Fleet Issuing"


def test_validity_windows_follow_the_clock(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock, timedelta(days=100))
    assert root.certificate.not_valid_before_utc == clock.now() - timedelta(seconds=60)
    assert root.certificate.not_valid_after_utc == clock.now() + timedelta(days=100)
    clock.advance(timedelta(days=10))
    issuing = create_issuing_ca(root, LocalSigner.generate(), "Issuing", clock)
    assert issuing.certificate.not_valid_before_utc == clock.now() - timedelta(seconds=60)
    assert issuing.certificate.not_valid_after_utc == clock.now() + timedelta(days=180 - 90)


def test_issuing_ca_is_capped_by_its_parent(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock, timedelta(days=30))
    issuing = create_issuing_ca(root, LocalSigner.generate(), "I", clock, timedelta(days=365))
    assert issuing.certificate.not_valid_after_utc == root.certificate.not_valid_after_utc


def test_issuing_ca_not_before_stays_inside_the_parent(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock)
    clock.set(clock.now() - timedelta(hours=1))  # clock stepped back after the root was made
    issuing = create_issuing_ca(root, LocalSigner.generate(), "Issuing", clock)
    assert issuing.certificate.not_valid_before_utc == root.certificate.not_valid_before_utc


def test_no_issuing_ca_from_an_expired_parent(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock, timedelta(days=1))
    clock.advance(timedelta(days=2))
    with pytest.raises(ValueError, match="expired"):
        create_issuing_ca(root, LocalSigner.generate(), "Issuing", clock)


def test_organization_goes_into_the_subject(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Acme Root", clock, organization="Acme")
    orgs = root.certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in orgs] == ["Acme"]


def test_serial_comes_from_injected_randomness(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock, random_bits=lambda bits: 4242)
    assert root.certificate.serial_number == 4242


@pytest.mark.parametrize("name", ["", "   ", "x" * 65, "tab\there"])
def test_bad_common_names(clock: FakeClock, name: str) -> None:
    with pytest.raises(ValueError):
        create_root_ca(LocalSigner.generate(), name, clock)


def test_bad_lifetimes_and_path_lengths(clock: FakeClock) -> None:
    signer = LocalSigner.generate()
    with pytest.raises(ValueError):
        create_root_ca(signer, "Root", clock, timedelta(minutes=5))
    with pytest.raises(TypeError):
        create_root_ca(signer, "Root", clock, 3600)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        create_root_ca(signer, "Root", clock, path_length=-1)
    with pytest.raises(TypeError):
        create_root_ca(signer, 7, clock)  # type: ignore[arg-type]


def test_authority_value_checks_key_match_and_ca_flag(clock: FakeClock) -> None:
    root = create_root_ca(LocalSigner.generate(), "Root", clock)
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority(root.certificate, LocalSigner.generate())
    with pytest.raises(TypeError):
        CertificateAuthority(root.certificate, "signer")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CertificateAuthority(root.certificate.public_bytes, root.signer)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CertificateAuthority(root.certificate, root.signer, ("x",))  # type: ignore[arg-type]


def test_authority_refuses_a_leaf_certificate(issuer: Issuer) -> None:
    signer = LocalSigner.generate()
    leaf = issuer.issue(
        LeafTemplate(IdentityKind.DEVICE, "d", "fleet.example", timedelta(hours=1)),
        signer.public_key(),
    )
    with pytest.raises(ValueError, match="not a CA"):
        CertificateAuthority(leaf, signer)


def test_ca_without_basic_constraints_is_refused(clock: FakeClock) -> None:
    signer = LocalSigner.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")])
    cert = signer.sign_certificate(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(clock.now())
        .not_valid_after(clock.now() + timedelta(days=1))
    )
    with pytest.raises(ValueError, match="BasicConstraints"):
        CertificateAuthority(cert, signer)
