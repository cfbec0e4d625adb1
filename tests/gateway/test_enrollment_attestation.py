"""Attested enrollment refuses, with the right reason, every bad birth certificate, nonce,
evidence, CSR, firmware and clock."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.enrollment.testing import (
    DEFAULT_FIRMWARE,
    LoopbackGateway,
    build_enroll,
    der_chain,
    hello_for,
)
from gateway.protocol import Error, Firmware, Hello, IssuedCertificate, ReasonCode, Response
from gateway.store import IdentityRecord, IdentityState
from pki.factory import FactoryCA
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate


@pytest.fixture
def gw() -> LoopbackGateway:
    return LoopbackGateway()


def reason(answer: Response) -> str:
    assert isinstance(answer, Error), answer
    return answer.reason


def enroll_with(gw: LoopbackGateway, serial: str = "dev-1", **changes: object) -> Response:
    credential = gw.mint(serial)
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), **changes)  # type: ignore[arg-type]
    return gw.ask(serial, request)


# -- birth certificates: refused at hello already, and at enroll -------------------------


def test_a_manufacturer_we_do_not_trust(gw: LoopbackGateway) -> None:
    stranger = FactoryCA.create("Stranger Devices", gw.clock).mint("dev-1", "gizmo")
    assert reason(gw.ask("dev-1", hello_for(stranger))) == ReasonCode.UNKNOWN_MANUFACTURER


def test_a_chain_without_its_intermediate(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    chain = der_chain(credential)[:1]
    assert reason(gw.ask("dev-1", Hello(id="h", chain=chain))) == ReasonCode.CHAIN_INVALID


def test_a_chain_with_an_intermediate_of_another_factory(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    other = FactoryCA.create("Acme Sensors", gw.clock)  # same name, other keys
    chain = (der_chain(credential)[0], other.intermediate.public_bytes(Encoding.DER))
    assert reason(gw.ask("dev-1", Hello(id="h", chain=chain))) == ReasonCode.CHAIN_INVALID


def test_a_chain_that_is_not_der(gw: LoopbackGateway) -> None:
    assert reason(gw.ask("dev-1", Hello(id="h", chain=(b"junk",)))) == (
        ReasonCode.BIRTH_CERT_MALFORMED
    )
    credential = gw.mint("dev-1")
    chain = (der_chain(credential)[0], b"junk")
    assert reason(gw.ask("dev-1", Hello(id="h2", chain=chain))) == ReasonCode.CHAIN_INVALID


def test_a_deny_listed_birth_certificate() -> None:
    gw = LoopbackGateway()
    credential = gw.mint("dev-1")
    fingerprint = hashlib.sha256(credential.certificate.public_bytes(Encoding.DER)).hexdigest()
    gw.with_policy(denied_birth_fingerprints=frozenset({fingerprint}))
    assert reason(gw.ask("dev-1", hello_for(credential))) == ReasonCode.BIRTH_CERT_DENIED


def test_an_expired_birth_certificate(gw: LoopbackGateway) -> None:
    credential = gw.mint(
        "dev-1", not_before=gw.clock.now() - timedelta(days=20), lifetime=timedelta(days=10)
    )
    assert reason(gw.ask("dev-1", hello_for(credential))) == ReasonCode.BIRTH_CERT_EXPIRED


def test_a_birth_certificate_not_valid_yet(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1", not_before=gw.clock.now() + timedelta(days=1))
    assert reason(gw.ask("dev-1", hello_for(credential))) == ReasonCode.BIRTH_CERT_NOT_YET_VALID


def test_a_birth_certificate_of_another_device(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    assert reason(gw.ask("dev-2", hello_for(credential))) == ReasonCode.DEVICE_ID_MISMATCH


def test_a_birth_certificate_that_expires_between_hello_and_enroll(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1", lifetime=timedelta(seconds=90))
    challenge = gw.challenge(credential)
    gw.clock.advance(40)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.BIRTH_CERT_EXPIRED


def test_enroll_checks_the_chain_it_carries_not_the_one_of_the_hello(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(
        credential, challenge.nonce, time=gw.now(), chain=der_chain(credential)[:1]
    )
    assert reason(gw.ask("dev-1", request)) == ReasonCode.CHAIN_INVALID


# -- nonces ----------------------------------------------------------------------------------


def test_a_nonce_the_gateway_never_issued(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    request, _ = build_enroll(credential, bytes(32), time=gw.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.NONCE_UNKNOWN


def test_an_expired_nonce(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    gw.clock.advance(61)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.NONCE_EXPIRED


def test_a_nonce_used_twice(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    first, _ = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="e1")
    second, _ = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="e2")
    assert isinstance(gw.ask("dev-1", first), IssuedCertificate)
    assert reason(gw.ask("dev-1", second)) == ReasonCode.NONCE_REUSED


def test_a_nonce_issued_to_another_device(gw: LoopbackGateway) -> None:
    mine, theirs = gw.mint("dev-1"), gw.mint("dev-2")
    challenge = gw.challenge(theirs)
    request, _ = build_enroll(mine, challenge.nonce, time=gw.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.NONCE_OTHER_DEVICE
    # ...and the rightful owner can still use it.
    own, _ = build_enroll(theirs, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("dev-2", own), IssuedCertificate)


# -- evidence ----------------------------------------------------------------------------------


def test_evidence_signed_by_another_key(gw: LoopbackGateway) -> None:
    answer = enroll_with(gw, evidence_signer=LocalSigner.generate())
    assert reason(answer) == ReasonCode.EVIDENCE_SIGNATURE_INVALID


def test_evidence_from_a_cloned_birth_certificate_without_its_key(gw: LoopbackGateway) -> None:
    # The birth certificate is public; without the birth key it is worth nothing.
    victim = gw.mint("dev-1")
    challenge = gw.challenge(victim)
    request, _ = build_enroll(
        victim, challenge.nonce, time=gw.now(), evidence_signer=gw.mint("dev-x").signer
    )
    assert reason(gw.ask("dev-1", request)) == ReasonCode.EVIDENCE_SIGNATURE_INVALID


def test_evidence_over_another_firmware_than_reported(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    tampered = Firmware(version="6.6.6", digest=DEFAULT_FIRMWARE.digest)
    forged = type(request)(**{**request.__dict__, "firmware": tampered})
    assert reason(gw.ask("dev-1", forged)) == ReasonCode.EVIDENCE_SIGNATURE_INVALID


# -- the CSR -----------------------------------------------------------------------------------


def test_a_csr_that_does_not_parse(gw: LoopbackGateway) -> None:
    assert reason(enroll_with(gw, csr=b"\x30\x03garbage")) == ReasonCode.BAD_ENCODING


def test_a_csr_for_the_birth_key(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now(), key=credential.signer)
    assert reason(gw.ask("dev-1", request)) == ReasonCode.FORBIDDEN_KEY


def test_a_csr_for_a_key_certified_before(gw: LoopbackGateway) -> None:
    key = LocalSigner.generate()
    assert isinstance(enroll_with(gw, "dev-1", key=key), IssuedCertificate)
    assert reason(enroll_with(gw, "dev-2", key=key)) == ReasonCode.KEY_REUSED


def test_a_csr_with_a_broken_signature(gw: LoopbackGateway) -> None:
    from pki.csr import make_csr

    csr = bytearray(make_csr(LocalSigner.generate(), "dev-1"))
    csr[-3] ^= 0x01
    assert reason(enroll_with(gw, csr=bytes(csr))) == ReasonCode.BAD_SIGNATURE


# -- firmware and clock ------------------------------------------------------------------------


def test_firmware_not_on_the_model_allow_list() -> None:
    gw = LoopbackGateway(firmware_allowlist={"sensor-v1": frozenset({"cd" * 32})})
    assert reason(enroll_with(gw)) == ReasonCode.FIRMWARE_NOT_ALLOWED


def test_firmware_on_the_model_allow_list() -> None:
    gw = LoopbackGateway(firmware_allowlist={"sensor-v1": frozenset({DEFAULT_FIRMWARE.digest})})
    assert isinstance(enroll_with(gw), IssuedCertificate)


def test_unknown_models_are_refused_when_firmware_must_be_known() -> None:
    gw = LoopbackGateway(
        firmware_allowlist={"other-model": frozenset({DEFAULT_FIRMWARE.digest})},
        require_known_firmware=True,
    )
    assert reason(enroll_with(gw)) == ReasonCode.FIRMWARE_NOT_ALLOWED


@pytest.mark.parametrize("offset", [-301, 301, -86_400 * 365])
def test_a_device_clock_too_far_off(gw: LoopbackGateway, offset: int) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now() + offset)
    assert reason(gw.ask("dev-1", request)) == ReasonCode.CLOCK_SKEW


@pytest.mark.parametrize("offset", [-300, 299])
def test_a_device_clock_within_the_allowed_skew(gw: LoopbackGateway, offset: int) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now() + offset)
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)


def test_a_refused_enrollment_is_audited_with_its_reason(gw: LoopbackGateway) -> None:
    enroll_with(gw, evidence_signer=LocalSigner.generate())
    entry = gw.store.audit_records()[-1].entry
    assert (entry.actor, entry.action, entry.outcome) == ("device:dev-1", "reject", "rejected")
    assert entry.reasons == ("evidence_signature_invalid",)
    assert entry.detail["request"] == "enroll"
    assert gw.store.get_identity("dev-1") is None


# -- identity binding ------------------------------------------------------------------------


def test_a_second_birth_certificate_for_an_enrolled_id_is_an_identity_conflict(
    gw: LoopbackGateway,
) -> None:
    assert isinstance(enroll_with(gw, "dev-1"), IssuedCertificate)
    clone = gw.mint("dev-1")  # same serial number, another key and certificate
    assert reason(gw.ask("dev-1", hello_for(clone, "h-clone"))) == ReasonCode.IDENTITY_CONFLICT


def test_the_conflict_is_caught_at_enroll_too(gw: LoopbackGateway) -> None:
    clone = gw.mint("dev-1")
    challenge = gw.challenge(clone, "h-clone")  # before the original enrolled
    assert isinstance(enroll_with(gw, "dev-1"), IssuedCertificate)
    request, _ = build_enroll(clone, challenge.nonce, time=gw.now(), request_id="e-clone")
    assert reason(gw.ask("dev-1", request)) == ReasonCode.IDENTITY_CONFLICT
    identity = gw.store.get_identity("dev-1")
    assert identity is not None and identity.state is IdentityState.ACTIVE


def test_a_certificate_that_is_not_a_birth_certificate(gw: LoopbackGateway) -> None:
    # A perfectly good X.509 certificate without O, OU and serialNumber: not a birth certificate.
    operational = gw.issuer.issue(
        LeafTemplate(
            kind=IdentityKind.DEVICE,
            name="dev-1",
            trust_domain="fleet.test",
            lifetime=timedelta(hours=1),
        ),
        LocalSigner.generate().public_key(),
    )
    chain = (operational.public_bytes(Encoding.DER),)
    assert reason(gw.ask("dev-1", Hello(id="h", chain=chain))) == ReasonCode.BIRTH_CERT_MALFORMED


def test_a_device_id_held_by_an_operator_is_an_identity_conflict(gw: LoopbackGateway) -> None:
    now = gw.clock.now()
    gw.store.put_identity(
        IdentityRecord(
            id="dev-1",
            kind=IdentityKind.OPERATOR,
            state=IdentityState.ACTIVE,
            created_at=now,
            updated_at=now,
            role="admin",
        )
    )
    assert reason(gw.ask("dev-1", hello_for(gw.mint("dev-1")))) == ReasonCode.IDENTITY_CONFLICT


def test_an_expired_gateway_ca_fails_issuance_cleanly(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    gw.clock.advance(timedelta(days=181))  # the issuing CA lives 180 days
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert reason(gw.ask("dev-1", request)) == ReasonCode.ISSUANCE_FAILED
    assert gw.store.certificates_for("dev-1") == []
