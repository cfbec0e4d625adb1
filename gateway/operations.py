"""Operator actions on identities: approve, quarantine, release, revoke, bootstrap tokens.

Shared by the CLI and the admin API. Each action is one `Store` call that changes the registry
and appends its audit event in the same transaction, so the trail can never disagree with the
registry. None of them needs the CA key: `fleetgate device approve` works in a shell without
the passphrase, and the running gateway picks the change up (see `gateway.service`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum

from gateway.config import Settings
from gateway.enrollment.tokens import new_token, token_hash
from gateway.lifecycle import TransitionError, check_transition
from gateway.protocol.topics import valid_device_id
from gateway.store import AuditEntry, IdentityRecord, IdentityState, Store, TokenRecord
from pki.clock import Clock, SystemClock

DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_TOKEN_TTL = timedelta(days=30)


class OperationRefusal(StrEnum):
    UNKNOWN_IDENTITY = "unknown_identity"
    NOT_PENDING = "not_pending"
    TRANSITION_FORBIDDEN = "transition_forbidden"
    INVALID_DEVICE_ID = "invalid_device_id"
    INVALID_TTL = "invalid_ttl"
    MISSING_ACTOR = "missing_actor"
    DEVICE_REVOKED = "device_revoked"


class OperationError(ValueError):
    """An operator action that cannot be done, with a stable reason code."""

    def __init__(self, reason: OperationRefusal, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def open_store(settings: Settings) -> Store:
    from gateway.registry import SqlStore

    return SqlStore(settings.database)


def _require_actor(actor: str) -> None:
    if not actor:
        raise OperationError(OperationRefusal.MISSING_ACTOR, "an action must name who acts")


def change_state(
    store: Store,
    identity_id: str,
    wanted: IdentityState,
    *,
    action: str,
    actor: str,
    reason: str = "",
    clock: Clock | None = None,
) -> IdentityRecord:
    """Move an identity to ``wanted`` as the lifecycle allows, audited as ``action``."""
    _require_actor(actor)
    now = (clock or SystemClock()).now()
    record = store.get_identity(identity_id)
    if record is None:
        raise OperationError(OperationRefusal.UNKNOWN_IDENTITY, f"no identity {identity_id!r}")
    try:
        check_transition(record.state, wanted)
    except TransitionError as exc:
        raise OperationError(
            OperationRefusal.TRANSITION_FORBIDDEN, f"{identity_id}: {exc}"
        ) from None
    entry = AuditEntry(
        actor=actor,
        action=action,
        subject=identity_id,
        outcome="ok",
        at=now,
        reasons=(reason,) if reason else (),
        detail={"from": record.state.value, "to": wanted.value},
    )
    revoked = wanted is IdentityState.REVOKED
    try:
        return store.change_state(
            identity_id,
            wanted,
            now,
            audit=[entry],
            revocation_reason=(reason or "unspecified") if revoked else None,
        )
    except KeyError:
        raise OperationError(OperationRefusal.UNKNOWN_IDENTITY, identity_id) from None
    except TransitionError as exc:  # changed by someone else between our read and write
        raise OperationError(OperationRefusal.TRANSITION_FORBIDDEN, str(exc)) from None


def approve(
    store: Store, identity_id: str, *, actor: str, clock: Clock | None = None
) -> IdentityRecord:
    """Pending -> active. The device's next retry of its pending request gets a certificate."""
    record = store.get_identity(identity_id)
    if record is None:
        raise OperationError(OperationRefusal.UNKNOWN_IDENTITY, f"no identity {identity_id!r}")
    if record.state is not IdentityState.PENDING:
        raise OperationError(
            OperationRefusal.NOT_PENDING, f"{identity_id} is {record.state.value}, not pending"
        )
    return change_state(
        store, identity_id, IdentityState.ACTIVE, action="approve", actor=actor, clock=clock
    )


def create_token(
    store: Store,
    device_id: str,
    *,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
    actor: str,
    clock: Clock | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> str:
    """A one-time bootstrap token for a device without a birth certificate (url-safe, 192
    bits). Only its sha256 is stored; the token itself is returned once, here."""
    if not valid_device_id(device_id):
        raise OperationError(
            OperationRefusal.INVALID_DEVICE_ID, f"{device_id!r} is not a valid device id"
        )
    if not timedelta(0) < ttl <= MAX_TOKEN_TTL:
        raise OperationError(
            OperationRefusal.INVALID_TTL,
            f"token lifetime must be positive and at most {MAX_TOKEN_TTL.days} days",
        )
    _require_actor(actor)
    existing = store.get_identity(device_id)
    if existing is not None and existing.state is IdentityState.REVOKED:
        raise OperationError(OperationRefusal.DEVICE_REVOKED, f"{device_id} is revoked")
    now = (clock or SystemClock()).now()
    token = new_token(random_bytes)
    record = TokenRecord(
        token_hash=token_hash(token),
        device_id=device_id,
        created_at=now,
        expires_at=now + ttl,
        created_by=actor,
    )
    entry = AuditEntry(
        actor=actor,
        action="token_create",
        subject=device_id,
        outcome="ok",
        at=now,
        detail={"expires_at": record.expires_at.isoformat()},
    )
    store.put_token(record, audit=[entry])
    return token
