"""The console profile: everything an operator's console needs to reach the gateway, in one
file written by ``fleetgate operator add``.

JSON, mode 0600: the gateway's host and operational port, the CA chain that vouches for the
broker, the operator's certificate chain and its private key encrypted (PKCS#8) under a
passphrase the operator keeps elsewhere. Without the passphrase the file is useless, which is
what lets it travel by ordinary means to the operator's workstation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pki.profile import is_identity_name

FORMAT = "fleetgate-console-profile"
FORMAT_VERSION = 1
MAX_PROFILE_BYTES = 256 * 1024

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_ENCRYPTED_KEY_MARKER = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


class ProfileProblem(StrEnum):
    UNREADABLE = "profile_unreadable"
    MALFORMED = "profile_malformed"
    INVALID_FIELD = "profile_invalid_field"


class ProfileError(ValueError):
    """A profile file that cannot be used, with a stable reason code."""

    def __init__(self, reason: ProfileProblem, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Profile:
    name: str  # the operator's identity name (also its MQTT client id)
    host: str
    port: int
    ca_pem: bytes  # issuing CA and root: verifies the broker
    certificate_pem: bytes  # the operator's certificate, then the issuing CA
    encrypted_key_pem: bytes  # PKCS#8, encrypted under the profile passphrase

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError("name must be a str")
        if not is_identity_name(self.name):
            raise ValueError(f"name {self.name[:64]!r} is not an identity name")
        if not isinstance(self.host, str):
            raise TypeError("host must be a str")
        if not self.host or len(self.host) > 253 or any(c.isspace() for c in self.host):
            raise ValueError("host must be a host name or address")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError("port must be an int")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must lie between 1 and 65535, got {self.port}")
        for field_name, marker in (
            ("ca_pem", _CERT_MARKER),
            ("certificate_pem", _CERT_MARKER),
            ("encrypted_key_pem", _ENCRYPTED_KEY_MARKER),
        ):
            value = getattr(self, field_name)
            if not isinstance(value, bytes):
                raise TypeError(f"{field_name} must be bytes")
            if marker not in value:
                raise ValueError(f"{field_name} holds no {marker.decode().strip('-')}")

    def to_json(self) -> bytes:
        data = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "host": self.host,
            "port": self.port,
            "ca_pem": self.ca_pem.decode("ascii"),
            "certificate_pem": self.certificate_pem.decode("ascii"),
            "encrypted_key_pem": self.encrypted_key_pem.decode("ascii"),
        }
        return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def parse_profile(data: bytes) -> Profile:
    """The profile in ``data``; ProfileError (malformed, invalid_field) otherwise."""
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(ProfileProblem.MALFORMED, f"{len(data)} bytes is not a profile")
    try:
        obj: Any = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProfileError(ProfileProblem.MALFORMED, f"not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ProfileError(ProfileProblem.MALFORMED, "not a Fleetgate console profile")
    if obj.get("version") != FORMAT_VERSION:
        raise ProfileError(
            ProfileProblem.MALFORMED,
            f"profile version {obj.get('version')!r}; this console reads {FORMAT_VERSION}",
        )
    try:
        texts = {
            key: _ascii(obj, key) for key in ("ca_pem", "certificate_pem", "encrypted_key_pem")
        }
        return Profile(name=obj["name"], host=obj["host"], port=obj["port"], **texts)
    except KeyError as exc:
        raise ProfileError(ProfileProblem.INVALID_FIELD, f"missing field {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ProfileError(ProfileProblem.INVALID_FIELD, str(exc)) from None


def _ascii(obj: dict[str, Any], key: str) -> bytes:
    value = obj.get(key)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be a PEM string")
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{key} is not PEM text") from None


def load_profile(path: Path) -> Profile:
    """Read a profile file; ProfileError (unreadable, malformed, invalid_field) otherwise."""
    try:
        with Path(path).open("rb") as handle:
            # One byte more than a profile may hold: parse_profile refuses it without reading
            # a huge file whole.
            data = handle.read(MAX_PROFILE_BYTES + 1)
    except OSError as exc:
        raise ProfileError(ProfileProblem.UNREADABLE, f"{path}: {exc.strerror or exc}") from None
    return parse_profile(data)
