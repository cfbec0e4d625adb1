"""What the enrollment core asks the transport to publish."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.store import CertificateRecord


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    # Set when the payload carries a new certificate: the identity the broker must admit
    # (with its topic rights) before this reaches the device, which connects right after.
    issued_to: str | None = field(default=None, compare=False)
    # The certificate just issued, when this answer is its first delivery (a replayed answer
    # has only its payload): its serial and expiry go out in the certificate_issued event.
    certificate: CertificateRecord | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.topic, str) or not self.topic:
            raise ValueError("topic must be a non-empty string")
        if not isinstance(self.payload, bytes):
            raise TypeError("payload must be bytes")
        if self.qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
