from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from pki._build import authority_key_identifier, leaf_key_usage
from pki.attestation import (
    EVIDENCE_DOMAIN,
    AttestationVerdict,
    BirthIdentity,
    EvidenceClaims,
    read_birth_identity,
    sign_evidence,
    verify_attestation,
)
from pki.ca import create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.csr import certificate_fingerprint, make_csr
from pki.errors import PkiError, Reason
from pki.factory import BirthCredential, FactoryCA
from pki.keys import KeyType, LocalSigner

FIRMWARE = hashlib.sha256(b"firmware image 1.4.2").hexdigest()


@pytest.fixture
def factory(clock: FakeClock) -> FactoryCA:
    return FactoryCA.create("Acme Sensors", clock)


@pytest.fixture
def credential(factory: FactoryCA) -> BirthCredential:
    return factory.mint("SN-0001", "TH-200")


def claims_for(device_id: str, /, **changes: object) -> EvidenceClaims:
    csr = make_csr(LocalSigner.generate(), device_id)
    fields: dict[str, object] = {
        "device_id": device_id,
        "gateway_nonce": bytes(range(32)),
        "device_nonce": bytes(range(100, 132)),
        "csr_digest": hashlib.sha256(csr).digest(),
        "firmware_version": "1.4.2",
        "firmware_digest": FIRMWARE,
    }
    fields.update(changes)
    return EvidenceClaims(**fields)  # type: ignore[arg-type]


def appraise(
    chain: Sequence[x509.Certificate],
    claims: EvidenceClaims,
    signature: bytes,
    roots: Sequence[x509.Certificate],
    clock: FakeClock,
    denied: frozenset[str] = frozenset(),
) -> AttestationVerdict:
    return verify_attestation(
        chain,
        claims,
        signature,
        trusted_roots=roots,
        denied_fingerprints=denied,
        now=clock.now(),
    )


# the evidence format


def test_evidence_bytes_golden_vector() -> None:
    claims = EvidenceClaims(
        device_id="sn-1",
        gateway_nonce=b"\x01" * 16,
        device_nonce=b"\x02" * 16,
        csr_digest=b"\x03" * 32,
        firmware_version="1.0",
        firmware_digest="ab" * 32,
    )
    expected = (
        b"fleetgate-evidence-v1\x00"
        + b"\x00\x00\x00\x04" + b"sn-1"
        + b"\x00\x00\x00\x10" + b"\x01" * 16
        + b"\x00\x00\x00\x10" + b"\x02" * 16
        + b"\x00\x00\x00\x20" + b"\x03" * 32
        + b"\x00\x00\x00\x03" + b"1.0"
        + b"\x00\x00\x00\x40" + b"ab" * 32
    )  # fmt: skip
    assert claims.to_bytes() == expected
    assert EVIDENCE_DOMAIN == b"fleetgate-evidence-v1\x00"


def test_text_fields_are_utf8() -> None:
    claims = claims_for("SN-1", firmware_version="v2-β")
    assert "v2-β".encode() in claims.to_bytes()
    assert b"\x00\x00\x00\x05v2-\xce\xb2" in claims.to_bytes()


def test_every_field_changes_the_signed_bytes() -> None:
    base = claims_for("SN-1")
    variants = [
        claims_for("SN-2", csr_digest=base.csr_digest),
        claims_for("SN-1", gateway_nonce=b"\xff" * 32, csr_digest=base.csr_digest),
        claims_for("SN-1", device_nonce=b"\xff" * 32, csr_digest=base.csr_digest),
        claims_for("SN-1", csr_digest=b"\xff" * 32),
        claims_for("SN-1", firmware_version="1.4.3", csr_digest=base.csr_digest),
        claims_for("SN-1", firmware_digest="0" * 64, csr_digest=base.csr_digest),
    ]
    assert len({base.to_bytes(), *(v.to_bytes() for v in variants)}) == 7


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"device_id": "bad id"}, ValueError),
        ({"device_id": 7}, TypeError),
        ({"gateway_nonce": b"short"}, ValueError),
        ({"gateway_nonce": b"x" * 65}, ValueError),
        ({"device_nonce": "text" * 8}, TypeError),
        ({"csr_digest": b"\x00" * 31}, ValueError),
        ({"csr_digest": "00" * 32}, TypeError),
        ({"firmware_version": ""}, ValueError),
        ({"firmware_version": "x" * 65}, ValueError),
        ({"firmware_version": "1.0\n"}, ValueError),
        ({"firmware_version": 1}, TypeError),
        ({"firmware_digest": "AB" * 32}, ValueError),
        ({"firmware_digest": "ab" * 31}, ValueError),
        ({"firmware_digest": b"ab" * 32}, TypeError),
    ],
)
def test_bad_claims(changes: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        claims_for("SN-1", **changes)


# birth identity


def test_read_birth_identity(credential: BirthCredential) -> None:
    identity = read_birth_identity(credential.certificate)
    assert identity == BirthIdentity(
        serial_number="SN-0001",
        model="TH-200",
        manufacturer="Acme Sensors",
        fingerprint=certificate_fingerprint(credential.certificate),
        public_key=credential.signer.public_key(),
    )


def _custom_birth(
    factory: FactoryCA,
    clock: FakeClock,
    subject: x509.Name,
    key: LocalSigner | rsa.RSAPrivateKey | None = None,
) -> x509.Certificate:
    """A birth certificate with any subject, properly signed by the factory's intermediate."""
    key = key or LocalSigner.generate()
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(factory.intermediate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(clock.now() - timedelta(minutes=1))
        .not_valid_after(clock.now() + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(leaf_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(factory.intermediate), critical=False)
    )
    return factory.intermediate_ca.signer.sign_certificate(builder)


def _name(*pairs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in pairs])


ORG, OU, SN = NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.SERIAL_NUMBER

MALFORMED_SUBJECTS = {
    "no-serial": _name((ORG, "Acme Sensors"), (OU, "TH-200")),
    "no-model": _name((ORG, "Acme Sensors"), (SN, "SN-9")),
    "no-manufacturer": _name((OU, "TH-200"), (SN, "SN-9")),
    "two-serials": _name((ORG, "Acme Sensors"), (OU, "TH-200"), (SN, "SN-9"), (SN, "SN-10")),
    "serial-not-an-id": _name((ORG, "Acme Sensors"), (OU, "TH-200"), (SN, "SN 9/../x")),
    "blank-model": _name((ORG, "Acme Sensors"), (OU, " "), (SN, "SN-9")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_SUBJECTS))
def test_malformed_subjects(factory: FactoryCA, clock: FakeClock, case: str) -> None:
    cert = _custom_birth(factory, clock, MALFORMED_SUBJECTS[case])
    with pytest.raises(PkiError) as caught:
        read_birth_identity(cert)
    assert caught.value.reason is Reason.BIRTH_CERT_MALFORMED


def test_read_birth_identity_of_a_non_certificate() -> None:
    with pytest.raises(PkiError) as caught:
        read_birth_identity(b"der")  # type: ignore[arg-type]
    assert caught.value.reason is Reason.BIRTH_CERT_MALFORMED


# verdicts


@pytest.mark.parametrize("device_key", list(KeyType))
@pytest.mark.parametrize("ca_key", [KeyType.P256, KeyType.P384])
def test_good_evidence_passes(clock: FakeClock, ca_key: KeyType, device_key: KeyType) -> None:
    factory = FactoryCA.create("Acme Sensors", clock, ca_key)
    credential = factory.mint("SN-0001", "TH-200", key_type=device_key)
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    verdict = appraise(credential.presented_chain, claims, signature, [factory.root], clock)
    assert verdict.ok, verdict.reasons
    assert verdict.reasons == ()
    assert verdict.identity == read_birth_identity(credential.certificate)


def test_rsa_birth_key_signs_with_pkcs1v15_sha256(factory: FactoryCA, clock: FakeClock) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = _name((ORG, "Acme Sensors"), (OU, "TH-200"), (SN, "SN-RSA"))
    birth = _custom_birth(factory, clock, subject, key)
    claims = claims_for("SN-RSA")
    signature = key.sign(claims.to_bytes(), padding.PKCS1v15(), hashes.SHA256())
    verdict = appraise([birth, factory.intermediate], claims, signature, [factory.root], clock)
    assert verdict.ok, verdict.reasons


def test_root_may_be_sent_along(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    chain = [*credential.presented_chain, factory.root]
    assert appraise(chain, claims, signature, [factory.root], clock).ok


def _single_reason(verdict: AttestationVerdict) -> Reason:
    assert not verdict.ok
    assert len(verdict.reasons) == 1, verdict.reasons
    return verdict.reasons[0]


def test_expired_birth_certificate(factory: FactoryCA, clock: FakeClock) -> None:
    old = factory.mint(
        "SN-OLD", "TH-200", not_before=clock.now() - timedelta(days=30), lifetime=timedelta(days=1)
    )
    claims = claims_for("SN-OLD")
    verdict = appraise(
        old.presented_chain, claims, sign_evidence(old.signer, claims), [factory.root], clock
    )
    assert _single_reason(verdict) is Reason.BIRTH_CERT_EXPIRED
    assert verdict.identity is not None and verdict.identity.serial_number == "SN-OLD"


def test_not_yet_valid_birth_certificate(factory: FactoryCA, clock: FakeClock) -> None:
    early = factory.mint("SN-NEW", "TH-200", not_before=clock.now() + timedelta(days=1))
    claims = claims_for("SN-NEW")
    verdict = appraise(
        early.presented_chain, claims, sign_evidence(early.signer, claims), [factory.root], clock
    )
    assert _single_reason(verdict) is Reason.BIRTH_CERT_NOT_YET_VALID


def test_birth_certificate_becomes_valid_as_time_passes(
    factory: FactoryCA, clock: FakeClock
) -> None:
    early = factory.mint("SN-NEW", "TH-200", not_before=clock.now() + timedelta(hours=1))
    claims = claims_for("SN-NEW")
    signature = sign_evidence(early.signer, claims)
    assert not appraise(early.presented_chain, claims, signature, [factory.root], clock).ok
    clock.advance(timedelta(hours=2))
    assert appraise(early.presented_chain, claims, signature, [factory.root], clock).ok


def test_unknown_manufacturer(credential: BirthCredential, clock: FakeClock) -> None:
    stranger = FactoryCA.create("Globex", clock)
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    verdict = appraise(credential.presented_chain, claims, signature, [stranger.root], clock)
    assert _single_reason(verdict) is Reason.UNKNOWN_MANUFACTURER
    no_roots = appraise(credential.presented_chain, claims, signature, [], clock)
    assert _single_reason(no_roots) is Reason.UNKNOWN_MANUFACTURER


def test_ed25519_manufacturer_ca_is_a_broken_chain(clock: FakeClock) -> None:
    # cryptography's verifier follows the web PKI profile, which has no Ed25519 CA keys.
    root = create_root_ca(
        LocalSigner.generate(KeyType.ED25519), "Edwards Root", clock, organization="Edwards"
    )
    intermediate = create_issuing_ca(
        root, LocalSigner.generate(KeyType.ED25519), "Edwards CA", clock, organization="Edwards"
    )
    factory = FactoryCA("Edwards", root, intermediate, clock)
    credential = factory.mint("SN-1", "M")
    claims = claims_for("SN-1")
    signature = sign_evidence(credential.signer, claims)
    verdict = appraise(credential.presented_chain, claims, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.CHAIN_INVALID


def test_missing_intermediate_is_a_broken_chain(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    verdict = appraise([credential.certificate], claims, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.CHAIN_INVALID


def test_intermediate_of_another_factory_is_a_broken_chain(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    other = FactoryCA.create("Globex", clock)
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    chain = [credential.certificate, other.intermediate]
    verdict = appraise(chain, claims, signature, [factory.root, other.root], clock)
    assert _single_reason(verdict) is Reason.CHAIN_INVALID


def test_counterfeit_factory_with_the_same_names_is_a_broken_chain(
    factory: FactoryCA, clock: FakeClock
) -> None:
    counterfeit = FactoryCA.create("Acme Sensors", clock)  # same names, other keys
    fake = counterfeit.mint("SN-0001", "TH-200")
    claims = claims_for("SN-0001")
    verdict = appraise(
        fake.presented_chain, claims, sign_evidence(fake.signer, claims), [factory.root], clock
    )
    assert _single_reason(verdict) is Reason.CHAIN_INVALID


def test_overlong_chain_is_refused(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    chain = [credential.certificate, *[factory.intermediate] * 5]
    verdict = appraise(chain, claims, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.CHAIN_INVALID


def test_deny_listed_birth_certificate(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, claims)
    denied = frozenset({certificate_fingerprint(credential.certificate), "00" * 32})
    verdict = appraise(credential.presented_chain, claims, signature, [factory.root], clock, denied)
    assert _single_reason(verdict) is Reason.BIRTH_CERT_DENIED
    other = frozenset({"00" * 32})
    assert appraise(credential.presented_chain, claims, signature, [factory.root], clock, other).ok


def test_evidence_signed_by_another_key(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-0001")
    signature = sign_evidence(LocalSigner.generate(), claims)
    verdict = appraise(credential.presented_chain, claims, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.EVIDENCE_SIGNATURE_INVALID


def test_claims_changed_after_signing(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    signed = claims_for("SN-0001")
    signature = sign_evidence(credential.signer, signed)
    replayed = claims_for("SN-0001", gateway_nonce=b"\x09" * 32, csr_digest=signed.csr_digest)
    verdict = appraise(credential.presented_chain, replayed, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.EVIDENCE_SIGNATURE_INVALID


def test_evidence_for_another_device(
    credential: BirthCredential, factory: FactoryCA, clock: FakeClock
) -> None:
    claims = claims_for("SN-9999")  # properly signed by SN-0001's birth key
    signature = sign_evidence(credential.signer, claims)
    verdict = appraise(credential.presented_chain, claims, signature, [factory.root], clock)
    assert _single_reason(verdict) is Reason.DEVICE_ID_MISMATCH


def test_malformed_subject_in_a_valid_chain(factory: FactoryCA, clock: FakeClock) -> None:
    key = LocalSigner.generate()
    birth = _custom_birth(factory, clock, MALFORMED_SUBJECTS["no-serial"], key)
    claims = claims_for("SN-9")
    verdict = appraise(
        [birth, factory.intermediate], claims, sign_evidence(key, claims), [factory.root], clock
    )
    assert _single_reason(verdict) is Reason.BIRTH_CERT_MALFORMED
    assert verdict.identity is None


def test_every_failure_is_reported(factory: FactoryCA, clock: FakeClock) -> None:
    old = factory.mint(
        "SN-OLD", "TH-200", not_before=clock.now() - timedelta(days=30), lifetime=timedelta(days=1)
    )
    claims = claims_for("SN-OTHER")
    verdict = appraise(
        old.presented_chain,
        claims,
        b"not a signature",
        [factory.root],
        clock,
        frozenset({certificate_fingerprint(old.certificate)}),
    )
    assert verdict.reasons == (
        Reason.BIRTH_CERT_EXPIRED,
        Reason.BIRTH_CERT_DENIED,
        Reason.DEVICE_ID_MISMATCH,
        Reason.EVIDENCE_SIGNATURE_INVALID,
    )


@pytest.mark.parametrize(
    "chain",
    [[], [b"der"], "certificate", None],
    ids=["empty", "bytes", "string", "none"],
)
def test_junk_chains_are_a_verdict_not_an_exception(
    factory: FactoryCA, clock: FakeClock, chain: object
) -> None:
    verdict = appraise(chain, claims_for("SN-1"), b"", [factory.root], clock)  # type: ignore[arg-type]
    assert verdict.reasons == (Reason.BIRTH_CERT_MALFORMED,)
    assert verdict.identity is None


def test_naive_now_is_a_programming_error(credential: BirthCredential, factory: FactoryCA) -> None:
    with pytest.raises(ValueError):
        verify_attestation(
            credential.presented_chain,
            claims_for("SN-0001"),
            b"",
            trusted_roots=[factory.root],
            denied_fingerprints=(),
            now=FakeClock().now().replace(tzinfo=None),
        )


def test_verdict_consistency_is_enforced() -> None:
    with pytest.raises(ValueError):
        AttestationVerdict(ok=True, reasons=(Reason.CHAIN_INVALID,), identity=None)
    with pytest.raises(ValueError):
        AttestationVerdict(ok=False, reasons=(), identity=None)
