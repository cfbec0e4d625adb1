"""What the enrollment core tells behaviour baselines, and the lifetime cap an automatic
response can put on a device's next certificates."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509

from gateway.enrollment.ratelimit import RateLimiter, RateLimits
from gateway.enrollment.service import EnrollmentService
from gateway.enrollment.testing import DEFAULT_FIRMWARE, LoopbackGateway, build_enroll, build_renew
from gateway.observe import CertificateIssued, Observation, RequestRefused
from gateway.protocol import Firmware, IssuedCertificate
from gateway.protocol.topics import Channel
from pki.keys import LocalSigner

NEW_FIRMWARE = Firmware(version="1.1.0", digest="ab" * 32)


class Watch:
    def __init__(self) -> None:
        self.seen: list[Observation] = []
        self.caps: dict[str, int] = {}

    def __call__(self, observation: Observation) -> None:
        self.seen.append(observation)


def gateway_with(watch: Watch, **observer: object) -> LoopbackGateway:
    gw = LoopbackGateway()
    gw.service = EnrollmentService(
        gw.store,
        gw.issuer,
        gw.policy,
        gw.clock,
        observer=observer.get("observer", watch),  # type: ignore[arg-type]
        lifetime_cap=watch.caps.get,
    )
    return gw


def enroll(gw: LoopbackGateway, serial: str = "dev-1") -> tuple[IssuedCertificate, LocalSigner]:
    credential = gw.mint(serial)
    challenge = gw.challenge(credential)
    request, key = build_enroll(credential, challenge.nonce, time=gw.now())
    answer = gw.ask(serial, request)
    assert isinstance(answer, IssuedCertificate), answer
    return answer, key


def lifetime(gw: LoopbackGateway, answer: IssuedCertificate) -> timedelta:
    """From issuance (the fake clock stands still) to notAfter; notBefore is backdated."""
    cert = x509.load_der_x509_certificate(answer.certificate)
    return cert.not_valid_after_utc - gw.clock.now()


def test_an_enrollment_is_reported_attested_with_its_firmware() -> None:
    watch = Watch()
    gw = gateway_with(watch)
    enroll(gw)
    # with the registry row the issuance wrote, so the watch need not read it back
    registered = gw.store.get_identity("dev-1")
    assert registered is not None and registered.model == "sensor-v1"
    assert watch.seen == [
        CertificateIssued(
            "dev-1", True, DEFAULT_FIRMWARE.version, DEFAULT_FIRMWARE.digest, registered
        )
    ]


def test_a_renewal_is_reported_unattested_with_the_firmware_it_reports() -> None:
    watch = Watch()
    gw = gateway_with(watch)
    _, key = enroll(gw)
    request, next_key = build_renew("dev-1", key, time=gw.now(), firmware=NEW_FIRMWARE)
    assert isinstance(gw.ask("dev-1", request, Channel.RENEW), IssuedCertificate)
    request, _ = build_renew("dev-1", next_key, time=gw.now(), request_id="renew-2")
    assert isinstance(gw.ask("dev-1", request, Channel.RENEW), IssuedCertificate)
    first, second = watch.seen[1:]
    # a renewal that reports new firmware rewrites the row; one that reports none leaves it
    assert first == CertificateIssued(
        "dev-1", False, NEW_FIRMWARE.version, NEW_FIRMWARE.digest, first.registered
    )
    assert first.registered is not None
    assert first.registered.firmware_version == NEW_FIRMWARE.version
    assert second == CertificateIssued("dev-1", False, None, None, second.registered)
    assert second.registered in (None, gw.store.get_identity("dev-1"))


def test_refusals_and_replays_are_not_reported_as_certificates() -> None:
    watch = Watch()
    gw = gateway_with(watch)
    credential = gw.mint("dev-1")
    challenge = gw.challenge(credential)
    request, _ = build_enroll(credential, challenge.nonce, time=gw.now())
    first = gw.ask("dev-1", request)
    assert gw.ask("dev-1", request) == first  # a retry is answered from the store
    forged, _ = build_renew("dev-1", LocalSigner.generate(), time=gw.now())
    gw.ask("dev-1", forged, Channel.RENEW)  # refused: not the current key
    assert [type(o) for o in watch.seen] == [CertificateIssued, RequestRefused]
    assert watch.seen[1] == RequestRefused("dev-1", "renewal_signature_invalid")


def test_refusals_are_reported_with_their_reason_code_also_for_unknown_devices() -> None:
    watch = Watch()
    gw = gateway_with(watch)
    gw.ask("ghost-7", b"{not json")
    forged, _ = build_renew("ghost-7", LocalSigner.generate(), time=gw.now())
    gw.ask("ghost-7", forged, Channel.RENEW)
    assert watch.seen == [
        RequestRefused("ghost-7", "malformed"),
        RequestRefused("ghost-7", "not_enrolled"),
    ]


def test_a_flood_is_reported_one_refusal_per_request() -> None:
    watch = Watch()
    gw = LoopbackGateway()
    limits = RateLimits(per_device_rate=1.0, per_device_burst=2)
    gw.service = EnrollmentService(
        gw.store,
        gw.issuer,
        gw.policy,
        gw.clock,
        observer=watch,
        rate_limiter=RateLimiter(limits, gw.clock),
    )
    for _ in range(10):
        gw.ask("flooder", b"{}")
    limited = [o for o in watch.seen if o == RequestRefused("flooder", "rate_limited")]
    assert len(limited) == 8


def test_a_failing_observer_never_costs_the_device_its_certificate() -> None:
    def broken(_: Observation) -> None:
        raise RuntimeError("observer bug")

    watch = Watch()
    gw = gateway_with(watch, observer=broken)
    answer, _ = enroll(gw)
    assert isinstance(answer, IssuedCertificate)
    assert gw.service.metrics["errors.observer"] == 1
    assert len(gw.store.certificates_for("dev-1")) == 1


@pytest.mark.parametrize("asked", [None, 3600, 120])
def test_a_lifetime_cap_shortens_the_next_certificate_and_is_audited(asked: int | None) -> None:
    watch = Watch()
    gw = gateway_with(watch)
    first, key = enroll(gw)
    assert lifetime(gw, first) == gw.policy.cert_lifetime
    watch.caps["dev-1"] = 300
    request, _ = build_renew("dev-1", key, time=gw.now(), lifetime=asked)
    renewed = gw.ask("dev-1", request, Channel.RENEW)
    assert isinstance(renewed, IssuedCertificate)
    assert lifetime(gw, renewed) == timedelta(seconds=min(300, asked or 300))
    entry = gw.store.audit_records()[-1].entry
    assert (entry.action, entry.detail["lifetime_cap"]) == ("renew", "300")


def test_the_cap_of_one_device_leaves_the_others_alone() -> None:
    watch = Watch()
    gw = gateway_with(watch)
    watch.caps["dev-1"] = 300
    capped, _ = enroll(gw, "dev-1")
    other, _ = enroll(gw, "dev-2")
    assert lifetime(gw, capped) == timedelta(seconds=300)
    assert lifetime(gw, other) == gw.policy.cert_lifetime
