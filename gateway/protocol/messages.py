"""Protocol v1 messages as frozen values, each validated when built.

Binary fields hold raw bytes (DER, nonces, signatures); the codec does the base64. A message that
exists is a valid message: the codec parses a payload once, at the edge, into one of these, and
every later step matches on the class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

VERSION = 1
MAX_PAYLOAD = 64 * 1024
REQUEST_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
TOKEN_PATTERN = r"[A-Za-z0-9_-]{16,128}"
FIRMWARE_VERSION_PATTERN = r"[\x20-\x7e]{1,64}"  # printable ASCII
FIRMWARE_DIGEST_PATTERN = r"[0-9a-f]{64}"  # sha256, lower-case hex
REASON_PATTERN = r"[a-z][a-z0-9_]{0,63}"
MAX_CHAIN = 4  # birth certificate plus up to three intermediates; issuing CA plus root
MAX_DER = 8192
MAX_SIGNATURE = 1024
MIN_NONCE, MAX_NONCE = 16, 64
MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a datetime can hold
MAX_RETRY_AFTER = 86_400
# Bounds of a requested certificate lifetime, in seconds: pki's shortest leaf
# (pki.profile.MIN_LEAF_LIFETIME) and the longest a policy may grant
# (gateway.enrollment.policy.MAX_CERT_LIFETIME). The gateway grants at most its policy's.
MIN_LIFETIME = 60
MAX_LIFETIME = 30 * 86_400
MAX_DETAIL = 1024

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_TOKEN = re.compile(TOKEN_PATTERN)
_FW_VERSION = re.compile(FIRMWARE_VERSION_PATTERN)
_FW_DIGEST = re.compile(FIRMWARE_DIGEST_PATTERN)
_REASON = re.compile(REASON_PATTERN)


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _REQUEST_ID.fullmatch(value) is not None


def _text(name: str, value: object, pattern: re.Pattern[str]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string")
    if pattern.fullmatch(value) is None:
        raise ValueError(f"{name} must match {pattern.pattern}")


def _request_id(value: object) -> None:
    _text("id", value, _REQUEST_ID)


def _blob(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes")
    if not low <= len(value) <= high:
        raise ValueError(f"{name} must be {low}..{high} bytes, got {len(value)}")


def _chain(name: str, value: object) -> None:
    if not isinstance(value, tuple):
        raise TypeError(f"{name} must be a tuple of DER certificates")
    if not 1 <= len(value) <= MAX_CHAIN:
        raise ValueError(f"{name} must hold 1..{MAX_CHAIN} certificates, got {len(value)}")
    for index, der in enumerate(value):
        _blob(f"{name}[{index}]", der, 1, MAX_DER)


def _integer(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass; true is not a time.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in {low}..{high}")


def check_lifetime(value: object) -> None:
    """A requested lifetime: ``None`` (the policy's) or whole seconds in
    ``MIN_LIFETIME..MAX_LIFETIME``; TypeError or ValueError otherwise."""
    if value is not None:
        _integer("lifetime", value, MIN_LIFETIME, MAX_LIFETIME)


@dataclass(frozen=True)
class Firmware:
    """The firmware measurement a device reports: its version and the sha256 of its image."""

    version: str
    digest: str  # 64 lower-case hex digits

    def __post_init__(self) -> None:
        _text("firmware.version", self.version, _FW_VERSION)
        _text("firmware.digest", self.digest, _FW_DIGEST)


# Requests (device -> gateway)


@dataclass(frozen=True)
class Hello:
    """Step 1: the birth certificate chain; the gateway answers with a ``Challenge``."""

    TYPE: ClassVar[str] = "hello"
    id: str
    chain: tuple[bytes, ...]  # DER: birth certificate first, then its intermediates

    def __post_init__(self) -> None:
        _request_id(self.id)
        _chain("chain", self.chain)


@dataclass(frozen=True)
class Enroll:
    """Step 3: a CSR for a new key, bound to the challenge by evidence the birth key signed."""

    TYPE: ClassVar[str] = "enroll"
    id: str
    nonce: bytes  # the gateway's challenge nonce
    device_nonce: bytes  # chosen by the device, so it never signs bytes chosen only by us
    csr: bytes  # DER
    chain: tuple[bytes, ...]
    firmware: Firmware
    time: int  # device clock, unix seconds
    evidence: bytes  # birth-key signature over pki.attestation.EvidenceClaims.to_bytes()
    lifetime: int | None = None  # seconds the device asks for; None: the policy's

    def __post_init__(self) -> None:
        _request_id(self.id)
        _blob("nonce", self.nonce, MIN_NONCE, MAX_NONCE)
        _blob("device_nonce", self.device_nonce, MIN_NONCE, MAX_NONCE)
        _blob("csr", self.csr, 1, MAX_DER)
        _chain("chain", self.chain)
        if not isinstance(self.firmware, Firmware):
            raise TypeError("firmware must be a Firmware")
        _integer("time", self.time, 0, MAX_TIME)
        _blob("evidence", self.evidence, 1, MAX_SIGNATURE)
        check_lifetime(self.lifetime)


@dataclass(frozen=True)
class TokenEnroll:
    """Enrollment without a birth certificate, with a one-time token an operator created."""

    TYPE: ClassVar[str] = "token_enroll"
    id: str
    token: str
    csr: bytes
    time: int
    firmware: Firmware | None = None
    lifetime: int | None = None

    def __post_init__(self) -> None:
        _request_id(self.id)
        _text("token", self.token, _TOKEN)
        _blob("csr", self.csr, 1, MAX_DER)
        _integer("time", self.time, 0, MAX_TIME)
        if self.firmware is not None and not isinstance(self.firmware, Firmware):
            raise TypeError("firmware must be a Firmware or None")
        check_lifetime(self.lifetime)


@dataclass(frozen=True)
class Renew:
    """A CSR for a new key, signed with the current operational key (see ``renewal_bytes``)."""

    TYPE: ClassVar[str] = "renew"
    id: str
    csr: bytes
    time: int
    signature: bytes
    firmware: Firmware | None = None
    # Not covered by the signature: a wish the gateway caps by its policy, not a claim.
    lifetime: int | None = None

    def __post_init__(self) -> None:
        _request_id(self.id)
        _blob("csr", self.csr, 1, MAX_DER)
        _integer("time", self.time, 0, MAX_TIME)
        _blob("signature", self.signature, 1, MAX_SIGNATURE)
        if self.firmware is not None and not isinstance(self.firmware, Firmware):
            raise TypeError("firmware must be a Firmware or None")
        check_lifetime(self.lifetime)


# Responses (gateway -> device); each echoes the request's id.


@dataclass(frozen=True)
class Challenge:
    TYPE: ClassVar[str] = "challenge"
    id: str
    nonce: bytes
    expires_at: int  # unix seconds

    def __post_init__(self) -> None:
        _request_id(self.id)
        _blob("nonce", self.nonce, MIN_NONCE, MAX_NONCE)
        _integer("expires_at", self.expires_at, 0, MAX_TIME)


@dataclass(frozen=True)
class IssuedCertificate:
    TYPE: ClassVar[str] = "certificate"
    id: str
    certificate: bytes  # DER leaf
    chain: tuple[bytes, ...]  # DER: issuing CA, ..., root
    not_after: int
    renew_after: int

    def __post_init__(self) -> None:
        _request_id(self.id)
        _blob("certificate", self.certificate, 1, MAX_DER)
        _chain("chain", self.chain)
        _integer("not_after", self.not_after, 0, MAX_TIME)
        _integer("renew_after", self.renew_after, 0, MAX_TIME)


@dataclass(frozen=True)
class Pending:
    """Waiting for an operator's approval: send the same request again after ``retry_after``."""

    TYPE: ClassVar[str] = "pending"
    id: str
    retry_after: int  # seconds

    def __post_init__(self) -> None:
        _request_id(self.id)
        _integer("retry_after", self.retry_after, 0, MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Error:
    """A refusal with a reason code (``ReasonCode``); ``id`` is None when the request's id
    could not be read. ``reason`` is a plain string so a device can receive codes newer than
    itself."""

    TYPE: ClassVar[str] = "error"
    id: str | None
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.id is not None:
            _request_id(self.id)
        _text("reason", self.reason, _REASON)
        if not isinstance(self.detail, str):
            raise TypeError("detail must be a string")
        if len(self.detail) > MAX_DETAIL:
            raise ValueError(f"detail must be at most {MAX_DETAIL} characters")


Request = Hello | Enroll | TokenEnroll | Renew
Response = Challenge | IssuedCertificate | Pending | Error
Message = Request | Response

REQUEST_TYPES: dict[str, type[Request]] = {
    cls.TYPE: cls for cls in (Hello, Enroll, TokenEnroll, Renew)
}
RESPONSE_TYPES: dict[str, type[Response]] = {
    cls.TYPE: cls for cls in (Challenge, IssuedCertificate, Pending, Error)
}
