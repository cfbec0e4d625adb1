"""A CSR that asks for more than a leaf of its own identity is refused (``csr_overreach``), and
what the cryptography project's bad CSRs get from ``check_csr`` itself."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

from pki.csr import CsrIdentity, check_csr
from pki.errors import CsrRejected, Reason
from pki.keys import LocalSigner

IDENTITY = CsrIdentity(common_name="sensor-7", spiffe_id="spiffe://fleet.example/device/sensor-7")
OWN_URI = x509.UniformResourceIdentifier(IDENTITY.spiffe_id)


def csr(
    *extensions: tuple[x509.ExtensionType, bool], common_name: str | None = "sensor-7"
) -> bytes:
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder(
        x509.Name(attributes), [x509.Extension(v.oid, critical, v) for v, critical in extensions]
    )
    key = LocalSigner.generate().private_key
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def key_usage(*, cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=crl_sign, encipher_only=False, decipher_only=False,
    )


UNKNOWN = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.7"), b"\x05\x00")

OVERREACH = {
    "ca_true": csr((x509.BasicConstraints(ca=True, path_length=0), True)),
    "key_cert_sign": csr((key_usage(cert_sign=True), True)),
    "crl_sign": csr((key_usage(crl_sign=True), False)),
    "unknown_critical": csr((UNKNOWN, True)),
    "another_devices_uri": csr(
        (x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            "spiffe://fleet.example/device/sensor-8")]), False)
    ),
    "extra_dns_name": csr(
        (x509.SubjectAlternativeName([OWN_URI, x509.DNSName("a.example")]), False)
    ),
    "another_common_name": csr(common_name="sensor-8"),
}


@pytest.mark.parametrize("name", sorted(OVERREACH))
def test_asking_for_more_than_a_leaf_of_its_own_identity_is_refused(name: str) -> None:
    with pytest.raises(CsrRejected) as refused:
        check_csr(OVERREACH[name], identity=IDENTITY)
    assert refused.value.reason is Reason.CSR_OVERREACH
    assert refused.value.detail


@pytest.mark.parametrize(
    "data",
    [
        csr(),
        csr(common_name=None),
        csr((x509.SubjectAlternativeName([OWN_URI]), False)),
        csr(
            (UNKNOWN, False),
            (key_usage(), True),
            (x509.BasicConstraints(ca=False, path_length=None), True),
        ),
    ],
    ids=["own_common_name", "empty_subject", "own_spiffe_id", "harmless_extensions"],
)
def test_a_csr_naming_only_its_own_identity_passes(data: bytes) -> None:
    assert check_csr(data, identity=IDENTITY).der == data


def test_without_an_identity_names_are_not_judged_but_powers_are() -> None:
    check_csr(OVERREACH["another_common_name"])
    check_csr(OVERREACH["extra_dns_name"])
    with pytest.raises(CsrRejected):
        check_csr(OVERREACH["ca_true"])


def test_pem_after_text_is_read_as_pem() -> None:
    der = csr()
    pem = x509.load_der_x509_csr(der).public_bytes(Encoding.PEM)
    # what `openssl req -text` prints: the decoded request first, then the PEM block
    text = b"Certificate Request:\n    Data:\n        Version: 1 (0x0)\n" + pem
    assert check_csr(text).der == der


# The cryptography project's request vectors, judged by check_csr alone (the wire test in
# tests/reliability sends the bad ones through a gateway).
VECTORS: dict[str, Reason | None] = {
    "bad-version.pem": Reason.BAD_ENCODING,
    "basic_constraints.pem": Reason.BAD_SIGNATURE,  # RSA with SHA-1
    "challenge-invalid.der": Reason.BAD_SIGNATURE,
    "dsa_sha1.der": Reason.KEY_NOT_ALLOWED,
    "ec_sha256.der": None,
    "ec_sha256.pem": None,
    "ec_sha256_old_header.pem": None,
    "freeipa-bad-critical.pem": Reason.BAD_ENCODING,
    "invalid_signature.pem": Reason.KEY_NOT_ALLOWED,  # RSA-1024, refused before its signature
    "long-form-attribute.pem": Reason.BAD_SIGNATURE,
    "rsa_md4.der": Reason.BAD_SIGNATURE,
    "rsa_sha1.pem": Reason.BAD_SIGNATURE,
    "rsa_sha256.pem": None,
    "two_basic_constraints.pem": Reason.DUPLICATE_EXTENSION,  # PEM after `openssl -text` output
    "unsupported_extension_critical.pem": Reason.BAD_SIGNATURE,  # RSA with SHA-1
    "zero-element-attribute.pem": Reason.BAD_ENCODING,
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_cryptography_vectors(name: str) -> None:
    vectors = pytest.importorskip(
        "cryptography_vectors", reason="the cryptography-vectors package is not installed"
    )
    data = (Path(vectors.__file__).parent / "x509" / "requests" / name).read_bytes()
    expected = VECTORS[name]
    if expected is None:
        check_csr(data)
        return
    with pytest.raises(CsrRejected) as refused:
        check_csr(data)
    assert refused.value.reason is expected
