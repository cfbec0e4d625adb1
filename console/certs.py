"""Certificates as the detail pane lists them: from the admin API's ``get_identity`` answer (the
identity's own certificates) and from the profile's CA chain (issuing CA and root)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True)
class CertSummary:
    subject: str
    san: str
    serial: str  # hex
    not_before: str
    not_after: str
    status: str  # active | superseded | revoked | CA

    def __post_init__(self) -> None:
        for name in ("subject", "san", "serial", "not_before", "not_after", "status"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str")


def _text(data: Mapping[str, object], name: str) -> str:
    value = data.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def summary_from_wire(data: Mapping[str, object]) -> CertSummary:
    serial = data.get("serial")
    return CertSummary(
        subject=_text(data, "subject"),
        san=_text(data, "san"),
        serial=f"{serial:x}" if isinstance(serial, int) else _text(data, "serial"),
        not_before=_text(data, "not_before"),
        not_after=_text(data, "not_after"),
        status=_text(data, "status"),
    )


def summary_of(certificate: x509.Certificate, status: str) -> CertSummary:
    try:
        san_ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        san = ", ".join(str(v.value) for v in san_ext.value)
    except x509.ExtensionNotFound:
        san = ""
    return CertSummary(
        subject=certificate.subject.rfc4514_string(),
        san=san,
        serial=f"{certificate.serial_number:x}",
        not_before=certificate.not_valid_before_utc.isoformat(),
        not_after=certificate.not_valid_after_utc.isoformat(),
        status=status,
    )


def ca_chain(pem: bytes) -> list[CertSummary]:
    """The CA certificates of a profile, issuing CA first; unreadable PEM gives none."""
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []
    return [summary_of(c, "CA") for c in certificates]
