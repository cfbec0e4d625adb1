from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import FakeClock
from pki.errors import IssuanceError, Reason
from pki.issue import Issuer, validate_issued
from pki.keys import KeyType, LocalSigner
from pki.profile import IdentityKind, LeafTemplate
from pki.serials import SERIAL_BITS, new_serial_number
from pki.testing import assert_is_leaf, assert_profile, make_issuing_ca

TRUST_DOMAIN = "fleet.example"
HOUR = timedelta(hours=1)


def device(name: str = "sensor-1", lifetime: timedelta = HOUR) -> LeafTemplate:
    return LeafTemplate(IdentityKind.DEVICE, name, TRUST_DOMAIN, lifetime)


def broker_template() -> LeafTemplate:
    return LeafTemplate(
        IdentityKind.SERVICE,
        "broker",
        TRUST_DOMAIN,
        timedelta(days=7),
        server=True,
        dns_names=("localhost", "broker.fleet.example"),
        ip_addresses=("127.0.0.1", "::1"),
    )


def leaf_keys() -> list[CertificatePublicKeyTypes]:
    keys: list[CertificatePublicKeyTypes] = [LocalSigner.generate(t).public_key() for t in KeyType]
    keys.append(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    return keys


@pytest.mark.parametrize("ca_key_type", list(KeyType))
def test_client_leaf_profile_for_every_key_type(clock: FakeClock, ca_key_type: KeyType) -> None:
    ca = make_issuing_ca(clock, ca_key_type)
    issuer = Issuer(ca, clock)
    for key in leaf_keys():
        cert = issuer.issue(device(), key)
        assert_is_leaf(cert, kind=IdentityKind.DEVICE, name="sensor-1", trust_domain=TRUST_DOMAIN)
        assert_profile(cert, issuer=ca.certificate, now=clock.now())
        assert cert.public_key() == key
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.key_encipherment is isinstance(key, rsa.RSAPublicKey)


def test_server_leaf_carries_dns_and_ip_names(issuer: Issuer, clock: FakeClock) -> None:
    cert = issuer.issue(broker_template(), LocalSigner.generate().public_key())
    assert_is_leaf(
        cert,
        kind=IdentityKind.SERVICE,
        name="broker",
        trust_domain=TRUST_DOMAIN,
        server=True,
        dns_names=("localhost", "broker.fleet.example"),
        ip_addresses=("127.0.0.1", "::1"),
    )
    assert_profile(cert, issuer=issuer.ca.certificate, now=clock.now())


def test_operator_identity_uses_its_kind_in_the_spiffe_id(issuer: Issuer) -> None:
    template = LeafTemplate(IdentityKind.OPERATOR, "alice", TRUST_DOMAIN, HOUR)
    cert = issuer.issue(template, LocalSigner.generate().public_key())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://fleet.example/operator/alice"
    ]


def test_not_before_is_backdated_sixty_seconds(issuer: Issuer, clock: FakeClock) -> None:
    clock.advance(timedelta(hours=3))
    cert = issuer.issue(device(), LocalSigner.generate().public_key())
    assert cert.not_valid_before_utc == clock.now() - timedelta(seconds=60)
    assert cert.not_valid_after_utc == clock.now() + HOUR


def test_backdate_is_configurable(issuing_ca: CertificateAuthority, clock: FakeClock) -> None:
    clock.advance(timedelta(hours=3))
    issuer = Issuer(issuing_ca, clock, backdate=timedelta(seconds=5))
    cert = issuer.issue(device(), LocalSigner.generate().public_key())
    assert cert.not_valid_before_utc == clock.now() - timedelta(seconds=5)


@pytest.mark.parametrize("backdate", [timedelta(seconds=-1), timedelta(hours=2)])
def test_backdate_out_of_range(
    issuing_ca: CertificateAuthority, clock: FakeClock, backdate: timedelta
) -> None:
    with pytest.raises(ValueError):
        Issuer(issuing_ca, clock, backdate=backdate)


def test_sub_second_clock_is_truncated(issuer: Issuer, clock: FakeClock) -> None:
    clock.advance(timedelta(hours=1, microseconds=750_000))
    cert = issuer.issue(device(), LocalSigner.generate().public_key())
    whole = clock.now().replace(microsecond=0)
    assert cert.not_valid_after_utc == whole + HOUR


def test_not_after_is_capped_by_the_issuing_ca(issuer: Issuer, clock: FakeClock) -> None:
    ca_end = issuer.ca.certificate.not_valid_after_utc
    clock.set(ca_end - timedelta(minutes=10))
    cert = issuer.issue(device(lifetime=timedelta(days=1)), LocalSigner.generate().public_key())
    assert cert.not_valid_after_utc == ca_end
    assert_profile(cert, issuer=issuer.ca.certificate, now=clock.now())


def test_not_before_is_clamped_to_the_issuing_ca(issuer: Issuer, clock: FakeClock) -> None:
    ca_start = issuer.ca.certificate.not_valid_before_utc
    clock.set(ca_start + timedelta(seconds=10))
    cert = issuer.issue(device(), LocalSigner.generate().public_key())
    assert cert.not_valid_before_utc == ca_start


def test_expired_issuing_ca_issues_nothing(issuer: Issuer, clock: FakeClock) -> None:
    clock.set(issuer.ca.certificate.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(IssuanceError) as caught:
        issuer.issue(device(), LocalSigner.generate().public_key())
    assert caught.value.reason is Reason.ISSUANCE_FAILED
    assert "expired" in caught.value.detail


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: x25519.X25519PrivateKey.generate().public_key(),
        lambda: ed448.Ed448PrivateKey.generate().public_key(),
        lambda: dsa.generate_private_key(key_size=1024).public_key(),
        lambda: "not a key",
    ],
)
def test_keys_that_cannot_sign_get_no_certificate(
    issuer: Issuer, make_key: Callable[[], CertificatePublicKeyTypes]
) -> None:
    with pytest.raises(IssuanceError) as caught:
        issuer.issue(device(), make_key())
    assert caught.value.reason is Reason.KEY_NOT_ALLOWED


def test_issue_requires_a_template(issuer: Issuer) -> None:
    with pytest.raises(TypeError):
        issuer.issue("sensor-1", LocalSigner.generate().public_key())  # type: ignore[arg-type]


def test_chain_is_issuing_ca_then_root(issuer: Issuer, issuing_ca: CertificateAuthority) -> None:
    assert issuer.chain == (issuing_ca.certificate, issuing_ca.root)


# serials


def test_serial_uses_injected_randomness(
    issuing_ca: CertificateAuthority, clock: FakeClock
) -> None:
    issuer = Issuer(issuing_ca, clock, random_bits=lambda bits: 12345)
    assert issuer.issue(device(), LocalSigner.generate().public_key()).serial_number == 12345


def test_zero_serial_is_drawn_again(issuing_ca: CertificateAuthority, clock: FakeClock) -> None:
    draws = iter([0, 0, 7])
    issuer = Issuer(issuing_ca, clock, random_bits=lambda bits: next(draws))
    assert issuer.issue(device(), LocalSigner.generate().public_key()).serial_number == 7


@pytest.mark.parametrize("value", [0, -1, 1 << SERIAL_BITS, 2.5])
def test_broken_randomness_is_an_issuance_error(
    issuing_ca: CertificateAuthority, clock: FakeClock, value: object
) -> None:
    issuer = Issuer(issuing_ca, clock, random_bits=lambda bits: value)  # type: ignore[arg-type,return-value]
    with pytest.raises(IssuanceError) as caught:
        issuer.issue(device(), LocalSigner.generate().public_key())
    assert caught.value.reason is Reason.ISSUANCE_FAILED


def test_serials_asked_for_159_bits() -> None:
    asked: list[int] = []

    def bits(n: int) -> int:
        asked.append(n)
        return 1

    new_serial_number(bits)
    assert asked == [159]


def test_hundred_thousand_serials_are_unique_and_positive() -> None:
    serials = [new_serial_number() for _ in range(100_000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < (1 << SERIAL_BITS) for s in serials)
    # The top bits are used too: these are 159-bit numbers, not small ones.
    assert max(serials).bit_length() == SERIAL_BITS


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=(1 << SERIAL_BITS) - 1))
def test_any_159_bit_serial_survives_issuance(serial: int) -> None:
    clock = FakeClock()
    issuer = Issuer(_shared_ca(), clock, random_bits=lambda bits: serial)
    assert issuer.issue(device(), _SHARED_LEAF_KEY).serial_number == serial


_SHARED: list[CertificateAuthority] = []
_SHARED_LEAF_KEY = LocalSigner.generate().public_key()


def _shared_ca() -> CertificateAuthority:
    if not _SHARED:
        _SHARED.append(make_issuing_ca(FakeClock()))
    return _SHARED[0]


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(min_value=0, max_value=170 * 24 * 3600),
    lifetime=st.integers(min_value=60, max_value=400 * 24 * 3600),
)
def test_validity_rules_hold_at_any_time(offset: int, lifetime: int) -> None:
    ca = _shared_ca()
    clock = FakeClock(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=offset))
    cert = Issuer(ca, clock).issue(device(lifetime=timedelta(seconds=lifetime)), _SHARED_LEAF_KEY)
    now = clock.now()
    assert cert.not_valid_before_utc == max(
        now - timedelta(seconds=60), ca.certificate.not_valid_before_utc
    )
    assert cert.not_valid_after_utc == min(
        now + timedelta(seconds=lifetime), ca.certificate.not_valid_after_utc
    )


# validation of what was signed


class _MisbehavingSigner:
    """Wraps the CA's signer and breaks one thing about what it signs."""

    def __init__(
        self,
        inner: LocalSigner,
        alter: Callable[[x509.CertificateBuilder], x509.CertificateBuilder] | None = None,
        sign_with: LocalSigner | None = None,
        fail: bool = False,
    ) -> None:
        self._inner = inner
        self._alter = alter
        self._sign_with = sign_with or inner
        self._fail = fail
        self.key_type = inner.key_type

    def public_key(self) -> CertificatePublicKeyTypes:
        return self._inner.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._inner.sign(data)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        if self._fail:
            raise ConnectionError("token unplugged")
        if self._alter is not None:
            builder = self._alter(builder)
        return self._sign_with.sign_certificate(builder)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return self._inner.sign_crl(builder)


def _issuer_with(ca: CertificateAuthority, clock: FakeClock, **kwargs: object) -> Issuer:
    assert isinstance(ca.signer, LocalSigner)
    signer = _MisbehavingSigner(ca.signer, **kwargs)  # type: ignore[arg-type]
    return Issuer(CertificateAuthority(ca.certificate, signer, ca.chain), clock)


def _expect_rejection(issuer: Issuer, match: str) -> IssuanceError:
    with pytest.raises(IssuanceError) as caught:
        issuer.issue(device(), LocalSigner.generate().public_key())
    assert caught.value.reason is Reason.ISSUANCE_FAILED
    assert match in caught.value.detail
    return caught.value


def test_signature_by_another_key_is_caught(
    issuing_ca: CertificateAuthority, clock: FakeClock
) -> None:
    issuer = _issuer_with(issuing_ca, clock, sign_with=LocalSigner.generate())
    _expect_rejection(issuer, "signature")


def test_extra_extension_is_caught(issuing_ca: CertificateAuthority, clock: FakeClock) -> None:
    def add_ocsp_nocheck(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
        return builder.add_extension(x509.OCSPNoCheck(), critical=False)

    _expect_rejection(_issuer_with(issuing_ca, clock, alter=add_ocsp_nocheck), "extensions")


def _rebuild(builder: x509.CertificateBuilder, **changes: object) -> x509.CertificateBuilder:
    fields = {
        "issuer_name": builder._issuer_name,
        "subject_name": builder._subject_name,
        "public_key": builder._public_key,
        "serial_number": builder._serial_number,
        "not_valid_before": builder._not_valid_before,
        "not_valid_after": builder._not_valid_after,
        "extensions": builder._extensions,
    }
    fields.update(changes)
    return x509.CertificateBuilder(**fields)  # type: ignore[arg-type]


def _as_ca(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    ca_true = x509.BasicConstraints(ca=True, path_length=None)
    extensions = [
        x509.Extension(e.oid, e.critical, ca_true)
        if isinstance(e.value, x509.BasicConstraints)
        else e
        for e in builder._extensions
    ]
    return _rebuild(builder, extensions=extensions)


def _reordered(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    return _rebuild(builder, extensions=list(reversed(builder._extensions)))


IMPOSTOR_KEY = LocalSigner.generate().public_key()
OTHER_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")])


@pytest.mark.parametrize(
    ("alter", "match"),
    [
        (_as_ca, "2.5.29.19"),
        (_reordered, "extensions are"),
        (lambda b: _rebuild(b, public_key=IMPOSTOR_KEY), "public key"),
        (lambda b: _rebuild(b, subject_name=OTHER_NAME), "subject"),
        (lambda b: _rebuild(b, issuer_name=OTHER_NAME), "issuer name"),
        (lambda b: _rebuild(b, serial_number=b._serial_number + 1), "serial"),
        (lambda b: _rebuild(b, not_valid_after=b._not_valid_after + HOUR), "validity"),
    ],
)
def test_any_changed_field_is_caught(
    issuing_ca: CertificateAuthority,
    clock: FakeClock,
    alter: Callable[[x509.CertificateBuilder], x509.CertificateBuilder],
    match: str,
) -> None:
    _expect_rejection(_issuer_with(issuing_ca, clock, alter=alter), match)


def test_failing_signer_becomes_an_issuance_error(
    issuing_ca: CertificateAuthority, clock: FakeClock
) -> None:
    error = _expect_rejection(_issuer_with(issuing_ca, clock, fail=True), "ConnectionError")
    assert isinstance(error.__cause__, ConnectionError)


def test_validate_issued_accepts_what_the_issuer_made(issuer: Issuer, clock: FakeClock) -> None:
    key = LocalSigner.generate().public_key()
    cert = issuer.issue(device(), key)
    validate_issued(cert, issuer.ca, device(), key, clock.now())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ("name", "subject"),
        ("key", "public key"),
        ("later", "does not cover"),
        ("shorter", "outlives"),
        ("server", "extension"),
        ("other_ca", "issuer name"),
    ],
)
def test_validate_issued_names_the_difference(
    issuer: Issuer, clock: FakeClock, change: str, match: str
) -> None:
    key = LocalSigner.generate().public_key()
    cert = issuer.issue(device(), key)
    template, ca, now = device(), issuer.ca, clock.now()
    if change == "name":
        template = device("sensor-2")
    elif change == "key":
        key = LocalSigner.generate().public_key()
    elif change == "later":
        now = now + timedelta(hours=2)
    elif change == "shorter":
        template = device(lifetime=timedelta(minutes=5))
    elif change == "server":
        template = LeafTemplate(IdentityKind.DEVICE, "sensor-1", TRUST_DOMAIN, HOUR, server=True)
    elif change == "other_ca":
        root = create_root_ca(LocalSigner.generate(), "Other Root", clock)
        ca = create_issuing_ca(root, LocalSigner.generate(), "Other Issuing CA", clock)
    with pytest.raises(IssuanceError) as caught:
        validate_issued(cert, ca, template, key, now)
    assert match in caught.value.detail


def test_validate_issued_checks_the_signature_against_the_given_ca(
    issuer: Issuer, clock: FakeClock
) -> None:
    key = LocalSigner.generate().public_key()
    cert = issuer.issue(device(), key)
    same_name_other_key = make_issuing_ca(clock)
    with pytest.raises(IssuanceError) as caught:
        validate_issued(cert, same_name_other_key, device(), key, clock.now())
    # Same subject names ("Test Issuing CA"), different keys: the authority key identifier
    # differs, and so would the signature.
    assert "2.5.29.35" in caught.value.detail


def test_validity_crossing_into_2050_switches_time_encoding() -> None:
    # RFC 5280: UTCTime through 2049, GeneralizedTime from 2050 on; the signed bytes must match.
    clock = FakeClock(datetime(2049, 12, 31, 23, 30, tzinfo=UTC))
    ca = make_issuing_ca(clock)
    cert = Issuer(ca, clock).issue(device(), LocalSigner.generate().public_key())
    assert cert.not_valid_before_utc.year == 2049
    assert cert.not_valid_after_utc == datetime(2050, 1, 1, 0, 30, tzinfo=UTC)
    assert_profile(cert, issuer=ca.certificate, now=clock.now())
