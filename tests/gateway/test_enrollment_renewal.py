"""Renewal over the operational listener: proven by the current key, refused when the device
must re-attest, never for a key used before."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from gateway.enrollment.testing import DEFAULT_FIRMWARE, LoopbackGateway, build_enroll, build_renew
from gateway.protocol import Error, Firmware, IssuedCertificate, ReasonCode, Response
from gateway.protocol.topics import Channel
from gateway.store import CertificateStatus, IdentityRecord, IdentityState
from pki.keys import LocalSigner
from pki.profile import IdentityKind


def reason(answer: Response) -> str:
    assert isinstance(answer, Error), answer
    return answer.reason


@pytest.fixture
def gw() -> LoopbackGateway:
    return LoopbackGateway()


def enroll(gw: LoopbackGateway, serial: str = "dev-1") -> tuple[IssuedCertificate, LocalSigner]:
    credential = gw.mint(serial)
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask(serial, request)
    assert isinstance(answer, IssuedCertificate)
    return answer, key


def renew(
    gw: LoopbackGateway, current: LocalSigner, serial: str = "dev-1", **kw: object
) -> Response:
    request, _ = build_renew(serial, current, time=gw.now(), **kw)  # type: ignore[arg-type]
    return gw.ask(serial, request, Channel.RENEW)


def serial_of(answer: IssuedCertificate) -> int:
    return x509.load_der_x509_certificate(answer.certificate).serial_number


def test_renewal_issues_a_new_certificate_and_supersedes_the_old(gw: LoopbackGateway) -> None:
    first, key = enroll(gw)
    gw.clock.advance(timedelta(minutes=40))
    request, new_key = build_renew("dev-1", key, time=gw.now())
    second = gw.ask("dev-1", request, Channel.RENEW)
    assert isinstance(second, IssuedCertificate)
    cert = x509.load_der_x509_certificate(second.certificate)
    assert cert.public_key() == new_key.public_key()
    statuses = {r.serial: r.status for r in gw.store.certificates_for("dev-1")}
    assert statuses == {
        serial_of(first): CertificateStatus.SUPERSEDED,
        serial_of(second): CertificateStatus.ACTIVE,
    }
    entry = gw.store.audit_records()[-1].entry
    assert (entry.action, entry.detail["previous_serial"]) == ("renew", f"{serial_of(first):x}")
    assert gw.service.metrics["renewed"] == 1


def test_the_renewed_key_renews_next_and_the_old_one_no_longer_does(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    request, new_key = build_renew("dev-1", key, time=gw.now(), request_id="r1")
    assert isinstance(gw.ask("dev-1", request, Channel.RENEW), IssuedCertificate)
    assert reason(renew(gw, key, request_id="r2")) == ReasonCode.RENEWAL_SIGNATURE_INVALID
    assert isinstance(renew(gw, new_key, request_id="r3"), IssuedCertificate)


def test_a_retried_renewal_gets_the_same_certificate(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    request, _ = build_renew("dev-1", key, time=gw.now())
    first = gw.ask("dev-1", request, Channel.RENEW)
    assert gw.ask("dev-1", request, Channel.RENEW) == first
    assert len(gw.store.certificates_for("dev-1")) == 2


def test_renewal_with_an_expired_certificate_asks_for_re_attestation(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    gw.clock.advance(timedelta(hours=1, seconds=1))
    assert reason(renew(gw, key)) == ReasonCode.CERTIFICATE_EXPIRED


def test_renewal_signed_by_another_key(gw: LoopbackGateway) -> None:
    enroll(gw)
    assert reason(renew(gw, LocalSigner.generate())) == ReasonCode.RENEWAL_SIGNATURE_INVALID


def test_a_renewal_signature_cannot_be_moved_to_another_request(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    request, _ = build_renew("dev-1", key, time=gw.now(), request_id="r1")
    moved = dataclasses.replace(request, id="r2")
    assert reason(gw.ask("dev-1", moved, Channel.RENEW)) == ReasonCode.RENEWAL_SIGNATURE_INVALID


def test_renewal_of_a_device_never_enrolled(gw: LoopbackGateway) -> None:
    assert reason(renew(gw, LocalSigner.generate(), "ghost")) == ReasonCode.NOT_ENROLLED


def test_renewal_of_a_pending_device() -> None:
    gw = LoopbackGateway(auto_approve=())
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now())
    gw.ask("dev-1", request)
    assert reason(renew(gw, key)) == ReasonCode.NOT_ENROLLED


@pytest.mark.parametrize(
    ("state", "code"),
    [
        (IdentityState.QUARANTINED, ReasonCode.DEVICE_QUARANTINED),
        (IdentityState.REVOKED, ReasonCode.DEVICE_REVOKED),
    ],
)
def test_quarantined_and_revoked_devices_get_no_renewal(
    gw: LoopbackGateway, state: IdentityState, code: ReasonCode
) -> None:
    _, key = enroll(gw)
    gw.store.change_state("dev-1", state, gw.clock.now())
    assert reason(renew(gw, key)) == code


def test_a_device_flagged_for_re_attestation(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None
    gw.store.put_identity(dataclasses.replace(identity, reattest_required=True))
    assert reason(renew(gw, key)) == ReasonCode.REATTESTATION_REQUIRED


def test_re_attestation_clears_the_flag() -> None:
    gw = LoopbackGateway()
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None
    gw.store.put_identity(dataclasses.replace(identity, reattest_required=True))
    challenge = gw.challenge(credential, "h2")
    request, key = build_enroll(credential, challenge.nonce, time=gw.now(), request_id="e2")
    assert isinstance(gw.ask("dev-1", request), IssuedCertificate)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None and not identity.reattest_required
    assert isinstance(renew(gw, key), IssuedCertificate)


def test_renewing_to_the_same_key_is_key_reuse(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    assert reason(renew(gw, key, key=key)) == ReasonCode.KEY_REUSED


def test_renewing_to_an_older_key_is_key_reuse(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    request, new_key = build_renew("dev-1", key, time=gw.now(), request_id="r1")
    assert isinstance(gw.ask("dev-1", request, Channel.RENEW), IssuedCertificate)
    assert reason(renew(gw, new_key, key=key, request_id="r2")) == ReasonCode.KEY_REUSED


def test_renewal_with_a_skewed_clock(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    request, _ = build_renew("dev-1", key, time=gw.now() - 3600)
    assert reason(gw.ask("dev-1", request, Channel.RENEW)) == ReasonCode.CLOCK_SKEW


def test_a_reported_firmware_update_is_judged_and_recorded() -> None:
    gw = LoopbackGateway(
        firmware_allowlist={"sensor-v1": frozenset({DEFAULT_FIRMWARE.digest, "ee" * 32})}
    )
    _, key = enroll(gw)
    assert reason(renew(gw, key, firmware=Firmware("9.9", "ff" * 32))) == (
        ReasonCode.FIRMWARE_NOT_ALLOWED
    )
    answer = renew(gw, key, firmware=Firmware("2.0", "ee" * 32), request_id="r2")
    assert isinstance(answer, IssuedCertificate)
    identity = gw.store.get_identity("dev-1")
    assert identity is not None
    assert (identity.firmware_version, identity.firmware_digest) == ("2.0", "ee" * 32)


def test_an_enroll_on_the_operational_topic_is_refused(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    assert reason(gw.ask("dev-1", request, Channel.RENEW)) == ReasonCode.UNKNOWN_TYPE


def test_renewal_of_an_active_device_without_an_active_certificate(gw: LoopbackGateway) -> None:
    now = gw.clock.now()
    gw.store.put_identity(
        IdentityRecord(
            id="dev-1",
            kind=IdentityKind.DEVICE,
            state=IdentityState.ACTIVE,
            created_at=now,
            updated_at=now,
        )
    )
    assert reason(renew(gw, LocalSigner.generate())) == ReasonCode.NOT_ENROLLED


# -- a requested lifetime --------------------------------------------------------------------


def test_a_renewal_may_ask_for_a_shorter_certificate(gw: LoopbackGateway) -> None:
    _, key = enroll(gw)
    gw.clock.advance(timedelta(minutes=40))
    renewed_at = gw.now()
    # The renewal signature is over the same bytes as without a lifetime: it is a wish the
    # policy caps, not a claim the current key has to vouch for.
    answer = renew(gw, key, lifetime=120)
    assert isinstance(answer, IssuedCertificate), answer
    assert answer.not_after - renewed_at == 120
    assert 80 - 6 <= answer.renew_after - renewed_at <= 80 + 6
    entry = gw.store.audit_records()[-1].entry
    assert (entry.action, entry.detail["lifetime"]) == ("renew", "120")


def test_a_one_minute_certificate_renews_again_and_again(gw: LoopbackGateway) -> None:
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now(), lifetime=60)
    answer = gw.ask("dev-1", request)
    for round_ in range(3):
        assert isinstance(answer, IssuedCertificate), answer
        assert answer.not_after - gw.now() == 60
        gw.clock.set(datetime.fromtimestamp(answer.renew_after, tz=UTC))
        renewal, key = build_renew(
            "dev-1", key, time=gw.now(), request_id=f"r{round_}", lifetime=60
        )
        answer = gw.ask("dev-1", renewal, Channel.RENEW)
    assert isinstance(answer, IssuedCertificate), answer
    assert gw.service.metrics["renewed"] == 3


def test_a_renewal_asking_for_more_than_the_policy_gets_the_policy_lifetime(
    gw: LoopbackGateway,
) -> None:
    _, key = enroll(gw)
    answer = renew(gw, key, lifetime=86400)
    assert isinstance(answer, IssuedCertificate), answer
    assert answer.not_after - gw.now() == 3600

