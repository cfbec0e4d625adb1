"""Hostile inputs on the wire: every one answered with its reason code, counted in the metrics,
audited, and none leaves a certificate behind.

Many single checks live beside the code they test (tests/gateway/test_protocol_codec.py,
test_enrollment_*.py, tests/pki/); this table adds what they do not assert: that each refusal
reaches the device as a typed error *and* the metrics *and* the audit trail, through
``EnrollmentService.handle`` as the transport calls it. docs/security.md maps every threat to
its tests.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, ObjectIdentifier

from gateway.enrollment.testing import (
    LoopbackGateway,
    build_enroll,
    build_renew,
    der_chain,
    hello_for,
)
from gateway.protocol import (
    Error,
    Hello,
    IssuedCertificate,
    ReasonCode,
    decode_response,
    encode,
    topics,
)
from gateway.protocol.messages import MAX_PAYLOAD
from gateway.protocol.topics import Channel
from gateway.store import IdentityState
from pki.factory import FactoryCA
from pki.issue import expected_leaf_extensions
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate

Case = Callable[[LoopbackGateway], tuple[str, Channel, bytes]]
SHA256 = hashes.SHA256()
DEVICE = "dev-1"


def raw(document: dict[str, object]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def hello_document(gw: LoopbackGateway) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(encode(hello_for(gw.mint(DEVICE), "h-1")))
    return loaded


def on_enroll(payload: bytes) -> tuple[str, Channel, bytes]:
    return DEVICE, Channel.ENROLL, payload


def enroll_payload(gw: LoopbackGateway, **changes: object) -> bytes:
    """A correctly attested enroll (fresh nonce, evidence over these very bytes)."""
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), **changes)  # type: ignore[arg-type]
    return encode(request)


def enroll_document(gw: LoopbackGateway) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(enroll_payload(gw))
    return loaded


def csr_signed_by(key: object, algorithm: hashes.HashAlgorithm | None = None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEVICE)])
    )
    return builder.sign(key, algorithm).public_bytes(Encoding.DER)  # type: ignore[arg-type]


def with_csr(make: Callable[[], bytes]) -> Case:
    """An attested enroll carrying the CSR ``make`` builds (keys are made when the test runs)."""
    return lambda gw: on_enroll(enroll_payload(gw, csr=make()))


def truncated_base64(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    document = enroll_document(gw)
    document["nonce"] = str(document["nonce"])[:-2]
    return on_enroll(raw(document))


def base64_field(change: Callable[[str], str], field: str = "csr") -> Case:
    def case(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
        document = enroll_document(gw)
        before = str(document[field])
        document[field] = change(before)
        assert document[field] != before, "the hostile change must change the field"
        return on_enroll(raw(document))

    return case


def csr_with(
    extensions: list[x509.Extension[x509.ExtensionType]], common_name: str = DEVICE
) -> bytes:
    """A P-256 CSR with ``extensions`` exactly as given: the builder's constructor keeps
    duplicates (its fluent methods would refuse them), which is how a hostile device builds one."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = x509.CertificateSigningRequestBuilder(subject, extensions)
    key = LocalSigner.generate().private_key
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def asking(value: x509.ExtensionType, critical: bool = False) -> Callable[[], bytes]:
    """A CSR (for DEVICE) carrying one extension: what a device asks for on top of a leaf."""
    return lambda: csr_with([x509.Extension(value.oid, critical, value)])


def _san(*names: x509.GeneralName) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(list(names))


OWN_SPIFFE_ID = x509.UniformResourceIdentifier(f"spiffe://fleet.test/device/{DEVICE}")
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True,
    crl_sign=False, encipher_only=False, decipher_only=False,
)


def duplicate_extensions_csr() -> bytes:
    ski = x509.SubjectKeyIdentifier(b"\x01" * 20)
    return csr_with([x509.Extension(ski.oid, False, ski), x509.Extension(ski.oid, False, ski)])


def other_listener(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    return DEVICE, Channel.RENEW, encode(hello_for(gw.mint(DEVICE)))


def nonce_of_another_device(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    other = gw.challenge(gw.mint("dev-2"), "h-2")
    credential = gw.mint(DEVICE)
    request, _ = build_enroll(credential, other.nonce, time=gw.now())
    return on_enroll(encode(request))


def replayed_nonce(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    first, _ = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="e-1")
    assert isinstance(gw.ask(DEVICE, first), IssuedCertificate)
    again, _ = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="e-2")
    return on_enroll(encode(again))


def expired_nonce(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    gw.clock.advance(gw.policy.nonce_ttl + timedelta(seconds=1))
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    return on_enroll(encode(request))


def evidence_by_another_key(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    return on_enroll(enroll_payload(gw, evidence_signer=LocalSigner.generate()))


def skewed_clock(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    late = gw.now() + int(gw.policy.max_clock_skew.total_seconds()) + 60
    request, _ = build_enroll(credential, challenge.nonce, time=late)
    return on_enroll(encode(request))


def birth_certificate(**mint: object) -> Case:
    def case(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
        credential = gw.factory.mint(DEVICE, "sensor-v1", **mint)  # type: ignore[arg-type]
        return on_enroll(encode(hello_for(credential)))

    return case


def unknown_manufacturer(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    stranger = FactoryCA.create("Stranger Devices", gw.clock).mint(DEVICE, "gizmo")
    return on_enroll(encode(hello_for(stranger)))


def broken_chain(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    return on_enroll(encode(Hello(id="h-1", chain=der_chain(credential)[:1])))


def deny_listed(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    fingerprint = credential.certificate.fingerprint(hashes.SHA256()).hex()
    gw.with_policy(denied_birth_fingerprints=frozenset({fingerprint}))
    return on_enroll(encode(hello_for(credential)))


def renewal_of(state: IdentityState) -> Case:
    def case(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
        credential = gw.mint(DEVICE)
        challenge = gw.challenge(credential)
        request, key = build_enroll(credential, challenge.nonce, time=gw.now())
        assert isinstance(gw.ask(DEVICE, request), IssuedCertificate)
        gw.store.change_state(DEVICE, state, gw.clock.now())
        renew, _ = build_renew(DEVICE, key, time=gw.now())
        return DEVICE, Channel.RENEW, encode(renew)

    return case


def renewal_with_a_used_key(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask(DEVICE, request), IssuedCertificate)
    renew, _ = build_renew(DEVICE, key, time=gw.now(), key=key)  # the key it holds already
    return DEVICE, Channel.RENEW, encode(renew)


CASES: dict[str, tuple[Case, ReasonCode]] = {
    # the decoder
    "malformed_json": (lambda gw: on_enroll(b'{"v":1,"type":'), ReasonCode.MALFORMED),
    "not_utf8": (lambda gw: on_enroll(b'{"v":1,"id":"\xff"}'), ReasonCode.MALFORMED),
    "not_an_object": (lambda gw: on_enroll(b"[1,2,3]"), ReasonCode.MALFORMED),
    "duplicate_keys": (
        lambda gw: on_enroll(b'{"v":1,"type":"hello","id":"a","id":"b"}'),
        ReasonCode.MALFORMED,
    ),
    "wrong_type_version": (
        lambda gw: on_enroll(raw({**hello_document(gw), "v": "1"})),
        ReasonCode.INVALID_FIELD,
    ),
    "wrong_type_chain": (
        lambda gw: on_enroll(raw({**hello_document(gw), "chain": "MIIB"})),
        ReasonCode.INVALID_FIELD,
    ),
    "wrong_type_time": (
        lambda gw: on_enroll(raw({**enroll_document(gw), "time": "1767225600"})),
        ReasonCode.INVALID_FIELD,
    ),
    "huge_integer": (
        lambda gw: on_enroll(raw(enroll_document(gw))[:-1] + b',"lifetime":1' + b"0" * 400 + b"}"),
        ReasonCode.INVALID_FIELD,
    ),
    "huge_exponent": (
        lambda gw: on_enroll(raw(hello_document(gw))[:-1] + b',"x":1e999}'),
        ReasonCode.INVALID_FIELD,
    ),
    "nan": (
        lambda gw: on_enroll(raw(hello_document(gw))[:-1] + b',"x":NaN}'),
        ReasonCode.INVALID_FIELD,
    ),
    "float_time": (
        lambda gw: on_enroll(raw({**enroll_document(gw), "time": 1767225600.5})),
        ReasonCode.INVALID_FIELD,
    ),
    "deep_nesting": (
        lambda gw: on_enroll(raw(hello_document(gw))[:-1] + b',"x":' + _nested(20_000) + b"}"),
        ReasonCode.INVALID_FIELD,
    ),
    "mildly_deep_nesting": (
        lambda gw: on_enroll(raw({**hello_document(gw), "x": [[[[[1]]]]]})),
        ReasonCode.INVALID_FIELD,
    ),
    "oversized": (
        lambda gw: on_enroll(raw({**hello_document(gw), "x": "a" * MAX_PAYLOAD})),
        ReasonCode.PAYLOAD_TOO_LARGE,
    ),
    "unknown_type": (
        lambda gw: on_enroll(raw({**hello_document(gw), "type": "gimme_cert"})),
        ReasonCode.UNKNOWN_TYPE,
    ),
    "response_type_as_request": (
        lambda gw: on_enroll(raw({**hello_document(gw), "type": "certificate"})),
        ReasonCode.UNKNOWN_TYPE,
    ),
    "other_listener": (other_listener, ReasonCode.UNKNOWN_TYPE),
    "unsupported_version": (
        lambda gw: on_enroll(raw({**hello_document(gw), "v": 2})),
        ReasonCode.UNSUPPORTED_VERSION,
    ),
    "truncated_base64": (truncated_base64, ReasonCode.INVALID_FIELD),
    # a 32-byte nonce always ends in "=" (a CSR's DER length varies with its signature)
    "base64_without_padding": (
        base64_field(lambda v: v.rstrip("="), field="device_nonce"),
        ReasonCode.INVALID_FIELD,
    ),
    "base64_url_alphabet": (
        base64_field(lambda v: base64.urlsafe_b64encode(base64.b64decode(v)).decode() + "-_"),
        ReasonCode.INVALID_FIELD,
    ),
    "base64_with_line_break": (
        base64_field(lambda v: v[:20] + "\n" + v[20:]),
        ReasonCode.INVALID_FIELD,
    ),
    # the CSR (each inside a correctly attested enroll)
    "csr_garbage": (with_csr(lambda: b"\x30\x03\x02\x01\x00"), ReasonCode.BAD_ENCODING),
    "csr_truncated": (with_csr(lambda: _p256_csr()[:-7]), ReasonCode.BAD_ENCODING),
    "csr_rsa_1024": (
        with_csr(lambda: csr_signed_by(rsa.generate_private_key(65537, 1024), SHA256)),
        ReasonCode.KEY_NOT_ALLOWED,
    ),
    "csr_secp256k1": (
        with_csr(lambda: csr_signed_by(ec.generate_private_key(ec.SECP256K1()), SHA256)),
        ReasonCode.KEY_NOT_ALLOWED,
    ),
    "csr_dsa": (
        with_csr(lambda: csr_signed_by(dsa.generate_private_key(1024), SHA256)),
        ReasonCode.KEY_NOT_ALLOWED,
    ),
    "csr_ed448": (
        with_csr(lambda: csr_signed_by(ed448.Ed448PrivateKey.generate())),
        ReasonCode.KEY_NOT_ALLOWED,
    ),
    "csr_invalid_signature": (
        with_csr(lambda: _flip_last_byte(_p256_csr())),
        ReasonCode.BAD_SIGNATURE,
    ),
    "csr_duplicate_extension": (with_csr(duplicate_extensions_csr), ReasonCode.DUPLICATE_EXTENSION),
    "csr_for_the_birth_key": (lambda gw: _birth_key_csr(gw), ReasonCode.FORBIDDEN_KEY),
    # a CSR asking for more than a leaf of its own identity: refused, not trimmed
    "csr_common_name_of_another_device": (
        with_csr(lambda: csr_with([], common_name="dev-2")),
        ReasonCode.CSR_OVERREACH,
    ),
    "csr_spiffe_id_of_another_device": (
        with_csr(asking(_san(x509.UniformResourceIdentifier("spiffe://fleet.test/device/dev-2")))),
        ReasonCode.CSR_OVERREACH,
    ),
    "csr_operator_spiffe_id": (
        with_csr(asking(_san(x509.UniformResourceIdentifier("spiffe://fleet.test/operator/root")))),
        ReasonCode.CSR_OVERREACH,
    ),
    "csr_extra_san": (
        with_csr(asking(_san(OWN_SPIFFE_ID, x509.DNSName("broker.fleet.test")))),
        ReasonCode.CSR_OVERREACH,
    ),
    "csr_ca_true": (
        with_csr(asking(x509.BasicConstraints(ca=True, path_length=None), critical=True)),
        ReasonCode.CSR_OVERREACH,
    ),
    "csr_key_cert_sign": (with_csr(asking(CA_KEY_USAGE, critical=True)), ReasonCode.CSR_OVERREACH),
    "csr_unknown_critical_extension": (
        with_csr(
            asking(
                x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                critical=True,
            )
        ),
        ReasonCode.CSR_OVERREACH,
    ),
    # nonces, evidence, clocks
    "nonce_replayed": (replayed_nonce, ReasonCode.NONCE_REUSED),
    "nonce_of_another_device": (nonce_of_another_device, ReasonCode.NONCE_OTHER_DEVICE),
    "nonce_expired": (expired_nonce, ReasonCode.NONCE_EXPIRED),
    "nonce_never_issued": (
        lambda gw: on_enroll(_enroll_without_challenge(gw)),
        ReasonCode.NONCE_UNKNOWN,
    ),
    "evidence_by_another_key": (evidence_by_another_key, ReasonCode.EVIDENCE_SIGNATURE_INVALID),
    "clock_skew": (skewed_clock, ReasonCode.CLOCK_SKEW),
    # birth certificates
    "birth_expired": (lambda gw: _expired_birth(gw), ReasonCode.BIRTH_CERT_EXPIRED),
    "birth_not_yet_valid": (
        lambda gw: birth_certificate(not_before=gw.clock.now() + timedelta(days=1))(gw),
        ReasonCode.BIRTH_CERT_NOT_YET_VALID,
    ),
    "unknown_manufacturer": (unknown_manufacturer, ReasonCode.UNKNOWN_MANUFACTURER),
    "broken_chain": (broken_chain, ReasonCode.CHAIN_INVALID),
    "deny_listed": (deny_listed, ReasonCode.BIRTH_CERT_DENIED),
    # renewals
    "renewal_revoked": (renewal_of(IdentityState.REVOKED), ReasonCode.DEVICE_REVOKED),
    "renewal_quarantined": (renewal_of(IdentityState.QUARANTINED), ReasonCode.DEVICE_QUARANTINED),
    "renewal_with_a_used_key": (renewal_with_a_used_key, ReasonCode.KEY_REUSED),
}


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _flip_last_byte(der: bytes) -> bytes:
    return der[:-1] + bytes([der[-1] ^ 1])


def _p256_csr() -> bytes:
    return csr_signed_by(LocalSigner.generate().private_key, SHA256)


def _birth_key_csr(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    credential = gw.mint(DEVICE)
    challenge = gw.challenge(credential)
    csr = csr_signed_by(credential.signer.private_key, hashes.SHA256())  # type: ignore[attr-defined]
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), csr=csr)
    return on_enroll(encode(request))


def _enroll_without_challenge(gw: LoopbackGateway) -> bytes:
    request, _ = build_enroll(gw.mint(DEVICE), bytes(32), time=gw.now())
    return encode(request)


def _expired_birth(gw: LoopbackGateway) -> tuple[str, Channel, bytes]:
    start = gw.clock.now() - timedelta(days=10)
    return birth_certificate(not_before=start, lifetime=timedelta(days=1))(gw)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hostile_request_is_refused_counted_and_audited(name: str) -> None:
    case, code = CASES[name]
    gw = LoopbackGateway()
    device_id, channel, payload = case(gw)
    certificates_before = len(gw.store.certificates_for(device_id))
    metrics_before = gw.service.metrics[f"rejected.{code.value}"]
    audit_before = len(gw.store.audit_records())

    (reply,) = gw.service.handle(topics.request_topic(channel, device_id), payload)

    assert reply.topic == topics.response_topic(channel, device_id)
    answer = decode_response(reply.payload)
    assert isinstance(answer, Error), answer
    assert answer.reason == code, answer.detail
    assert gw.service.metrics[f"rejected.{code.value}"] == metrics_before + 1
    assert gw.service.metrics["errors.internal"] == 0
    new = gw.store.audit_records()[audit_before:]
    assert [(r.entry.action, r.entry.subject, r.entry.reasons) for r in new] == [
        ("reject", device_id, (code.value,))
    ]
    assert len(gw.store.certificates_for(device_id)) == certificates_before


def test_the_table_covers_every_refusal_a_device_can_provoke_on_the_wire() -> None:
    provoked = {code for _, code in CASES.values()}
    # Codes that need operator action, tokens, firmware policy or a broken gateway are proven in
    # tests/gateway (see docs/security.md); everything else a client can send is in the table.
    elsewhere = {
        ReasonCode.REQUEST_ID_REUSED, ReasonCode.BIRTH_CERT_MALFORMED,
        ReasonCode.DEVICE_ID_MISMATCH, ReasonCode.TOKEN_UNKNOWN, ReasonCode.TOKEN_EXPIRED,
        ReasonCode.TOKEN_REUSED, ReasonCode.TOKEN_OTHER_DEVICE,
        ReasonCode.FIRMWARE_NOT_ALLOWED, ReasonCode.IDENTITY_CONFLICT, ReasonCode.NOT_ENROLLED,
        ReasonCode.RENEWAL_SIGNATURE_INVALID, ReasonCode.REATTESTATION_REQUIRED,
        ReasonCode.CERTIFICATE_EXPIRED, ReasonCode.ISSUANCE_FAILED, ReasonCode.WRONG_PASSPHRASE,
        ReasonCode.KEY_NOT_FOUND, ReasonCode.KEY_EXISTS, ReasonCode.UNAVAILABLE,
        ReasonCode.RATE_LIMITED,
    }
    assert provoked | elsewhere == set(ReasonCode)


# -- what an honest CSR says beyond its key is ignored, never copied ------------------------------


def test_a_csr_naming_only_its_own_identity_gets_a_plain_leaf() -> None:
    gw = LoopbackGateway()
    key = LocalSigner.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Sensors"),
                ]
            )
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=False,
        )
        .add_extension(_san(OWN_SPIFFE_ID), critical=False)
        .sign(key.private_key, hashes.SHA256())
        .public_bytes(Encoding.DER)
    )
    (reply,) = gw.service.handle(
        topics.enroll_request(DEVICE), enroll_payload(gw, key=key, csr=csr)
    )
    answer = decode_response(reply.payload)
    assert isinstance(answer, IssuedCertificate)
    cert = x509.load_der_x509_certificate(answer.certificate)
    expected = expected_leaf_extensions(
        _device_template(gw), key.public_key(), _aki(gw)
    )
    assert [(e.value, e.critical) for e in cert.extensions] == expected
    assert cert.subject.rfc4514_string() == f"CN={DEVICE}"


def _device_template(gw: LoopbackGateway) -> LeafTemplate:
    return LeafTemplate(IdentityKind.DEVICE, DEVICE, "fleet.test", gw.policy.cert_lifetime)


def _aki(gw: LoopbackGateway) -> x509.AuthorityKeyIdentifier:
    ski = gw.issuing_ca.certificate.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


# -- the bad CSRs of the cryptography project's test vectors -------------------------------------

VECTORS: dict[str, ReasonCode] = {
    "bad-version.pem": ReasonCode.BAD_ENCODING,
    "invalid_signature.pem": ReasonCode.KEY_NOT_ALLOWED,  # RSA-1024: refused before its signature
    "two_basic_constraints.pem": ReasonCode.DUPLICATE_EXTENSION,
    # RSA with SHA-1: refused for the weak self-signature before its extensions are judged
    "unsupported_extension_critical.pem": ReasonCode.BAD_SIGNATURE,
    "freeipa-bad-critical.pem": ReasonCode.BAD_ENCODING,
    "zero-element-attribute.pem": ReasonCode.BAD_ENCODING,
    "basic_constraints.pem": ReasonCode.BAD_SIGNATURE,
    "rsa_md4.der": ReasonCode.BAD_SIGNATURE,
    "rsa_sha1.der": ReasonCode.BAD_SIGNATURE,
    "san_rsa_sha1.der": ReasonCode.BAD_SIGNATURE,
    "challenge-invalid.der": ReasonCode.BAD_SIGNATURE,
    "long-form-attribute.pem": ReasonCode.BAD_SIGNATURE,
    "dsa_sha1.der": ReasonCode.KEY_NOT_ALLOWED,
}


def _vectors_folder() -> Path:
    vectors = pytest.importorskip(
        "cryptography_vectors", reason="the cryptography-vectors package is not installed"
    )
    return Path(vectors.__file__).parent / "x509" / "requests"


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_bad_csrs_from_cryptography_vectors_are_refused_on_the_wire(name: str) -> None:
    csr = (_vectors_folder() / name).read_bytes()
    code = VECTORS[name]
    gw = LoopbackGateway()
    audit_before = len(gw.store.audit_records())
    (reply,) = gw.service.handle(topics.enroll_request(DEVICE), enroll_payload(gw, csr=csr))
    answer = decode_response(reply.payload)
    assert isinstance(answer, Error), answer
    assert answer.reason == code, answer.detail
    assert gw.service.metrics[f"rejected.{code.value}"] == 1
    assert gw.service.metrics["errors.internal"] == 0
    new = gw.store.audit_records()[audit_before:]
    assert [(r.entry.action, r.entry.reasons) for r in new] == [("reject", (code.value,))]
    assert gw.store.certificates_for(DEVICE) == []
