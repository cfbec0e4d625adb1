from __future__ import annotations

import hashlib
import ipaddress
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pki._build import authority_key_identifier
from pki.clock import FakeClock
from pki.csr import (
    CheckedCsr,
    CsrPolicy,
    certificate_fingerprint,
    check_csr,
    make_csr,
    public_key_fingerprint,
)
from pki.errors import CsrRejected, Reason
from pki.issue import Issuer, expected_leaf_extensions
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.testing import assert_is_leaf, assert_profile, make_issuing_ca

SUBJECT = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])


def csr_der(
    key: CertificateIssuerPrivateKeyTypes,
    extensions: list[x509.Extension[x509.ExtensionType]] | None = None,
    subject: x509.Name = SUBJECT,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    if isinstance(key, ed448.Ed448PrivateKey | ed25519.Ed25519PrivateKey):
        algorithm = None  # EdDSA hashes internally
    elif algorithm is None:
        algorithm = hashes.SHA256()
    # The constructor takes extensions as given, duplicates included (the fluent API would
    # refuse them): that is how a hostile device builds one.
    builder = x509.CertificateSigningRequestBuilder(subject, extensions or [])
    csr = builder.sign(key, algorithm)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


def rejected(data: bytes, **kwargs: object) -> Reason:
    with pytest.raises(CsrRejected) as caught:
        check_csr(data, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


@pytest.mark.parametrize("key_type", list(KeyType))
def test_make_csr_output_is_accepted(key_type: KeyType) -> None:
    signer = LocalSigner.generate(key_type)
    der = make_csr(signer, "sensor-1")
    checked = check_csr(der)
    assert isinstance(checked, CheckedCsr)
    assert checked.public_key == signer.public_key()
    assert checked.der == der
    assert checked.digest == hashlib.sha256(der).digest()
    assert checked.key_fingerprint == public_key_fingerprint(signer.public_key())


def test_pem_is_accepted_and_digest_is_over_der() -> None:
    der = make_csr(LocalSigner.generate(), "sensor-1")
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    checked = check_csr(b"\n  " + pem)
    assert checked.der == der
    assert checked.digest == hashlib.sha256(der).digest()


def test_rsa_2048_is_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check_csr(csr_der(key)).public_key == key.public_key()


def test_fingerprints_are_sha256_hex() -> None:
    signer = LocalSigner.generate()
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_fingerprint(signer.public_key()) == hashlib.sha256(spki).hexdigest()
    cert = make_issuing_ca(FakeClock()).certificate
    der = cert.public_bytes(serialization.Encoding.DER)
    assert certificate_fingerprint(cert) == hashlib.sha256(der).hexdigest()


# rejections, each with its reason


def test_flipped_signature_byte_is_bad_signature() -> None:
    der = bytearray(make_csr(LocalSigner.generate(), "sensor-1"))
    der[-5] ^= 0x01  # inside the signature BIT STRING at the end
    assert rejected(bytes(der)) is Reason.BAD_SIGNATURE


def test_flipped_subject_byte_is_bad_signature() -> None:
    der = bytearray(make_csr(LocalSigner.generate(), "sensor-1"))
    position = bytes(der).index(b"sensor-1")
    der[position] ^= 0x20  # "Sensor-1": still well-formed, no longer what was signed
    assert rejected(bytes(der)) is Reason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: dsa.generate_private_key(key_size=2048),
        lambda: ed448.Ed448PrivateKey.generate(),
    ],
    ids=["rsa1024", "secp256k1", "secp521r1", "dsa", "ed448"],
)
def test_keys_outside_the_allow_list(make_key: object) -> None:
    assert rejected(csr_der(make_key())) is Reason.KEY_NOT_ALLOWED  # type: ignore[operator]


def test_policy_can_refuse_ed25519_and_raise_the_rsa_floor() -> None:
    ed = make_csr(LocalSigner.generate(KeyType.ED25519), "d")
    assert rejected(ed, policy=CsrPolicy(allow_ed25519=False)) is Reason.KEY_NOT_ALLOWED
    rsa_csr = csr_der(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert rejected(rsa_csr, policy=CsrPolicy(min_rsa_bits=3072)) is Reason.KEY_NOT_ALLOWED
    p384 = make_csr(LocalSigner.generate(KeyType.P384), "d")
    only_p256 = CsrPolicy(allowed_curves=frozenset({"secp256r1"}))
    assert rejected(p384, policy=only_p256) is Reason.KEY_NOT_ALLOWED


def test_duplicate_basic_constraints() -> None:
    not_ca = x509.BasicConstraints(ca=False, path_length=None)
    twice = [x509.Extension(not_ca.oid, True, not_ca), x509.Extension(not_ca.oid, True, not_ca)]
    der = csr_der(ec.generate_private_key(ec.SECP256R1()), twice)
    assert rejected(der) is Reason.DUPLICATE_EXTENSION


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30\x03\x02\x01",
        b"garbage" * 10,
        b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
    ids=["empty", "truncated-der", "garbage", "bad-pem", "wrong-pem-label"],
)
def test_garbage_is_bad_encoding(data: bytes) -> None:
    assert rejected(data) is Reason.BAD_ENCODING


def test_truncated_csr_is_bad_encoding() -> None:
    der = make_csr(LocalSigner.generate(), "sensor-1")
    assert rejected(der[:-10]) is Reason.BAD_ENCODING


def test_a_certificate_is_not_a_csr() -> None:
    cert = make_issuing_ca(FakeClock()).certificate
    assert rejected(cert.public_bytes(serialization.Encoding.DER)) is Reason.BAD_ENCODING


def test_oversized_csr_is_refused_before_parsing() -> None:
    der = make_csr(LocalSigner.generate(), "sensor-1")
    assert rejected(der, policy=CsrPolicy(max_bytes=len(der) - 1)) is Reason.BAD_ENCODING
    assert rejected(b"\x00" * 9000) is Reason.BAD_ENCODING


def test_the_birth_key_is_forbidden() -> None:
    birth = LocalSigner.generate()
    der = make_csr(birth, "sensor-1")
    others = [LocalSigner.generate().public_key() for _ in range(3)]
    assert check_csr(der, forbidden_keys=others).public_key == birth.public_key()
    assert rejected(der, forbidden_keys=[*others, birth.public_key()]) is Reason.FORBIDDEN_KEY


def test_wrong_input_types() -> None:
    with pytest.raises(TypeError):
        check_csr("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        check_csr(b"", policy="strict")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_rsa_bits": 512},
        {"min_rsa_bits": 4096, "max_rsa_bits": 2048},
        {"max_bytes": 10},
    ],
)
def test_bad_policies(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        CsrPolicy(**kwargs)


def test_policy_types() -> None:
    with pytest.raises(TypeError):
        CsrPolicy(allowed_curves="secp256r1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CsrPolicy(max_bytes=8192.0)  # type: ignore[arg-type]
    assert CsrPolicy(allowed_curves={"secp256r1"}).allowed_curves == frozenset(  # type: ignore[arg-type]
        {"secp256r1"}
    )


# whatever a CSR asks for, the certificate says only what the template says

# PrintableString's alphabet: serialNumber must be one, and the others accept it.
_printable = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"
_text = st.text(alphabet=_printable, min_size=1, max_size=40)
_dns = st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){0,3}", fullmatch=True)
_uri = st.one_of(
    st.builds(
        lambda n: f"spiffe://fleet.example/device/{n}",
        st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
    ),
    st.builds(lambda n: f"spiffe://fleet.example/operator/{n}", st.just("admin")),
    st.builds(lambda d: f"https://{d}/", _dns),
)
_general_name = st.one_of(
    st.builds(x509.UniformResourceIdentifier, _uri),
    st.builds(x509.DNSName, _dns),
    st.builds(x509.RFC822Name, st.builds(lambda d: f"root@{d}", _dns)),
    st.builds(
        x509.IPAddress,
        st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(ipaddress.ip_address),
    ),
)
_name_oids = st.sampled_from(
    [
        NameOID.COMMON_NAME,
        NameOID.ORGANIZATION_NAME,
        NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.SERIAL_NUMBER,
        NameOID.LOCALITY_NAME,
    ]
)
_subjects = st.lists(
    st.builds(x509.NameAttribute, _name_oids, _text), min_size=0, max_size=5
).map(x509.Name)


def _key_usage(cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=True,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


_extension_values = st.one_of(
    st.builds(
        lambda n: x509.BasicConstraints(ca=True, path_length=n),
        st.one_of(st.none(), st.integers(0, 5)),
    ),
    st.builds(_key_usage, st.booleans(), st.booleans()),
    st.builds(
        x509.ExtendedKeyUsage,
        st.lists(
            st.sampled_from(
                [
                    ExtendedKeyUsageOID.SERVER_AUTH,
                    ExtendedKeyUsageOID.CODE_SIGNING,
                    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
                    ExtendedKeyUsageOID.OCSP_SIGNING,
                ]
            ),
            min_size=1,
            max_size=3,
            unique=True,
        ),
    ),
    st.builds(x509.SubjectAlternativeName, st.lists(_general_name, min_size=1, max_size=6)),
    st.just(x509.OCSPNoCheck()),
)
_extension_lists = st.lists(
    st.tuples(_extension_values, st.booleans()),
    max_size=5,
    unique_by=lambda pair: pair[0].oid,
).map(lambda pairs: [x509.Extension(value.oid, critical, value) for value, critical in pairs])

_CLOCK = FakeClock()
_CA = make_issuing_ca(_CLOCK)
_ISSUER = Issuer(_CA, _CLOCK)
_KEYS = [LocalSigner.generate(t).private_key for t in KeyType]
_TEMPLATE = LeafTemplate(IdentityKind.DEVICE, "sensor-7", "fleet.example", timedelta(hours=1))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=_subjects, extensions=_extension_lists, key_index=st.integers(0, len(_KEYS) - 1))
def test_nothing_a_csr_asks_for_reaches_the_certificate(
    subject: x509.Name,
    extensions: list[x509.Extension[x509.ExtensionType]],
    key_index: int,
) -> None:
    key = _KEYS[key_index]
    # Asking for CA powers, or marking critical what the gateway does not know, is refused;
    # whatever else a CSR asks for is ignored.
    overreach = any(
        (isinstance(e.value, x509.BasicConstraints) and e.value.ca)
        or (isinstance(e.value, x509.KeyUsage) and (e.value.key_cert_sign or e.value.crl_sign))
        or (e.critical and isinstance(e.value, x509.OCSPNoCheck))
        for e in extensions
    )
    if overreach:
        with pytest.raises(CsrRejected) as refused:
            check_csr(csr_der(key, extensions, subject))
        assert refused.value.reason is Reason.CSR_OVERREACH
        return
    checked = check_csr(csr_der(key, extensions, subject))
    cert = _ISSUER.issue(_TEMPLATE, checked.public_key)

    assert_is_leaf(cert, kind=IdentityKind.DEVICE, name="sensor-7", trust_domain="fleet.example")
    assert_profile(cert, issuer=_CA.certificate, now=_CLOCK.now())
    expected = expected_leaf_extensions(
        _TEMPLATE, checked.public_key, authority_key_identifier(_CA.certificate)
    )
    assert [(e.value, e.critical) for e in cert.extensions] == expected
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sensor-7")])
