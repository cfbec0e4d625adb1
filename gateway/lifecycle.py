"""The identity lifecycle: pending -> active <-> quarantined, and any state -> revoked (final)."""

from __future__ import annotations

from gateway.store import IdentityState

_ALLOWED: dict[IdentityState, frozenset[IdentityState]] = {
    IdentityState.PENDING: frozenset(
        {IdentityState.ACTIVE, IdentityState.QUARANTINED, IdentityState.REVOKED}
    ),
    IdentityState.ACTIVE: frozenset({IdentityState.QUARANTINED, IdentityState.REVOKED}),
    IdentityState.QUARANTINED: frozenset({IdentityState.ACTIVE, IdentityState.REVOKED}),
    IdentityState.REVOKED: frozenset(),
}


class TransitionError(ValueError):
    def __init__(self, current: IdentityState, wanted: IdentityState) -> None:
        super().__init__(f"cannot move from {current} to {wanted}")
        self.current = current
        self.wanted = wanted


def check_transition(current: IdentityState, wanted: IdentityState) -> None:
    """Raise TransitionError unless the lifecycle allows current -> wanted."""
    if wanted not in _ALLOWED[current]:
        raise TransitionError(current, wanted)
