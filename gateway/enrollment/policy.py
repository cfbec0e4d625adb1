"""What the operator decided about enrollment, as one validated value."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from fnmatch import fnmatchcase
from types import MappingProxyType

from cryptography import x509

from pki.profile import MIN_LEAF_LIFETIME, check_trust_domain

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_CERT_LIFETIME = timedelta(days=30)
MAX_PENDING_RETRY_AFTER = 3600
NONCE_TTL_RANGE = (timedelta(seconds=5), timedelta(hours=1))
MAX_CLOCK_SKEW_RANGE = (timedelta(0), timedelta(days=1))


@dataclass(frozen=True)
class ApprovalRule:
    """Devices whose birth certificate names a matching manufacturer and model are approved
    at once; ``fnmatch`` patterns, case-sensitive (``*`` matches anything)."""

    manufacturer: str = "*"
    model: str = "*"

    def __post_init__(self) -> None:
        for name in ("manufacturer", "model"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"ApprovalRule.{name} must be a string")
            if not value:
                raise ValueError(f"ApprovalRule.{name} must not be empty (use '*')")

    def matches(self, manufacturer: str, model: str) -> bool:
        return fnmatchcase(manufacturer, self.manufacturer) and fnmatchcase(model, self.model)


def _frozen_allowlist(value: Mapping[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
    if not isinstance(value, Mapping):
        raise TypeError("firmware_allowlist must map a model to a set of digests")
    checked: dict[str, frozenset[str]] = {}
    for model, digests in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError("firmware_allowlist keys must be non-empty model names")
        if isinstance(digests, str):
            raise TypeError(f"firmware_allowlist[{model!r}] must be a set of digests, not a str")
        frozen = frozenset(digests)
        for digest in frozen:
            if not isinstance(digest, str) or SHA256_HEX.fullmatch(digest) is None:
                raise ValueError(
                    f"firmware_allowlist[{model!r}]: {digest!r} is not a lower-case sha256 hex"
                )
        checked[model] = frozen
    return MappingProxyType(checked)


@dataclass(frozen=True)
class EnrollmentPolicy:
    trust_domain: str
    trusted_roots: tuple[x509.Certificate, ...]
    denied_birth_fingerprints: frozenset[str] = frozenset()
    # model -> allowed sha256 hex digests. A model not listed is accepted only when
    # require_known_firmware is False.
    firmware_allowlist: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    require_known_firmware: bool = False
    auto_approve: tuple[ApprovalRule, ...] = ()  # no matching rule: the device waits, pending
    cert_lifetime: timedelta = timedelta(hours=1)
    renew_fraction: float = 2 / 3
    renew_jitter: float = 0.05  # +- this fraction of the lifetime
    nonce_ttl: timedelta = timedelta(seconds=60)
    max_clock_skew: timedelta = timedelta(minutes=5)
    pending_retry_after: int = 10  # seconds

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        if not isinstance(self.trusted_roots, tuple) or not all(
            isinstance(root, x509.Certificate) for root in self.trusted_roots
        ):
            raise TypeError("trusted_roots must be a tuple of x509.Certificate")
        object.__setattr__(
            self, "denied_birth_fingerprints", frozenset(self.denied_birth_fingerprints)
        )
        for fingerprint in self.denied_birth_fingerprints:
            if not isinstance(fingerprint, str) or SHA256_HEX.fullmatch(fingerprint) is None:
                raise ValueError(f"{fingerprint!r} is not a lower-case sha256 hex fingerprint")
        object.__setattr__(self, "firmware_allowlist", _frozen_allowlist(self.firmware_allowlist))
        if not isinstance(self.auto_approve, tuple) or not all(
            isinstance(rule, ApprovalRule) for rule in self.auto_approve
        ):
            raise TypeError("auto_approve must be a tuple of ApprovalRule")
        if not MIN_LEAF_LIFETIME <= self.cert_lifetime <= MAX_CERT_LIFETIME:
            raise ValueError(
                f"cert_lifetime must lie between {MIN_LEAF_LIFETIME} and {MAX_CERT_LIFETIME}"
            )
        if not 0.1 <= self.renew_fraction <= 0.95:
            raise ValueError("renew_fraction must lie between 0.1 and 0.95")
        if not 0 <= self.renew_jitter <= 0.2:
            raise ValueError("renew_jitter must lie between 0 and 0.2")
        if not NONCE_TTL_RANGE[0] <= self.nonce_ttl <= NONCE_TTL_RANGE[1]:
            raise ValueError("nonce_ttl must lie between 5 s and 1 h")
        if not MAX_CLOCK_SKEW_RANGE[0] <= self.max_clock_skew <= MAX_CLOCK_SKEW_RANGE[1]:
            raise ValueError("max_clock_skew must lie between 0 and 1 day")
        if isinstance(self.pending_retry_after, bool) or not isinstance(
            self.pending_retry_after, int
        ):
            raise TypeError("pending_retry_after must be an integer number of seconds")
        if not 1 <= self.pending_retry_after <= MAX_PENDING_RETRY_AFTER:
            raise ValueError(f"pending_retry_after must lie in 1..{MAX_PENDING_RETRY_AFTER}")

    def approves(self, manufacturer: str | None, model: str | None) -> bool:
        """Whether a device of this manufacturer and model is approved without an operator."""
        return any(
            rule.matches(manufacturer or "", model or "") for rule in self.auto_approve
        )

    def firmware_allowed(self, model: str | None, digest: str | None) -> bool:
        allowed = self.firmware_allowlist.get(model) if model is not None else None
        if allowed is None:
            return not self.require_known_firmware
        return digest is not None and digest in allowed
