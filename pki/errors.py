"""Errors with stable reason codes.

A ``Reason`` value goes on the wire and into the audit trail, so values never change once
released; add new members instead of renaming old ones.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CsrRejected", "IssuanceError", "KeyStoreError", "PkiError", "Reason"]


class Reason(StrEnum):
    # CSR
    BAD_ENCODING = "bad_encoding"
    BAD_SIGNATURE = "bad_signature"
    KEY_NOT_ALLOWED = "key_not_allowed"
    FORBIDDEN_KEY = "forbidden_key"
    DUPLICATE_EXTENSION = "duplicate_extension"
    CSR_OVERREACH = "csr_overreach"
    # attestation
    UNKNOWN_MANUFACTURER = "unknown_manufacturer"
    CHAIN_INVALID = "chain_invalid"
    BIRTH_CERT_EXPIRED = "birth_cert_expired"
    BIRTH_CERT_NOT_YET_VALID = "birth_cert_not_yet_valid"
    BIRTH_CERT_DENIED = "birth_cert_denied"
    BIRTH_CERT_MALFORMED = "birth_cert_malformed"
    EVIDENCE_SIGNATURE_INVALID = "evidence_signature_invalid"
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    # issuance and keys
    ISSUANCE_FAILED = "issuance_failed"
    WRONG_PASSPHRASE = "wrong_passphrase"
    KEY_NOT_FOUND = "key_not_found"
    KEY_EXISTS = "key_exists"


class PkiError(Exception):
    """Base of every error ``pki`` raises on purpose; ``reason`` is the stable code, ``detail``
    a human explanation that never contains key material."""

    reason: Reason
    detail: str

    def __init__(self, reason: Reason, detail: str = "") -> None:
        if not isinstance(reason, Reason):
            raise TypeError(f"reason must be a Reason, not {type(reason).__name__}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason.value!r}, {self.detail!r})"


class CsrRejected(PkiError):
    """A certificate signing request was refused."""


class IssuanceError(PkiError):
    """A certificate could not be issued, or what was signed failed validation."""


class KeyStoreError(PkiError):
    """A key could not be stored, found or decrypted."""
