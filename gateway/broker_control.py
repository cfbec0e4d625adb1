"""The one interface between the gateway's decisions and the broker that enforces them.

The gateway decides (registry, lifecycle, CRL); a broker enforces, at once. Two
implementations: ``gateway.broker.EmbeddedBroker`` (amqtt in this process; the default) and
``gateway.mosquitto.MosquittoBroker`` (Mosquitto 2 with dynamic security, for production).
The service and the benchmarks talk to this protocol only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from gateway.acl import Principal
from gateway.store import IdentityState
from pki.profile import IdentityKind

if TYPE_CHECKING:  # gateway.broker imports this module
    from gateway.broker.tls import TlsMaterial


class IdentityLike(Protocol):
    """An identity as the registry keeps it (``gateway.store.IdentityRecord`` fits)."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> IdentityKind: ...
    @property
    def state(self) -> IdentityState: ...


class BrokerControl(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    @property
    def ports(self) -> dict[str, int]:
        """Bound ports: ``enrollment``, ``operational`` and ``internal`` (the gateway's own
        client connects there with a username and password)."""
        ...

    @property
    def internal_credentials(self) -> tuple[str, str]:
        """Username and password of the gateway's own message client on ``internal``."""
        ...

    async def apply(
        self, identity_id: str, state: IdentityState, *, kind: IdentityKind = IdentityKind.DEVICE
    ) -> None:
        """Enforce an identity's state now, on a live session too: active -> its own topics;
        quarantined -> only its quarantine topics, still connected; revoked -> session cut and
        every later connection refused; pending -> no operational access."""
        ...

    async def sync(self, identities: Iterable[IdentityLike], *, certified: bool = False) -> int:
        """Bring each identity to its state, doing only what is not in force yet (cheap to
        call again); returns how many changed. ``certified``: devices this gateway has just
        certified (see ``MosquittoBroker.sync``)."""
        ...

    async def kick(self, client_id: str) -> bool:
        """Cut a live session; False if no such session."""
        ...

    async def publish_crl(self, crl_pem: bytes) -> None:
        """Refuse certificates on this CRL at the next handshake (and keep nextUpdate fresh:
        an expired CRL locks every client out of Mosquitto)."""
        ...

    async def renew_server_certificate(self, tls: TlsMaterial) -> None:
        """Present ``tls``'s server certificate (and key) to every new handshake on the
        enrollment and operational listeners from now on; sessions already up keep theirs.
        Devices pin the gateway root and check the certificate's dates: without this, a
        gateway running longer than ``gateway.service.BROKER_CERT_LIFETIME`` locks them out."""
        ...

    def connected(self) -> dict[str, Principal]:
        """Client id -> who is connected now."""
        ...
