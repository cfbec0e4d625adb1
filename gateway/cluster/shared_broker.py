"""The fleet's one Mosquitto as the gateways of a cluster see it.

The broker runs under its keeper (``gateway.cluster.keeper``), which writes
``<home>/cluster/broker.json``: where the broker listens and the two accounts every gateway
shares (admin, for $CONTROL; internal, for the message clients). Each gateway drives the broker
through ``gateway.mosquitto.MosquittoBroker`` in external mode (its own admin connection to the
dynsec plugin); ``SharedBrokerControl`` adds what differs from a broker the gateway owns: CRLs
reach the broker through the keeper, which installs the one the leader publishes, retained, on
``fg/v1/pki/crl``; and each gateway has a message-client account of its own, which it creates
through $CONTROL at start and deletes when it stops (setting an account's password makes the
plugin drop every session of that account: one shared account would have each starting
gateway cut the others' sessions). A keeper that restarts rebuilds the broker's accounts from
the registry, without the gateways': each gateway checks every few seconds that its account
is there and creates it again if not (an account that exists costs one refused command, no
file rewrite). Active devices get their rights from the broker's ``acl_file`` patterns
(``gateway.mosquitto.patterns``), which the keeper writes: admitting a newly certified device
costs one ``modifyRole`` the plugin refuses without a rewrite when no gateway ever gave that
device a role (it may have: a quarantine by another gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.acl import Principal
from gateway.broker_control import IdentityLike
from gateway.cluster.errors import ClusterError, ClusterReason
from gateway.home import write_private
from gateway.mosquitto import (
    Listeners,
    MosquittoBroker,
    MosquittoError,
    check_crl,
    dynsec,
)
from gateway.observe import Observer
from gateway.store import IdentityState
from pki.clock import Clock, SystemClock
from pki.profile import IdentityKind

if TYPE_CHECKING:
    from gateway.broker.tls import TlsMaterial

__all__ = [
    "SharedBroker",
    "SharedBrokerControl",
    "descriptor_path",
    "load_shared_broker",
    "save_shared_broker",
]

log = logging.getLogger(__name__)

_FORMAT = 1
ACCOUNT_CHECK_SECONDS = 2.0


def descriptor_path(home: Path) -> Path:
    return home / "cluster" / "broker.json"


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 < value < 65536:
        raise ValueError(f"{what} must be between 1 and 65535, got {value}")
    return value


@dataclass(frozen=True)
class SharedBroker:
    """Where the shared Mosquitto listens and how a gateway administers it."""

    host: str  # the enrollment and operational listeners devices reach
    enrollment_port: int
    operational_port: int
    internal_port: int  # the gateways' and the keeper's clients, password accounts
    admin_password: str = field(repr=False)
    internal_host: str = "127.0.0.1"
    admin_username: str = dynsec.DEFAULT_ADMIN_USERNAME

    def __post_init__(self) -> None:
        for name in ("host", "internal_host", "admin_password"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, not {type(value).__name__}")
            if not value:
                raise ValueError(f"{name} must not be empty")
        ports = [
            _port(self.enrollment_port, "enrollment_port"),
            _port(self.operational_port, "operational_port"),
            _port(self.internal_port, "internal_port"),
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(f"the listener ports must differ, got {ports}")
        dynsec.check_reserved_username(self.admin_username)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "host": self.host,
            "enrollment_port": self.enrollment_port,
            "operational_port": self.operational_port,
            "internal_port": self.internal_port,
            "internal_host": self.internal_host,
            "admin_username": self.admin_username,
            "admin_password": self.admin_password,
        }

    @classmethod
    def from_json(cls, data: object) -> SharedBroker:
        """Raises ClusterError(BAD_SHARED_BROKER) for anything but a descriptor we wrote."""
        try:
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError(f"not a format {_FORMAT} descriptor")
            values = {key: value for key, value in data.items() if key != "format"}
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ClusterError(ClusterReason.BAD_SHARED_BROKER, str(exc)) from None


def save_shared_broker(home: Path, shared: SharedBroker) -> Path:
    """Write the descriptor, readable by its owner only (it holds both passwords)."""
    path = descriptor_path(home)
    write_private(path, (json.dumps(shared.to_json(), indent=1) + "\n").encode())
    return path


def load_shared_broker(home: Path) -> SharedBroker:
    """Raises ClusterError: NO_SHARED_BROKER when the keeper never ran for this home,
    BAD_SHARED_BROKER when the file is not a descriptor."""
    path = descriptor_path(home)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ClusterError(
            ClusterReason.NO_SHARED_BROKER,
            f"{path} not found: start the shared broker first (see docs/scale-out.md)",
        ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ClusterError(ClusterReason.BAD_SHARED_BROKER, f"{path}: {exc}") from None
    return SharedBroker.from_json(data)


class SharedBrokerControl:
    """``BrokerControl`` over the shared broker for one gateway.

    Identity changes, kicks and connection notices go through ``MosquittoBroker`` in external
    mode. Which gateway calls what is the service's business: in a cluster the leader alone
    enforces registry changes and publishes CRLs; each gateway admits the devices it certifies
    itself (``sync``), so a certificate never reaches a device before its rights reach the
    broker.
    """

    def __init__(
        self,
        shared: SharedBroker,
        *,
        internal_username: str,
        clock: Clock | None = None,
        on_clone: Callable[[Principal, str, str], None] | None = None,
        on_connect: Callable[[Principal, str], None] | None = None,
        on_disconnect: Callable[[Principal], None] | None = None,
        observer: Observer | None = None,
        command_timeout: float = 10.0,
        follow_sessions: bool = True,
    ) -> None:
        """``internal_username``: this gateway's own message-client account (``_fg_...``).
        ``observer`` hears every session of a certificate identity on the shared broker, the
        whole fleet's, not only the devices this gateway enrolled, while the broker's
        connection notices are followed (``follow_sessions``; a cluster's leader alone
        follows them)."""
        self._shared = shared
        self._clock: Clock = clock or SystemClock()
        self._internal_username = dynsec.check_reserved_username(internal_username)
        self._internal_password = secrets.token_urlsafe(32)
        self._account_task: asyncio.Task[None] | None = None
        self._broker = MosquittoBroker(
            Path("."),  # external: nothing is written
            Listeners(
                host=shared.host,
                enrollment_port=shared.enrollment_port,
                operational_port=shared.operational_port,
                internal_port=shared.internal_port,
            ),
            None,
            None,
            external=True,
            admin_username=shared.admin_username,
            admin_password=shared.admin_password,
            admin_host=shared.internal_host,
            internal_username=internal_username,
            internal_password=self._internal_password,
            clock=self._clock,
            on_clone=on_clone,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
            observer=observer,
            command_timeout=command_timeout,
            # the keeper's broker has the device patterns (a managed MosquittoBroker): an
            # active device needs no dynsec object, other gateways' quarantines stay in force
            device_patterns=True,
            follow_sessions=follow_sessions,
        )

    @property
    def shared(self) -> SharedBroker:
        return self._shared

    @property
    def process(self) -> None:
        """No process of ours: the broker is the keeper's child."""
        return None

    @property
    def ports(self) -> dict[str, int]:
        return self._broker.ports

    @property
    def internal_credentials(self) -> tuple[str, str]:
        return self._broker.internal_credentials

    async def start(self) -> None:
        await self._broker.start()
        self._account_task = asyncio.create_task(self._keep_account(), name="gateway-account")

    async def _keep_account(self) -> None:
        account = dynsec.create_client(
            self._internal_username,
            password=self._internal_password,
            roles=[dynsec.INTERNAL_ROLE],
        )
        while True:
            await asyncio.sleep(ACCOUNT_CHECK_SECONDS)
            with contextlib.suppress(MosquittoError):  # the broker is away: try again later
                await self._broker.execute([account])

    async def stop(self) -> None:
        """Delete this gateway's account (its message client is gone by now), then close."""
        if self._account_task is not None:
            self._account_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._account_task
        with contextlib.suppress(MosquittoError):
            await self._broker.execute([dynsec.delete_client(self._internal_username)])
        await self._broker.stop()

    async def apply(
        self, identity_id: str, state: IdentityState, *, kind: IdentityKind = IdentityKind.DEVICE
    ) -> None:
        await self._broker.apply(identity_id, state, kind=kind)

    async def sync(self, identities: Iterable[IdentityLike], *, certified: bool = False) -> int:
        """Group-committed with every other change in flight (``gateway.mosquitto.commit``)."""
        return await self._broker.sync(identities, certified=certified)

    async def kick(self, client_id: str) -> bool:
        return await self._broker.kick(client_id)

    def connected(self) -> dict[str, Principal]:
        """Empty while the connection notices are not followed."""
        return self._broker.connected()

    def has_audience(self, topic: str) -> bool:
        """See ``MosquittoBroker.has_audience`` (True while the notices are not followed)."""
        return self._broker.has_audience(topic)

    @property
    def follows_sessions(self) -> bool:
        return self._broker.follows_sessions

    async def follow_sessions(self, follow: bool) -> None:
        """See ``MosquittoBroker.follow_sessions``."""
        await self._broker.follow_sessions(follow)

    async def renew_server_certificate(self, tls: TlsMaterial) -> None:
        """Nothing to do here: the shared broker's certificate is its keeper's to renew
        (``BrokerKeeper.renew_tls_if_due``); the gateways of a cluster never call this."""

    async def publish_crl(self, crl_pem: bytes) -> None:
        """Check the CRL only (MosquittoError INVALID_CRL / CRL_EXPIRED): the keeper installs
        it when the service publishes it on ``fg/v1/pki/crl``."""
        check_crl(crl_pem, self._clock.now())
