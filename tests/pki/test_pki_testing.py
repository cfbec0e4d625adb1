"""The certificate assertions must fail on certificates that break them, or they prove nothing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pki.clock import FakeClock
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import assert_is_ca, assert_is_leaf, assert_profile, make_issuing_ca

HOUR = timedelta(hours=1)


@pytest.fixture
def leaf(issuer: Issuer) -> x509.Certificate:
    template = LeafTemplate(IdentityKind.DEVICE, "sensor-1", "fleet.example", HOUR)
    return issuer.issue(template, LocalSigner.generate().public_key())


def test_make_issuing_ca_gives_root_and_issuing(clock: FakeClock) -> None:
    ca = make_issuing_ca(clock)
    assert_is_ca(ca.root, path_length=1)
    assert_is_ca(ca.certificate, path_length=0)
    assert ca.chain == (ca.root,)


def test_assert_is_ca_fails_on_a_leaf_and_on_wrong_path_length(
    issuer: Issuer, leaf: x509.Certificate
) -> None:
    with pytest.raises(AssertionError, match="CA must be TRUE"):
        assert_is_ca(leaf)
    with pytest.raises(AssertionError, match="path length"):
        assert_is_ca(issuer.ca.certificate, path_length=3)
    assert_is_ca(issuer.ca.certificate)  # ... means "any path length"


def test_assert_is_leaf_fails_on_each_mismatch(issuer: Issuer, leaf: x509.Certificate) -> None:
    good = {"kind": IdentityKind.DEVICE, "name": "sensor-1", "trust_domain": "fleet.example"}
    assert_is_leaf(leaf, **good)  # type: ignore[arg-type]
    for change in (
        {"name": "sensor-2"},
        {"kind": IdentityKind.OPERATOR},
        {"trust_domain": "other.example"},
        {"server": True},
    ):
        with pytest.raises(AssertionError):
            assert_is_leaf(leaf, **{**good, **change})  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        assert_is_leaf(issuer.ca.certificate, **good)  # type: ignore[arg-type]


def test_assert_is_leaf_checks_server_names(issuer: Issuer) -> None:
    template = LeafTemplate(
        IdentityKind.SERVICE, "broker", "fleet.example", HOUR, server=True, dns_names=("a.b",)
    )
    cert = issuer.issue(template, LocalSigner.generate().public_key())
    common = {"kind": IdentityKind.SERVICE, "name": "broker", "trust_domain": "fleet.example"}
    assert_is_leaf(cert, **common, server=True, dns_names=("a.b",), ip_addresses=())  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="DNS"):
        assert_is_leaf(cert, **common, server=True, dns_names=("c.d",))  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="IP"):
        assert_is_leaf(cert, **common, server=True, ip_addresses=("::1",))  # type: ignore[arg-type]


def test_assert_profile_fails_on_wrong_issuer_and_time(
    issuer: Issuer, leaf: x509.Certificate, clock: FakeClock
) -> None:
    assert_profile(leaf, issuer=issuer.ca.certificate, now=clock.now())
    with pytest.raises(AssertionError, match="issuer"):
        assert_profile(leaf, issuer=issuer.ca.root)
    with pytest.raises(AssertionError, match="not valid"):
        assert_profile(leaf, now=clock.now() + timedelta(days=1))


def test_assert_profile_fails_without_key_identifier(clock: FakeClock) -> None:
    signer = LocalSigner.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bare")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(clock.now())
        .not_valid_after(clock.now() + HOUR)
        .sign(signer.private_key, hashes.SHA256())
    )
    with pytest.raises(AssertionError, match="subjectKeyIdentifier"):
        assert_profile(cert)
