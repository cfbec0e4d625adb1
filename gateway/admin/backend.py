"""What the admin API needs from the gateway, behind one small port.

``GatewayBackend`` acts through a running ``Gateway``: every state change is made in the
registry and enforced on the broker before the call returns, so an operator's reply means "in
force". ``RegistryBackend`` changes the registry only (a running gateway enforces the change
within a fraction of a second when it sees the audit head move); it serves tests and tools.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from gateway import operations
from gateway.metrics_export import gateway_counts, node_name
from gateway.store import IdentityRecord, IdentityState, Store
from pki.clock import Clock

if TYPE_CHECKING:
    from gateway.service import Gateway

log = logging.getLogger(__name__)

# How long an admin request may wait for the gateway's loop to enforce a change; past this the
# operator is told "unavailable" (the registry change may still have been made: see the trail).
ENFORCE_TIMEOUT_SECONDS = 10.0
# A gateway of a cluster that does not lead waits for the leader itself (ClusterMember's
# enforce_timeout, 10 s by default) and then says why: "not_enforced_yet". The admin request
# waits that long plus the registry write, so the operator hears the reason, not a bare timeout.
CLUSTER_MARGIN_SECONDS = 5.0

# Principal kinds that are identities in the registry (not enrollees, not the internal client).
_IDENTITY_KINDS = frozenset({"device", "operator", "service"})


class AdminBackend(Protocol):
    @property
    def store(self) -> Store: ...
    @property
    def clock(self) -> Clock: ...

    def set_state(
        self, identity_id: str, state: IdentityState, *, action: str, actor: str, reason: str
    ) -> IdentityRecord:
        """Change the state (audited as ``action`` by ``actor``) and enforce it. Raises
        ``operations.OperationError``; TimeoutError when enforcement did not finish in time;
        ``ClusterError(NOT_ENFORCED)`` when a gateway that does not lead saw no leader
        confirm the change in time (it stays recorded)."""
        ...

    def approve(self, identity_id: str, *, actor: str) -> IdentityRecord:
        """Pending -> active, audited, enforced. Raises ``operations.OperationError``."""
        ...

    def connected(self) -> frozenset[str]:
        """Names of the identities with a live operational session now."""
        ...

    def audit_public_key(self) -> CertificatePublicKeyTypes | None:
        """The key that verifies audit checkpoints (None: unknown here)."""
        ...

    def node(self) -> str:
        """The name of the gateway that answers (its cluster node name, else the host's)."""
        ...

    def counters(self) -> dict[str, dict[str, float]]:
        """The gateway's ``enrollment``, ``gateway`` and ``broker`` counters, copied now;
        callable from any thread, never waits for the event loop."""
        ...


class RegistryBackend:
    """Changes the registry only; ``connected`` is whatever the caller says."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        audit_key: CertificatePublicKeyTypes | None = None,
        connected: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self._clock = clock
        self._audit_key = audit_key
        self.online = frozenset(connected)

    @property
    def store(self) -> Store:
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    def set_state(
        self, identity_id: str, state: IdentityState, *, action: str, actor: str, reason: str
    ) -> IdentityRecord:
        return operations.change_state(
            self._store,
            identity_id,
            state,
            action=action,
            actor=actor,
            reason=reason,
            clock=self._clock,
        )

    def approve(self, identity_id: str, *, actor: str) -> IdentityRecord:
        return operations.approve(self._store, identity_id, actor=actor, clock=self._clock)

    def connected(self) -> frozenset[str]:
        return self.online

    def audit_public_key(self) -> CertificatePublicKeyTypes | None:
        return self._audit_key

    def node(self) -> str:
        return node_name()

    def counters(self) -> dict[str, dict[str, float]]:
        # no gateway runs here: nothing was counted
        return {"enrollment": {}, "gateway": {}, "broker": {}}


class GatewayBackend:
    """Acts through a running ``Gateway``; called from the admin worker thread, never from the
    gateway's event loop (``Gateway.call`` waits for the loop)."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        audit_key: CertificatePublicKeyTypes | None = None,
        timeout: float = ENFORCE_TIMEOUT_SECONDS,
    ) -> None:
        self._gateway = gateway
        self._audit_key = audit_key
        self._timeout = timeout

    @property
    def store(self) -> Store:
        return self._gateway.store

    @property
    def clock(self) -> Clock:
        return self._gateway.clock

    def set_state(
        self, identity_id: str, state: IdentityState, *, action: str, actor: str, reason: str
    ) -> IdentityRecord:
        gateway = self._gateway
        timeout = self._timeout + (CLUSTER_MARGIN_SECONDS if gateway.cluster is not None else 0)
        return gateway.call(
            gateway.set_state(identity_id, state, action=action, actor=actor, reason=reason),
            timeout,
        )

    def approve(self, identity_id: str, *, actor: str) -> IdentityRecord:
        gateway = self._gateway
        # operations.approve refuses anything but a pending identity, which set_state alone
        # would not (quarantined -> active is a release, not an approval).
        record = operations.approve(gateway.store, identity_id, actor=actor, clock=gateway.clock)
        gateway.call(self._admit(record), self._timeout)
        return record

    async def _admit(self, record: IdentityRecord) -> None:
        """Let the approved identity onto the broker now rather than at the next poll of the
        registry (the poll then finds nothing left to do)."""
        gateway = self._gateway
        gateway.states.set(record.id, record.state)
        if gateway.broker is not None:
            await gateway.broker.apply(record.id, record.state, kind=record.kind)
        gateway.emit("state_changed", record.id, kind=record.kind.value, state=record.state.value)

    def connected(self) -> frozenset[str]:
        gateway = self._gateway
        if gateway.broker is None:
            return frozenset()
        # Read on the loop: the broker's session table changes there.
        return gateway.call(self._connected_now(), self._timeout)

    async def _connected_now(self) -> frozenset[str]:
        gateway = self._gateway
        broker = gateway.broker
        if broker is None:
            return frozenset()
        # In a cluster only the leader follows the broker's connection notices: the others
        # ask it (ClusterError NO_LEADER when none answers).
        cluster = gateway.cluster
        sessions = (
            broker.connected()
            if cluster is None
            else await cluster.connected(gateway.transport)
        )
        return frozenset(p.name for p in sessions.values() if p.kind in _IDENTITY_KINDS)

    def audit_public_key(self) -> CertificatePublicKeyTypes | None:
        return self._audit_key

    def node(self) -> str:
        return node_name(self._gateway)

    def counters(self) -> dict[str, dict[str, float]]:
        return gateway_counts(self._gateway)
