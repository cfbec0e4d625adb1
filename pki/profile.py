"""What an identity's certificate must say, decided by the registry and never by a CSR.

Identity names end up in MQTT topics and in SPIFFE URI paths, so one pattern governs them
everywhere: ``IDENTITY_NAME_PATTERN``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

__all__ = [
    "IDENTITY_NAME_PATTERN",
    "MIN_LEAF_LIFETIME",
    "TRUST_DOMAIN_PATTERN",
    "IdentityKind",
    "LeafTemplate",
    "check_identity_name",
    "check_trust_domain",
    "is_identity_name",
    "parse_spiffe_id",
    "spiffe_id",
]

# No "/", "+", "#" or leading dot: a name must be safe as one MQTT topic level and one URI
# path segment without escaping.
IDENTITY_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_IDENTITY_NAME = re.compile(IDENTITY_NAME_PATTERN)

# Lower-case DNS labels joined by dots, as SPIFFE asks of trust domains.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
TRUST_DOMAIN_PATTERN = rf"{_LABEL}(?:\.{_LABEL})*"
_TRUST_DOMAIN = re.compile(TRUST_DOMAIN_PATTERN)
_DNS_NAME = re.compile(TRUST_DOMAIN_PATTERN, re.IGNORECASE)
_MAX_DNS_NAME = 253

MIN_LEAF_LIFETIME = timedelta(seconds=60)


class IdentityKind(StrEnum):
    DEVICE = "device"
    OPERATOR = "operator"
    SERVICE = "service"


def is_identity_name(name: object) -> bool:
    return isinstance(name, str) and _IDENTITY_NAME.fullmatch(name) is not None


def check_identity_name(name: object, what: str = "identity name") -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if _IDENTITY_NAME.fullmatch(name) is None:
        raise ValueError(f"{what} {name!r} does not match {IDENTITY_NAME_PATTERN}")
    return name


def check_trust_domain(trust_domain: object) -> str:
    if not isinstance(trust_domain, str):
        raise TypeError(f"trust domain must be a str, not {type(trust_domain).__name__}")
    if len(trust_domain) > 255 or _TRUST_DOMAIN.fullmatch(trust_domain) is None:
        raise ValueError(
            f"trust domain {trust_domain!r} must be lower-case DNS labels joined by dots"
        )
    return trust_domain


def _check_kind(kind: object) -> IdentityKind:
    if not isinstance(kind, IdentityKind):
        raise TypeError(f"kind must be an IdentityKind, not {type(kind).__name__}")
    return kind


def spiffe_id(trust_domain: str, kind: IdentityKind, name: str) -> str:
    """``spiffe://<trust domain>/<kind>/<name>``, after validating every part."""
    check_trust_domain(trust_domain)
    _check_kind(kind)
    check_identity_name(name)
    return f"spiffe://{trust_domain}/{kind.value}/{name}"


def parse_spiffe_id(uri: str) -> tuple[str, IdentityKind, str]:
    """Split one of our SPIFFE ids into (trust domain, kind, name); ValueError if ``uri`` is not
    exactly in the form ``spiffe_id()`` produces."""
    if not isinstance(uri, str):
        raise TypeError(f"uri must be a str, not {type(uri).__name__}")
    prefix = "spiffe://"
    if not uri.startswith(prefix):
        raise ValueError(f"{uri!r} is not a spiffe:// URI")
    authority, _, path = uri[len(prefix) :].partition("/")
    parts = path.split("/")
    if len(parts) != 2:
        raise ValueError(f"{uri!r} must have exactly two path segments: <kind>/<name>")
    kind_text, name = parts
    try:
        kind = IdentityKind(kind_text)
    except ValueError:
        raise ValueError(f"{uri!r} names an unknown identity kind {kind_text!r}") from None
    check_trust_domain(authority)
    check_identity_name(name)
    return authority, kind, name


def _check_dns_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"DNS name must be a str, not {type(name).__name__}")
    if len(name) > _MAX_DNS_NAME or _DNS_NAME.fullmatch(name) is None:
        raise ValueError(f"{name!r} is not a DNS name (no wildcards, no trailing dot)")
    return name


def _check_ip_address(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"IP address must be a str, not {type(text).__name__}")
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None
    return text


def _as_tuple(value: object, what: str) -> tuple[object, ...]:
    # A bare string would otherwise be taken apart letter by letter.
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
        raise TypeError(f"{what} must be a tuple of str, not {type(value).__name__}")
    return tuple(value)


@dataclass(frozen=True)
class LeafTemplate:
    """Everything an issued leaf certificate says about its subject.

    Built from the registry; the CSR contributes only the public key.
    """

    kind: IdentityKind
    name: str
    trust_domain: str
    lifetime: timedelta
    server: bool = False  # serverAuth EKU (the broker's own certificate) instead of clientAuth
    dns_names: tuple[str, ...] = ()  # server certificates only
    ip_addresses: tuple[str, ...] = ()  # server certificates only, e.g. "127.0.0.1"

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        check_identity_name(self.name)
        check_trust_domain(self.trust_domain)
        if not isinstance(self.lifetime, timedelta):
            raise TypeError(f"lifetime must be a timedelta, not {type(self.lifetime).__name__}")
        if self.lifetime < MIN_LEAF_LIFETIME:
            raise ValueError(f"lifetime must be at least {MIN_LEAF_LIFETIME}, got {self.lifetime}")
        if not isinstance(self.server, bool):
            raise TypeError("server must be a bool")
        if self.dns_names == () and self.ip_addresses == ():
            return  # the common case: a client certificate
        dns_names = tuple(_check_dns_name(n) for n in _as_tuple(self.dns_names, "dns_names"))
        ips = tuple(_check_ip_address(a) for a in _as_tuple(self.ip_addresses, "ip_addresses"))
        if (dns_names or ips) and not self.server:
            raise ValueError("dns_names and ip_addresses are only allowed on server certificates")
        object.__setattr__(self, "dns_names", dns_names)
        object.__setattr__(self, "ip_addresses", ips)

    @property
    def spiffe_id(self) -> str:
        # Every part was validated in __post_init__; spiffe_id() would only check them again.
        return f"spiffe://{self.trust_domain}/{self.kind.value}/{self.name}"
