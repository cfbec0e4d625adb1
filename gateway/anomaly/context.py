"""What the registry says about an identity, as the anomaly engine and its policy need it.

The engine never reads the registry itself: the gateway hands it a ``ContextLookup`` (usually a
read of the identity cache it already keeps for the broker), so the engine stays pure and a
slow database never reaches the per-message path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from gateway.store import IdentityRecord, IdentityState
from pki.clock import require_aware
from pki.profile import IdentityKind

__all__ = ["ContextLookup", "IdentityContext"]


@dataclass(frozen=True, slots=True)
class IdentityContext:
    """An identity's kind, lifecycle state, model and last attested firmware, and when it
    enrolled (``None``: not known)."""

    kind: IdentityKind
    state: IdentityState
    model: str | None = None
    firmware_version: str | None = None
    firmware_digest: str | None = None
    enrolled_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, IdentityKind):
            raise TypeError(f"kind must be an IdentityKind, not {type(self.kind).__name__}")
        if not isinstance(self.state, IdentityState):
            raise TypeError(f"state must be an IdentityState, not {type(self.state).__name__}")
        for name in ("model", "firmware_version", "firmware_digest"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, not {type(value).__name__}")
        if self.enrolled_at is not None:
            object.__setattr__(self, "enrolled_at", require_aware(self.enrolled_at, "enrolled_at"))

    @classmethod
    def from_record(cls, record: IdentityRecord) -> IdentityContext:
        """The context of a registry record; the record's creation stands for its enrollment
        (the registry keeps no separate enrollment time)."""
        return cls(
            kind=record.kind,
            state=record.state,
            model=record.model,
            firmware_version=record.firmware_version,
            firmware_digest=record.firmware_digest,
            enrolled_at=record.created_at,
        )


ContextLookup = Callable[[str], IdentityContext | None]
"""``identity id -> IdentityContext``, or ``None`` for an identity the registry does not hold."""
