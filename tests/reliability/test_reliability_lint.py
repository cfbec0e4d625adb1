"""Every kind of certificate Fleetgate issues passes pkilint's RFC 5280 lints: roots, issuing
CAs, device, operator and broker leaves (for every CA key type and every accepted leaf key),
birth certificates of the simulated factory, issuer/subject chains, and the CRL.

The lints and the two known false positives they set aside are in ``lint_support``; the
certificates a PKCS#11 token signs are linted in test_reliability_pkcs11.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from reliability_support import make_home

from gateway.enrollment.testing import LoopbackGateway, build_enroll
from gateway.protocol import IssuedCertificate
from gateway.service import Gateway
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.crl import RevokedEntry, build_crl
from pki.factory import FactoryCA
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate

pytest.importorskip("pkilint", reason="pkilint is not installed")

from lint_support import lint, lint_chain, lint_crl


@dataclass(frozen=True)
class Issued:
    root: CertificateAuthority
    issuing: CertificateAuthority
    leaves: dict[str, x509.Certificate]


def issue_everything(key_type: KeyType) -> Issued:
    clock = FakeClock()
    root = create_root_ca(LocalSigner.generate(key_type), "Fleetgate Root CA fleet.test", clock)
    issuing = create_issuing_ca(
        root, LocalSigner.generate(key_type), "Fleetgate Issuing CA fleet.test", clock
    )
    issuer = Issuer(issuing, clock)
    hour = timedelta(hours=1)
    leaves = {
        "operator": issuer.issue(
            LeafTemplate(IdentityKind.OPERATOR, "alice", "fleet.test", timedelta(hours=8)),
            LocalSigner.generate().public_key(),
        ),
        "broker": issuer.issue(
            LeafTemplate(
                IdentityKind.SERVICE, "broker", "fleet.test", timedelta(days=7), server=True,
                dns_names=("gateway.plant-7.example", "localhost"), ip_addresses=("127.0.0.1",),
            ),
            LocalSigner.generate().public_key(),
        ),
    }
    for leaf_key in (KeyType.P256, KeyType.P384, KeyType.ED25519):
        leaves[f"device-{leaf_key.value}"] = issuer.issue(
            LeafTemplate(IdentityKind.DEVICE, f"dev-{leaf_key.value}", "fleet.test", hour),
            LocalSigner.generate(leaf_key).public_key(),
        )
    leaves["device-rsa2048"] = issuer.issue(
        LeafTemplate(IdentityKind.DEVICE, "dev-rsa", "fleet.test", hour),
        rsa.generate_private_key(65537, 2048).public_key(),
    )
    return Issued(root, issuing, leaves)


@pytest.fixture(scope="module", params=list(KeyType), ids=str)
def issued(request: pytest.FixtureRequest) -> Issued:
    return issue_everything(request.param)


def test_root_and_issuing_ca_pass_the_lint(issued: Issued) -> None:
    assert lint(issued.root.certificate) == []
    assert lint(issued.issuing.certificate) == []
    assert lint_chain(issued.root.certificate, issued.root.certificate) == []
    assert lint_chain(issued.root.certificate, issued.issuing.certificate) == []


def test_every_leaf_passes_the_lint_and_chains_to_its_issuer(issued: Issued) -> None:
    for kind, leaf in issued.leaves.items():
        assert lint(leaf) == [], kind
        assert lint_chain(issued.issuing.certificate, leaf) == [], kind


def test_the_crl_passes_the_lint(issued: Issued) -> None:
    clock = FakeClock()
    revoked = [RevokedEntry(serial, clock.now()) for serial in (1, 2**158 + 5)]
    signed = build_crl(issued.issuing, revoked, clock, timedelta(days=1), 42)
    assert lint_crl(signed) == []


def test_the_certificate_a_device_receives_passes_the_lint() -> None:
    gw = LoopbackGateway()
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask("dev-1", request)
    assert isinstance(answer, IssuedCertificate)
    leaf = x509.load_der_x509_certificate(answer.certificate)
    assert lint(leaf) == []
    assert lint_chain(gw.issuing_ca.certificate, leaf) == []


def test_the_gateways_own_ca_and_broker_certificate_pass_the_lint(tmp_path: Path) -> None:
    settings, _ = make_home(tmp_path / "gw")
    gateway = Gateway(settings)
    root, issuing = gateway.root_certificate, gateway.issuing.certificate
    broker_chain = x509.load_pem_x509_certificates(gateway._broker_tls().server_cert_pem)
    broker = broker_chain[0]
    for cert in (root, issuing, broker):
        assert lint(cert) == [], cert.subject.rfc4514_string()
    assert lint_chain(root, issuing) == []
    assert lint_chain(issuing, broker) == []


def test_birth_certificates_of_the_simulated_factory_pass_the_lint() -> None:
    factory = FactoryCA.create("Acme Sensors", FakeClock())
    credential = factory.mint("sn-0001", "TH-200")
    for cert in (factory.root, factory.intermediate, credential.certificate):
        assert lint(cert) == [], cert.subject.rfc4514_string()
    assert lint_chain(factory.intermediate, credential.certificate) == []


def test_the_lint_finds_real_problems() -> None:
    """The filter above lets through only the two documented false positives."""
    clock = FakeClock()
    key = LocalSigner.generate()
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(clock.now())
        .not_valid_after(clock.now() + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("not a name"), x509.UniformResourceIdentifier("mailto:x")]
            ),
            critical=False,
        )
        .sign(key.private_key, hashes.SHA256())
    )
    codes = {finding.code for finding in lint(bad)}
    expected = {"pkix.invalid_domain_name_syntax", "pkix.invalid_uri_syntax", "pkix.name_empty"}
    assert expected <= codes, codes
