"""Who may do what through the admin API: three roles, each a superset of the one before.

    viewer    read: whoami, list_identities, get_identity, audit, attention, operators, metrics
    operator  + approve, quarantine, release (reversible actions on devices)
    admin     + revoke (final), set_role, revoke_operator

The role lives in the registry, not in the certificate: changing it takes effect at the
operator's next request, without a new certificate.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}

READ_OPS = frozenset(
    {"whoami", "list_identities", "get_identity", "audit", "attention", "operators", "metrics"}
)
OPERATE_OPS = frozenset({"approve", "quarantine", "release"})
ADMIN_OPS = frozenset({"revoke", "set_role", "revoke_operator"})
ALL_OPS = READ_OPS | OPERATE_OPS | ADMIN_OPS
MUTATING_OPS = OPERATE_OPS | ADMIN_OPS

_REQUIRED = {
    **{op: Role.VIEWER for op in READ_OPS},
    **{op: Role.OPERATOR for op in OPERATE_OPS},
    **{op: Role.ADMIN for op in ADMIN_OPS},
}


def parse_role(value: object) -> Role | None:
    """The role ``value`` names, or None (an operator with no valid role may do nothing)."""
    if not isinstance(value, str):
        return None
    try:
        return Role(value)
    except ValueError:
        return None


def required_role(op: str) -> Role:
    """The least role that may run ``op``; KeyError for an op that does not exist."""
    return _REQUIRED[op]


def may(role: Role | None, op: str) -> bool:
    """True when ``role`` may run ``op`` (False for unknown ops and for no role)."""
    needed = _REQUIRED.get(op)
    if role is None or needed is None:
        return False
    return _RANK[role] >= _RANK[needed]
