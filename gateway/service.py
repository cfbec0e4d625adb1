"""The running gateway: broker, enrollment service, registry and CA wired together.

    device --TLS--> EmbeddedBroker --internal listener--> MqttTransport --> EnrollmentService
                         ^  ACL reads IdentityStates           |                 |
                         |                                     v                 v
                    server cert, CRL  <---------------  Issuer (pki)      Store (registry)

Everything here is assembly and lifecycle; decisions live in the enrollment core, the ACL and
the registry.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from gateway.acl import Principal, TopicAcl
from gateway.audit import AuditWriter
from gateway.broker import EmbeddedBroker, ListenerConfig, TlsMaterial
from gateway.config import Settings
from gateway.enrollment import ApprovalRule, EnrollmentPolicy, EnrollmentService
from gateway.home import AUDIT_KEY, load_keys, load_manufacturer_roots, pem
from gateway.protocol import topics
from gateway.registry import SqlStore
from gateway.store import IdentityState, Store
from gateway.transport import BrokerAddress, MqttTransport, Outgoing
from pki.clock import Clock, SystemClock
from pki.crl import RevokedEntry, build_crl
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import IdentityKind, LeafTemplate

log = logging.getLogger(__name__)

BROKER_CERT_LIFETIME = timedelta(days=7)
# An expired CRL makes the TLS stack refuse every client: it is re-signed every hour, a day
# before it would lapse.
CRL_VALIDITY = timedelta(days=1)
CRL_REFRESH_SECONDS = 3600.0
STATE_REFRESH_SECONDS = 1.0
TRUST_REFRESH_SECONDS = 5.0
CHECKPOINT_SECONDS = 5.0


def policy_from_settings(settings: Settings, trusted_roots: tuple) -> EnrollmentPolicy:  # type: ignore[type-arg]
    return EnrollmentPolicy(
        trust_domain=settings.trust_domain,
        trusted_roots=trusted_roots,
        denied_birth_fingerprints=frozenset(settings.policy.denied_birth_fingerprints),
        firmware_allowlist={m: frozenset(d) for m, d in settings.policy.firmware.items()},
        require_known_firmware=settings.enrollment.require_known_firmware,
        auto_approve=tuple(
            ApprovalRule(manufacturer=r.manufacturer, model=r.model)
            for r in settings.policy.auto_approve
        ),
        cert_lifetime=settings.certificates.lifetime,
        renew_fraction=settings.certificates.renew_fraction,
        renew_jitter=settings.certificates.renew_jitter,
        nonce_ttl=timedelta(seconds=settings.enrollment.nonce_ttl_seconds),
        max_clock_skew=timedelta(seconds=settings.enrollment.max_clock_skew_seconds),
        pending_retry_after=settings.enrollment.pending_retry_after,
    )


class IdentityStates:
    """The identity states the broker's ACL consults on every message.

    A dict lookup per message instead of a database query; refreshed from the registry every
    second (so a change made by another process, such as `fleetgate device approve`, reaches
    the broker within a second) and at once for changes made in this process.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._states: dict[str, IdentityState] = {}
        self._lock = threading.Lock()

    def __call__(self, identity_id: str) -> IdentityState | None:
        state = self._states.get(identity_id)
        if state is None:
            # Not seen yet: typically a device connecting with the certificate it got a moment
            # ago. Only the operational listener asks, after a verified handshake with one of
            # our certificates, so a miss is rare and cheap.
            record = self._store.get_identity(identity_id)
            if record is not None:
                self.set(identity_id, record.state)
                state = record.state
        return state

    def refresh(self) -> dict[str, IdentityState]:
        """Reload from the registry; returns the identities whose state changed."""
        states = {r.id: r.state for r in self._store.list_identities()}
        with self._lock:
            old, self._states = self._states, states
        return {i: s for i, s in states.items() if old.get(i) is not s}

    def set(self, identity_id: str, state: IdentityState) -> None:
        with self._lock:
            self._states = {**self._states, identity_id: state}


@dataclass(frozen=True)
class GatewayPorts:
    enrollment: int
    operational: int
    internal: int


class Gateway:
    """One gateway process. `await start()`, later `await stop()`; or `await run(stop_event)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        on_event: Callable[[str, dict[str, str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store: Store = store if store is not None else SqlStore(settings.database)
        keys = load_keys(settings)
        self.root_certificate = keys.root.certificate
        self.issuing = keys.issuing
        self.issuer = Issuer(keys.issuing, self.clock)
        self.audit = AuditWriter(
            self.store,
            keys.keystore.load(AUDIT_KEY),
            self.clock,
            every=settings.audit_checkpoint_every,
        )
        self._trusted_roots = load_manufacturer_roots(settings)
        self.policy = policy_from_settings(settings, self._trusted_roots)
        self.enrollment = EnrollmentService(self.store, self.issuer, self.policy, self.clock)
        self.states = IdentityStates(self.store)
        self.acl = TopicAcl(self.states)
        self._on_event = on_event
        self._internal_password = secrets.token_urlsafe(24)
        self.broker: EmbeddedBroker | None = None
        self.transport: MqttTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- certificates the broker needs -------------------------------------------------------

    def _broker_tls(self) -> TlsMaterial:
        """A fresh server certificate for the broker; its key lives in memory only."""
        key = LocalSigner.generate(self.issuing.signer.key_type)
        host = self.settings.broker.host
        ips = (host,) if host.replace(".", "").isdigit() else ()
        cert = self.issuer.issue(
            LeafTemplate(
                kind=IdentityKind.SERVICE,
                name="broker",
                trust_domain=self.settings.trust_domain,
                lifetime=BROKER_CERT_LIFETIME,
                server=True,
                dns_names=("localhost",) if ips else (host, "localhost"),
                ip_addresses=ips or ("127.0.0.1",),
            ),
            key.public_key(),
        )
        chain = pem(cert) + pem(self.issuing.certificate)
        key_pem = key.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        return TlsMaterial(
            server_cert_pem=chain,
            server_key_pem=key_pem,
            client_ca_pem=pem(self.issuing.certificate) + pem(self.root_certificate),
        )

    def crl_pem(self) -> bytes:
        entries = [
            RevokedEntry(serial=c.serial, revoked_at=c.revoked_at or c.issued_at)
            for c in self.store.revoked_certificates()
        ]
        now = self.clock.now()
        crl = build_crl(self.issuing, entries, self.clock, CRL_VALIDITY, int(now.timestamp()))
        return crl.public_bytes(Encoding.PEM)

    def ca_chain_pem(self) -> bytes:
        return pem(self.issuing.certificate) + pem(self.root_certificate)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ports(self) -> GatewayPorts:
        assert self.broker is not None, "gateway not started"
        ports = self.broker.ports
        return GatewayPorts(ports["enrollment"], ports["operational"], ports["internal"])

    def _connected(self, principal: Principal, remote: str) -> None:
        if principal.kind == "device":
            # A database write must not stall the broker's event loop: do it in a thread.
            asyncio.get_running_loop().run_in_executor(None, self._touch, principal.name)

    def _touch(self, identity_id: str) -> None:
        try:
            self.store.touch(identity_id, self.clock.now())
        except Exception:  # a failed last-seen update must never refuse a connection
            log.exception("could not record last-seen for %s", identity_id)

    async def start(self) -> None:
        self.states.refresh()
        crl = self.crl_pem()
        self.broker = EmbeddedBroker(
            ListenerConfig(
                host=self.settings.broker.host,
                enrollment_port=self.settings.broker.enrollment_port,
                operational_port=self.settings.broker.operational_port,
                internal_port=0,
            ),
            self._broker_tls(),
            self.acl,
            internal_password=self._internal_password,
            crl_pem=crl,
            on_connect=self._connected,
            trust_domain=self.settings.trust_domain,
            clock=self.clock,
        )
        await self.broker.start()
        self.transport = MqttTransport(
            BrokerAddress(
                "127.0.0.1",
                self.broker.ports["internal"],
                username="fleetgate-gateway",
                password=self._internal_password,
            ),
            [topics.ENROLL_REQUEST_FILTER, topics.RENEW_REQUEST_FILTER],
            self._handle,
        )
        await self.transport.start()
        await self.transport.publish(Outgoing(topics.CA_TOPIC, self.ca_chain_pem(), retain=True))
        await self.transport.publish(Outgoing(topics.CRL_TOPIC, crl, retain=True))
        self._tasks = [
            asyncio.create_task(self._every(STATE_REFRESH_SECONDS, self._sync_states)),
            asyncio.create_task(self._every(CHECKPOINT_SECONDS, self.audit.maybe_checkpoint)),
            asyncio.create_task(self._every(CRL_REFRESH_SECONDS, self._refresh_crl)),
            asyncio.create_task(self._every(TRUST_REFRESH_SECONDS, self._reload_trust)),
        ]

    async def _sync_states(self) -> None:
        """Enforce changes another process made in the registry (the CLI, another gateway):
        the ACL reads the refreshed states at once; a revocation also cuts the session and
        puts the certificate on the CRL."""
        loop = asyncio.get_running_loop()
        changed = await loop.run_in_executor(None, self.states.refresh)
        revoked = [i for i, state in changed.items() if state is IdentityState.REVOKED]
        if revoked:
            await self._refresh_crl()
            assert self.broker is not None
            for identity_id in revoked:
                await self.broker.kick(identity_id)

    async def _refresh_crl(self) -> None:
        loop = asyncio.get_running_loop()
        crl = await loop.run_in_executor(None, self.crl_pem)
        assert self.broker is not None and self.transport is not None
        self.broker.update_crl(crl)
        await self.transport.publish(Outgoing(topics.CRL_TOPIC, crl, retain=True))

    async def _reload_trust(self) -> None:
        """Pick up manufacturer roots an operator added to trust/manufacturers/ while running."""
        roots = load_manufacturer_roots(self.settings)
        if roots != self._trusted_roots:
            self._trusted_roots = roots
            self.policy = policy_from_settings(self.settings, roots)
            self.enrollment.replace_policy(self.policy)
            log.info("trusted manufacturer roots reloaded: %d", len(roots))

    def _handle(self, topic: str, payload: bytes) -> list[Outgoing]:
        replies = self.enrollment.handle(topic, payload)
        return [Outgoing(r.topic, r.payload, r.qos, r.retain) for r in replies]

    async def _every(self, seconds: float, job: Callable[[], object]) -> None:
        """Run ``job`` every ``seconds``: coroutines in the loop, plain functions in a thread
        (they touch the database)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(seconds)
            try:
                if asyncio.iscoroutinefunction(job):
                    await job()
                else:
                    await loop.run_in_executor(None, job)
            except Exception:
                log.exception("periodic job %s failed", getattr(job, "__name__", job))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.transport is not None:
            await self.transport.stop()
        if self.broker is not None:
            await self.broker.stop()
        try:
            self.audit.checkpoint()
        except Exception:
            log.exception("could not sign the final audit checkpoint")

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
