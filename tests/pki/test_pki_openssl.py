"""Interoperability with the OpenSSL command line: what we issue it verifies, what it requests
we accept (or refuse for the right reason)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.clock import FakeClock
from pki.crl import RevokedEntry, build_crl
from pki.csr import check_csr
from pki.errors import CsrRejected, Reason
from pki.factory import FactoryCA
from pki.issue import Issuer
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import make_issuing_ca

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run(
        [OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def write_pem(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def verify(
    tmp_path: Path,
    root: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    leaf: x509.Certificate,
    clock: FakeClock,
    *extra: str,
) -> subprocess.CompletedProcess[str]:
    write_pem(tmp_path / "root.crt", root)
    write_pem(tmp_path / "untrusted.crt", *untrusted)
    write_pem(tmp_path / "leaf.pem", leaf)
    # -attime: the certificates live on the fake clock, not the wall clock.
    return openssl(
        "verify",
        "-attime",
        str(int(clock.now().timestamp())),
        "-CAfile",
        "root.crt",
        "-untrusted",
        "untrusted.crt",
        *extra,
        "leaf.pem",
        cwd=tmp_path,
    )


def device(name: str = "sensor-1") -> LeafTemplate:
    return LeafTemplate(IdentityKind.DEVICE, name, "fleet.example", timedelta(hours=1))


@pytest.mark.parametrize("key_type", list(KeyType))
def test_openssl_verifies_our_client_leaf(
    tmp_path: Path, clock: FakeClock, key_type: KeyType
) -> None:
    ca = make_issuing_ca(clock, key_type)
    leaf = Issuer(ca, clock).issue(device(), LocalSigner.generate(key_type).public_key())
    result = verify(tmp_path, ca.root, [ca.certificate], leaf, clock, "-purpose", "sslclient")
    assert result.returncode == 0, result.stderr + result.stdout
    assert "leaf.pem: OK" in result.stdout


def test_openssl_verifies_our_server_leaf(tmp_path: Path, clock: FakeClock) -> None:
    ca = make_issuing_ca(clock)
    template = LeafTemplate(
        IdentityKind.SERVICE,
        "broker",
        "fleet.example",
        timedelta(days=1),
        server=True,
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
    )
    leaf = Issuer(ca, clock).issue(template, LocalSigner.generate().public_key())
    result = verify(
        tmp_path, ca.root, [ca.certificate], leaf, clock, "-purpose", "sslserver", "-verify_ip",
        "127.0.0.1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    as_client = ("-purpose", "sslclient")
    wrong_purpose = verify(tmp_path, ca.root, [ca.certificate], leaf, clock, *as_client)
    assert wrong_purpose.returncode != 0


def test_openssl_refuses_an_expired_leaf(tmp_path: Path, clock: FakeClock) -> None:
    ca = make_issuing_ca(clock)
    leaf = Issuer(ca, clock).issue(device(), LocalSigner.generate().public_key())
    clock.advance(timedelta(hours=2))
    result = verify(tmp_path, ca.root, [ca.certificate], leaf, clock)
    assert result.returncode != 0
    assert "expired" in result.stdout + result.stderr


def test_openssl_verifies_birth_certificates(tmp_path: Path, clock: FakeClock) -> None:
    factory = FactoryCA.create("Acme Sensors", clock)
    birth = factory.mint("SN-1", "TH-200").certificate
    result = verify(tmp_path, factory.root, [factory.intermediate], birth, clock)
    assert result.returncode == 0, result.stderr + result.stdout


def test_openssl_reads_our_crl_and_honours_it(tmp_path: Path, clock: FakeClock) -> None:
    ca = make_issuing_ca(clock)
    issuer = Issuer(ca, clock)
    revoked = issuer.issue(device("revoked-1"), LocalSigner.generate().public_key())
    kept = issuer.issue(device("kept-1"), LocalSigner.generate().public_key())
    entry = RevokedEntry(revoked.serial_number, clock.now(), x509.ReasonFlags.key_compromise)
    crl = build_crl(ca, [entry], clock, timedelta(hours=1), number=3)
    (tmp_path / "crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    text = openssl("crl", "-in", "crl.pem", "-noout", "-text", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"{revoked.serial_number:X}" in text.stdout.replace(":", "").upper()
    assert "X509v3 CRL Number" in text.stdout and "Key Compromise" in text.stdout

    # -crl_check: the leaf's status is looked up in the issuing CA's CRL, signature included.
    crl_args = ("-crl_check", "-CRLfile", "crl.pem")
    refused = verify(tmp_path, ca.root, [ca.certificate], revoked, clock, *crl_args)
    assert refused.returncode != 0 and "revoked" in refused.stdout + refused.stderr
    accepted = verify(tmp_path, ca.root, [ca.certificate], kept, clock, *crl_args)
    assert accepted.returncode == 0, accepted.stderr + accepted.stdout


# CSRs made by OpenSSL


def openssl_csr(tmp_path: Path, *key_args: str, extra: Sequence[str] = ()) -> bytes:
    result = openssl(
        "req", "-new", *key_args, "-nodes", "-keyout", "key.pem", "-subj", "/CN=sensor-1",
        *extra, "-outform", "DER", "-out", "req.der", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return (tmp_path / "req.der").read_bytes()


def test_openssl_ec_csr_is_accepted(tmp_path: Path) -> None:
    der = openssl_csr(tmp_path, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    checked = check_csr(der)
    key = serialization.load_pem_private_key((tmp_path / "key.pem").read_bytes(), None)
    assert checked.public_key == key.public_key()


@pytest.mark.parametrize(
    "key_args",
    [
        ("-newkey", "rsa:2048"),
        ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"),
        ("-newkey", "ed25519"),
    ],
    ids=["rsa2048", "p384", "ed25519"],
)
def test_other_openssl_csrs_are_accepted(tmp_path: Path, key_args: tuple[str, ...]) -> None:
    assert check_csr(openssl_csr(tmp_path, *key_args)).der


def _reason(data: bytes, **kwargs: object) -> Reason:
    with pytest.raises(CsrRejected) as caught:
        check_csr(data, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_openssl_csr_with_flipped_signature_byte(tmp_path: Path) -> None:
    der = bytearray(openssl_csr(tmp_path, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"))
    der[-3] ^= 0x40
    assert _reason(bytes(der)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "key_args",
    [("-newkey", "rsa:1024"), ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1")],
    ids=["rsa1024", "secp256k1"],
)
def test_openssl_weak_or_odd_keys(tmp_path: Path, key_args: tuple[str, ...]) -> None:
    assert _reason(openssl_csr(tmp_path, *key_args)) is Reason.KEY_NOT_ALLOWED


def test_openssl_dsa_csr(tmp_path: Path) -> None:
    params = openssl("dsaparam", "-out", "dsa.pem", "1024", cwd=tmp_path)
    assert params.returncode == 0, params.stderr
    assert _reason(openssl_csr(tmp_path, "-newkey", "dsa:dsa.pem")) is Reason.KEY_NOT_ALLOWED


def test_openssl_sha1_csr(tmp_path: Path) -> None:
    p256 = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256")
    der = openssl_csr(tmp_path, *p256, extra=["-sha1"])
    assert _reason(der) is Reason.BAD_SIGNATURE


def test_openssl_csr_with_two_basic_constraints(tmp_path: Path) -> None:
    (tmp_path / "dup.cnf").write_text(
        "[req]\ndistinguished_name = dn\nreq_extensions = ext\nprompt = no\n"
        "[dn]\nCN = sensor-1\n"
        "[ext]\nbasicConstraints = CA:FALSE\n2.5.29.19 = critical,DER:30:03:01:01:ff\n"
    )
    result = openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", "key.pem", "-config", "dup.cnf", "-outform", "DER", "-out", "dup.der",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _reason((tmp_path / "dup.der").read_bytes()) is Reason.DUPLICATE_EXTENSION


@pytest.mark.parametrize(
    "data", [b"", b"\x30\x82\xff\xff", b"-----BEGIN CERTIFICATE REQUEST-----\n"]
)
def test_garbage_instead_of_a_csr(data: bytes) -> None:
    assert _reason(data) is Reason.BAD_ENCODING


def test_openssl_csr_for_the_birth_key_is_forbidden(tmp_path: Path, clock: FakeClock) -> None:
    birth = FactoryCA.create("Acme Sensors", clock).mint("SN-1", "TH-200")
    (tmp_path / "birth.pem").write_bytes(
        birth.signer.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    result = openssl(
        "req", "-new", "-key", "birth.pem", "-subj", "/CN=SN-1", "-outform", "DER", "-out",
        "req.der", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    der = (tmp_path / "req.der").read_bytes()
    assert check_csr(der).public_key == birth.signer.public_key()
    forbidden = [birth.certificate.public_key()]
    assert _reason(der, forbidden_keys=forbidden) is Reason.FORBIDDEN_KEY
