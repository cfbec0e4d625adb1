"""A device manufacturer, played by simulators and tests.

Like Matter's PAA -> PAI -> DAC, a factory has a root and one intermediate, and mints
IEEE 802.1AR-style birth certificates (IDevIDs): the device's identity is in the subject
(O=manufacturer, OU=model, serialNumber), with no SAN and no EKU.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID

from pki._build import authority_key_identifier, leaf_key_usage, whole_seconds
from pki.ca import CertificateAuthority, create_issuing_ca, create_root_ca
from pki.clock import Clock, require_aware
from pki.keys import KeyType, LocalSigner
from pki.profile import check_identity_name
from pki.serials import new_serial_number

__all__ = ["BirthCredential", "FactoryCA", "birth_subject"]

_MAX_ATTRIBUTE = 64
# Manufacturer roots outlive the devices they vouch for: birth certificates last years.
_ROOT_LIFETIME = timedelta(days=365 * 30)
_INTERMEDIATE_LIFETIME = timedelta(days=365 * 25)
_BACKDATE = timedelta(seconds=60)
_CA_KEY_TYPES = frozenset({KeyType.P256, KeyType.P384})


def _check_label(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value.strip() or len(value) > _MAX_ATTRIBUTE or not value.isprintable():
        raise ValueError(f"{what} must be 1 to {_MAX_ATTRIBUTE} printable characters")
    return value


def birth_subject(manufacturer: str, model: str, serial_number: str) -> x509.Name:
    """O=<manufacturer>, OU=<model>, serialNumber=<serial>, CN=<model> <serial>."""
    _check_label(manufacturer, "manufacturer")
    _check_label(model, "model")
    check_identity_name(serial_number, "serial number")
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, manufacturer),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, model),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{model} {serial_number}"[:_MAX_ATTRIBUTE]),
        ]
    )


@dataclass(frozen=True)
class BirthCredential:
    """What a device leaves the factory with."""

    signer: LocalSigner
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates only: leaf and root excluded
    serial_number: str
    model: str
    manufacturer: str

    def __post_init__(self) -> None:
        if not isinstance(self.signer, LocalSigner):
            raise TypeError("signer must be a LocalSigner")
        if not isinstance(self.certificate, x509.Certificate):
            raise TypeError("certificate must be an x509.Certificate")
        chain = tuple(self.chain)
        if not all(isinstance(c, x509.Certificate) for c in chain):
            raise TypeError("chain must hold x509.Certificate objects")
        object.__setattr__(self, "chain", chain)
        check_identity_name(self.serial_number, "serial number")
        _check_label(self.model, "model")
        _check_label(self.manufacturer, "manufacturer")

    @property
    def device_id(self) -> str:
        return self.serial_number

    @property
    def presented_chain(self) -> tuple[x509.Certificate, ...]:
        """Birth certificate then intermediates: what a device sends in its hello."""
        return (self.certificate, *self.chain)


class FactoryCA:
    """A manufacturer's root and intermediate, minting birth certificates."""

    def __init__(
        self,
        manufacturer: str,
        root: CertificateAuthority,
        intermediate: CertificateAuthority,
        clock: Clock,
        *,
        random_bits: Callable[[int], int] = secrets.randbits,
    ) -> None:
        self._manufacturer = _check_label(manufacturer, "manufacturer")
        if not isinstance(root, CertificateAuthority) or not isinstance(
            intermediate, CertificateAuthority
        ):
            raise TypeError("root and intermediate must be CertificateAuthority values")
        if intermediate.chain[:1] != (root.certificate,):
            raise ValueError("intermediate was not issued by root")
        self._root = root
        self._intermediate = intermediate
        self._clock = clock
        self._random_bits = random_bits

    @classmethod
    def create(
        cls,
        manufacturer: str,
        clock: Clock,
        key_type: KeyType = KeyType.P256,
        *,
        random_bits: Callable[[int], int] = secrets.randbits,
    ) -> FactoryCA:
        _check_label(manufacturer, "manufacturer")
        if KeyType(key_type) not in _CA_KEY_TYPES:
            # The chain is verified with cryptography's x509.verification, which follows the
            # web PKI profile and refuses Ed25519 CA keys with no setting to allow them. Real
            # manufacturer CAs (802.1AR, Matter) are ECDSA or RSA; device keys may be Ed25519.
            raise ValueError(f"manufacturer CA keys must be P-256 or P-384, not {key_type}")
        root = create_root_ca(
            LocalSigner.generate(key_type),
            f"{manufacturer} Root CA"[:_MAX_ATTRIBUTE],
            clock,
            _ROOT_LIFETIME,
            random_bits=random_bits,
            organization=manufacturer,
        )
        intermediate = create_issuing_ca(
            root,
            LocalSigner.generate(key_type),
            f"{manufacturer} Device CA"[:_MAX_ATTRIBUTE],
            clock,
            _INTERMEDIATE_LIFETIME,
            random_bits=random_bits,
            organization=manufacturer,
        )
        return cls(manufacturer, root, intermediate, clock, random_bits=random_bits)

    @property
    def manufacturer(self) -> str:
        return self._manufacturer

    @property
    def root(self) -> x509.Certificate:
        return self._root.certificate

    @property
    def intermediate(self) -> x509.Certificate:
        return self._intermediate.certificate

    @property
    def root_ca(self) -> CertificateAuthority:
        return self._root

    @property
    def intermediate_ca(self) -> CertificateAuthority:
        """The minting CA itself, for tests that need to sign something unusual."""
        return self._intermediate

    def mint(
        self,
        serial_number: str,
        model: str,
        *,
        lifetime: timedelta = timedelta(days=3650),
        not_before: datetime | None = None,
        key_type: KeyType = KeyType.P256,
    ) -> BirthCredential:
        """A new device key and its birth certificate. ``not_before`` defaults to a minute ago;
        tests set it (and ``lifetime``) to make certificates that are expired or not yet
        valid."""
        subject = birth_subject(self._manufacturer, model, serial_number)
        if not isinstance(lifetime, timedelta):
            raise TypeError("lifetime must be a timedelta")
        if lifetime <= timedelta(0):
            raise ValueError("lifetime must be positive")
        if not_before is None:
            start = require_aware(self._clock.now(), "clock.now()") - _BACKDATE
        else:
            start = require_aware(not_before, "not_before")
        start = whole_seconds(start)
        signer = LocalSigner.generate(key_type)
        public_key = signer.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.intermediate.subject)
            .public_key(public_key)
            .serial_number(new_serial_number(self._random_bits))
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(leaf_key_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(authority_key_identifier(self.intermediate), critical=False)
        )
        certificate = self._intermediate.signer.sign_certificate(builder)
        return BirthCredential(
            signer=signer,
            certificate=certificate,
            chain=(self.intermediate,),
            serial_number=serial_number,
            model=model,
            manufacturer=self._manufacturer,
        )

    def __repr__(self) -> str:
        return f"FactoryCA({self._manufacturer!r})"

