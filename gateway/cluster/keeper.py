"""The keeper of a cluster's shared Mosquitto (``fleetgate broker``).

The broker of several gateways must outlive any one of them, so no gateway runs it: a small
process of its own does, with the code a lone gateway uses for its broker
(``gateway.mosquitto.MosquittoBroker``, managed: the main and the enrollment instance, their
configuration, the dynsec file rebuilt from the registry at every start, the device patterns
that give every active device its rights without a dynsec object, restarts after a crash).
The keeper makes no decision and enrolls nobody. It

- announces (``enforced``) the audit sequence number its dynsec file was built at, so the first
  leader does not re-send the whole fleet to the broker;
- writes ``<home>/cluster/broker.json`` (``shared_broker``) once the broker listens, keeping
  the accounts and ports of the previous one, so gateways survive a keeper restart;
- installs the CRL the leader publishes, retained, on ``fg/v1/pki/crl``, once it has checked
  that our issuing CA signed it and that it is newer than the one installed;
- re-signs the CRL from the registry before it lapses when no leader did (an expired CRL
  locks every device out of Mosquitto), and renews the broker's server certificate halfway
  through its life.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from gateway.broker import ListenerConfig
from gateway.cluster.enforced import announcement
from gateway.cluster.errors import ClusterError
from gateway.cluster.shared_broker import SharedBroker, load_shared_broker, save_shared_broker
from gateway.config import Settings
from gateway.mosquitto import MosquittoBroker, MosquittoError, needs_refresh
from gateway.protocol import topics
from gateway.service import BROKER_TLS_CHECK_SECONDS, Gateway
from gateway.transport import BrokerAddress, Message, MqttTransport, Route

__all__ = ["BrokerKeeper", "crl_number"]

log = logging.getLogger(__name__)

KEEPER_USERNAME = "_fg_keeper"
TLS_CHECK_SECONDS = BROKER_TLS_CHECK_SECONDS  # as a lone gateway checks its own broker's
CRL_CHECK_SECONDS = 60.0


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return -1


class BrokerKeeper:
    """Start with ``await start()`` (returns the descriptor it wrote), ``await stop()``."""

    def __init__(self, settings: Settings, *, internal_port: int | None = None) -> None:
        # A gateway that is never started: the CA, the registry, the CRL and server certificate
        # builders, exactly as every gateway has them.
        self._source = Gateway(settings, broker_kind="mosquitto")
        self._settings = settings
        self._internal_port = internal_port
        self._broker: MosquittoBroker | None = None
        self._transport: MqttTransport | None = None
        self._crl_pem: bytes | None = None  # the CRL in force
        self._installed = -1  # and its number
        self._tasks: list[asyncio.Task[None]] = []
        self._installing: set[asyncio.Task[None]] = set()
        self.shared: SharedBroker | None = None

    @property
    def broker(self) -> MosquittoBroker:
        if self._broker is None:
            raise RuntimeError("keeper not started")
        return self._broker

    def _previous(self) -> SharedBroker | None:
        try:
            return load_shared_broker(self._settings.home)
        except ClusterError:
            return None

    async def start(self) -> SharedBroker:
        try:
            return await self._start()
        except BaseException:
            await self.stop()  # never leave the broker's processes behind
            raise

    async def _start(self) -> SharedBroker:
        settings, source = self._settings, self._source
        previous = self._previous()
        ports = settings.broker
        internal = self._internal_port
        if internal is None:
            internal = previous.internal_port if previous else 0
        # Kept across restarts: running gateways log in with it.
        admin_password = previous.admin_password if previous else secrets.token_urlsafe(32)
        loop = asyncio.get_running_loop()
        crl = await loop.run_in_executor(None, source.crl_pem)
        # Read before the broker lists the identities it starts with: everything up to here is
        # in force once it runs, which the first leader needs to know (see announce below).
        head = await loop.run_in_executor(None, source.store.audit_head)
        built_at = head.seq if head is not None else 0
        broker = MosquittoBroker(
            settings.home / "cluster" / "broker",
            ListenerConfig(
                host=ports.host,
                enrollment_port=ports.enrollment_port
                or (previous.enrollment_port if previous else 0),
                operational_port=ports.operational_port
                or (previous.operational_port if previous else 0),
                internal_port=internal,
            ),
            source.broker_tls(),
            crl,
            admin_password=admin_password,
            # the keeper's own message client; each gateway creates an account of its own
            internal_username=KEEPER_USERNAME,
            identities=source.store.list_identities,
            clock=source.clock,
        )
        self._broker = broker
        await broker.start()
        self._crl_pem, self._installed = crl, crl_number(x509.load_pem_x509_crl(crl))
        username, password = broker.internal_credentials
        shared = SharedBroker(
            host=ports.host,
            enrollment_port=broker.ports["enrollment"],
            operational_port=broker.ports["operational"],
            internal_port=broker.ports["internal"],
            admin_password=admin_password,
        )
        save_shared_broker(settings.home, shared)
        self.shared = shared
        self._transport = MqttTransport(
            BrokerAddress(
                "127.0.0.1",
                shared.internal_port,
                username,
                password,
                client_id="fleetgate-broker-keeper",
                mqtt5=True,
            ),
            [Route(topics.CRL_TOPIC, self._crl_published, inline=True)],
        )
        await self._transport.start()
        # The broker's dynsec file was written from the registry at ``built_at``: said as the
        # leaders say it, a new leader re-enforces only what came after, not the whole fleet
        # (each dynsec change rewrites the whole file and stalls the broker meanwhile).
        await self._transport.publish(announcement(built_at, "keeper"))
        self._tasks = [
            asyncio.create_task(self._keep_crl(), name="keeper-crl"),
            asyncio.create_task(self._keep_tls(), name="keeper-tls"),
        ]
        return shared

    async def stop(self) -> None:
        """Stop the broker whatever else fails: its processes run in sessions of their own and
        would outlive the keeper. Then close the keys (with ca.key_store = "pkcs11" a token
        session, which logs this process out of the token): the keeper cannot start again."""
        try:
            for task in (*self._tasks, *self._installing):
                task.cancel()
            await asyncio.gather(*self._tasks, *self._installing, return_exceptions=True)
            if self._transport is not None:
                await self._transport.stop()
        finally:
            try:
                if self._broker is not None:
                    await self._broker.stop()
            finally:
                # the source gateway is never started, so its own stop() never closes them
                self._source.close_keys()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    def _crl_published(self, topic: str, payload: bytes) -> list[Message]:
        task = asyncio.ensure_future(self._install_quietly(payload))
        self._installing.add(task)
        task.add_done_callback(self._installing.discard)
        return []

    async def _install_quietly(self, crl_pem: bytes) -> None:
        await self.install_crl(crl_pem)

    async def install_crl(self, crl_pem: bytes) -> bool:
        """Install a CRL published by a gateway; True if it was newer and now in force. A CRL
        not signed by our issuing CA, not newer, or expired is ignored (logged)."""
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError as exc:
            log.warning("ignored a CRL that does not parse: %s", exc)
            return False
        issuing = self._source.issuing.certificate
        if crl.issuer != issuing.subject or not crl.is_signature_valid(
            issuing.public_key()  # type: ignore[arg-type]
        ):
            log.warning("ignored a CRL not signed by our issuing CA")
            return False
        if crl_number(crl) <= self._installed:
            return False  # ours already, or an older one replayed
        return await self._install(crl)

    async def _install(self, crl: x509.CertificateRevocationList) -> bool:
        number, pem = crl_number(crl), crl.public_bytes(Encoding.PEM)
        try:
            await self.broker.publish_crl(pem)
        except MosquittoError as exc:
            log.warning("could not install CRL %d: %s", number, exc)
            return False
        self._crl_pem, self._installed = pem, number
        log.info("installed CRL %d (%d revoked)", number, len(list(crl)))
        return True

    async def _keep_crl(self) -> None:
        """Re-sign the CRL from the registry when no leader did and it nears its nextUpdate
        (Mosquitto refuses every certificate once it has passed)."""
        while True:
            await asyncio.sleep(CRL_CHECK_SECONDS)
            try:
                await self.refresh_crl_if_due()
            except Exception:
                log.exception("could not refresh the broker's CRL")

    async def refresh_crl_if_due(self, margin: timedelta | None = None) -> bool:
        if margin is None:
            margin = self._source.settings.ca.crl_validity / 4
        if not needs_refresh(self._crl_pem, self._source.clock.now(), margin):
            return False
        pem = await asyncio.get_running_loop().run_in_executor(None, self._source.crl_pem)
        return await self._install(x509.load_pem_x509_crl(pem))

    async def _keep_tls(self) -> None:
        while True:
            try:
                await self.renew_tls_if_due()
            except Exception:
                log.exception("could not renew the broker's server certificate")
            await asyncio.sleep(TLS_CHECK_SECONDS)

    async def renew_tls_if_due(self, margin: timedelta | None = None) -> bool:
        """Serve a new server certificate once the current one has ``margin`` or less left
        (by default half its lifetime), by the rule and the means a lone gateway renews its
        own broker's with (``Gateway.renew_broker_tls_if_due``: new files, then both instances
        reloaded). True if it was renewed."""
        broker = self.broker
        try:
            # the file the managed broker serves (gateway.mosquitto.broker)
            served: bytes | None = (broker.run_dir / "server.pem").read_bytes()
        except OSError:
            served = None
        renewed = await self._source.renew_broker_tls_if_due(broker, served, margin)
        return renewed is not None

