from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509

from pki.ca import CertificateAuthority
from pki.clock import FakeClock
from pki.crl import RevokedEntry, build_crl
from pki.keys import KeyType
from pki.testing import make_issuing_ca

REVOKED_AT = datetime(2025, 12, 31, 12, tzinfo=UTC)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_crl_is_signed_by_the_ca_and_lists_entries(clock: FakeClock, key_type: KeyType) -> None:
    ca = make_issuing_ca(clock, key_type)
    entries = [
        RevokedEntry(1001, REVOKED_AT),
        RevokedEntry(1002, REVOKED_AT + timedelta(hours=1), x509.ReasonFlags.key_compromise),
    ]
    crl = build_crl(ca, entries, clock, timedelta(hours=1), number=7)
    assert crl.is_signature_valid(ca.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.certificate.subject
    assert len(crl) == 2
    first = crl.get_revoked_certificate_by_serial_number(1001)
    second = crl.get_revoked_certificate_by_serial_number(1002)
    assert first is not None and second is not None
    assert first.revocation_date_utc == REVOKED_AT
    assert len(first.extensions) == 0
    reason = second.extensions.get_extension_for_class(x509.CRLReason).value
    assert reason.reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(1003) is None


def test_crl_extensions_number_and_authority_key(
    clock: FakeClock, issuing_ca: CertificateAuthority
) -> None:
    crl = build_crl(issuing_ca, [], clock, timedelta(hours=1), number=42)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value
    assert number.crl_number == 42
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = issuing_ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == ski.value.digest
    assert len(crl) == 0


def test_update_times_follow_the_fake_clock(
    clock: FakeClock, issuing_ca: CertificateAuthority
) -> None:
    clock.advance(timedelta(days=3, seconds=17, microseconds=400))
    crl = build_crl(issuing_ca, [], clock, timedelta(minutes=15), number=1)
    now = clock.now().replace(microsecond=0)
    assert crl.last_update_utc == now
    assert crl.next_update_utc == now + timedelta(minutes=15)


def test_revocation_times_in_other_zones_are_stored_as_utc(
    clock: FakeClock, issuing_ca: CertificateAuthority
) -> None:
    at = datetime(2026, 1, 1, 3, tzinfo=timezone(timedelta(hours=3)))
    crl = build_crl(issuing_ca, [RevokedEntry(5, at)], clock, timedelta(hours=1), number=1)
    entry = crl.get_revoked_certificate_by_serial_number(5)
    assert entry is not None and entry.revocation_date_utc == datetime(2026, 1, 1, tzinfo=UTC)


def test_unspecified_reason_is_omitted(clock: FakeClock, issuing_ca: CertificateAuthority) -> None:
    entry = RevokedEntry(9, REVOKED_AT, x509.ReasonFlags.unspecified)
    crl = build_crl(issuing_ca, [entry], clock, timedelta(hours=1), number=1)
    revoked = crl.get_revoked_certificate_by_serial_number(9)
    assert revoked is not None and len(revoked.extensions) == 0


def test_duplicate_serials_are_refused(clock: FakeClock, issuing_ca: CertificateAuthority) -> None:
    entries = [RevokedEntry(9, REVOKED_AT), RevokedEntry(9, REVOKED_AT)]
    with pytest.raises(ValueError, match="twice"):
        build_crl(issuing_ca, entries, clock, timedelta(hours=1), number=1)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, REVOKED_AT), ValueError),
        ((-5, REVOKED_AT), ValueError),
        ((1 << 159, REVOKED_AT), ValueError),
        (("12", REVOKED_AT), TypeError),
        ((True, REVOKED_AT), TypeError),
        ((1, datetime(2026, 1, 1)), ValueError),
        ((1, "2026-01-01"), TypeError),
        ((1, REVOKED_AT, "keyCompromise"), TypeError),
        ((1, REVOKED_AT, x509.ReasonFlags.remove_from_crl), ValueError),
    ],
)
def test_bad_entries(args: tuple[object, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        RevokedEntry(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("next_update", "number", "error"),
    [
        (timedelta(0), 1, ValueError),
        (timedelta(hours=-1), 1, ValueError),
        (3600, 1, TypeError),
        (timedelta(hours=1), -1, ValueError),
        (timedelta(hours=1), 1 << 159, ValueError),
        (timedelta(hours=1), "1", TypeError),
    ],
)
def test_bad_crl_arguments(
    clock: FakeClock,
    issuing_ca: CertificateAuthority,
    next_update: object,
    number: object,
    error: type[Exception],
) -> None:
    with pytest.raises(error):
        build_crl(issuing_ca, [], clock, next_update, number)  # type: ignore[arg-type]


def test_entries_must_be_revoked_entries(
    clock: FakeClock, issuing_ca: CertificateAuthority
) -> None:
    with pytest.raises(TypeError):
        build_crl(issuing_ca, [(1, REVOKED_AT)], clock, timedelta(hours=1), 1)  # type: ignore[list-item]


def test_hundred_thousand_entries_build_in_one_go(
    clock: FakeClock, issuing_ca: CertificateAuthority
) -> None:
    entries = (RevokedEntry(serial, REVOKED_AT) for serial in range(1, 100_001))
    started = time.perf_counter()
    crl = build_crl(issuing_ca, entries, clock, timedelta(hours=1), number=1)
    elapsed = time.perf_counter() - started
    assert len(crl) == 100_000
    assert crl.get_revoked_certificate_by_serial_number(100_000) is not None
    # One by one this takes 8-11 s here; the bulk constructor about half a second. The bound
    # is loose for shared machines but still fails if entries are added one at a time.
    assert elapsed < 5, f"{elapsed:.2f} s for 100k entries"
