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
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from gateway import operations, retention
from gateway.acl import Principal, TopicAcl
from gateway.admin import attach_admin
from gateway.admin.events import issued_certificate_data
from gateway.audit import AuditWriter
from gateway.broker import EmbeddedBroker, ListenerConfig, RefusedConnection, TlsMaterial
from gateway.broker.refusals import remote_host
from gateway.broker.tls import renewal_due
from gateway.broker_control import BrokerControl
from gateway.cluster import (
    SHARE_GROUP,
    ClusterError,
    ClusterMember,
    ClusterReason,
)
from gateway.config import Settings
from gateway.enrollment import ApprovalRule, EnrollmentPolicy, EnrollmentService
from gateway.enrollment.publish import Publish
from gateway.enrollment.ratelimit import RateLimiter, RateLimits
from gateway.home import AUDIT_KEY, load_keys, load_manufacturer_roots, pem
from gateway.metrics_export import EXPORT_SECONDS, MetricsWriter, metrics_path
from gateway.mosquitto.observe import DEVICE_PUBLISH_FILTERS
from gateway.mosquitto.observe import published as mosquitto_published
from gateway.protocol import topics
from gateway.registry import SqlStore
from gateway.store import (
    IdentityRecord,
    IdentityState,
    RefusalRecord,
    Store,
    refusal_key,
)
from gateway.transport import BrokerAddress, MqttTransport, Outgoing, Route
from gateway.watch import EVALUATE_SECONDS, BehaviourWatch
from pki.clock import Clock, SystemClock
from pki.crl import RevokedEntry, build_crl
from pki.issue import Issuer
from pki.keys import LocalSigner
from pki.profile import MIN_LEAF_LIFETIME, IdentityKind, LeafTemplate

log = logging.getLogger(__name__)
T = TypeVar("T")

# The broker's server certificate, which every device verifies: short-lived, renewed while
# the gateway runs once half of it is left, checked every hour (``renew_broker_tls_if_due``).
BROKER_CERT_LIFETIME = timedelta(days=7)
BROKER_TLS_CHECK_SECONDS = 3600.0
# An expired CRL makes the TLS stack refuse every client: it is re-signed every quarter of
# its validity ([ca] crl_validity_hours) or every hour, whichever comes first, long before it
# would lapse.
CRL_REFRESH_SECONDS = 3600.0
CHANGE_POLL_SECONDS = 0.2
TRUST_REFRESH_SECONDS = 1.0
REFUSAL_FLUSH_SECONDS = 1.0
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

    A dict lookup per message instead of a database query; loaded at start, updated at once for
    changes made in this process and, for changes made elsewhere (`fleetgate device ...`,
    another gateway), by the audit-head poll (``reload``).

    An identity the registry does not hold (an enrollee: the ACL asks on each of its messages)
    is remembered as missing for ``MISS_SECONDS``, so an enrollment costs no registry reads on
    the broker's event loop; ``set`` and ``reload`` override that at once.
    """

    MISS_SECONDS = 2.0
    MAX_MISSES = 100_000

    def __init__(self, store: Store, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._monotonic = monotonic
        self._states: dict[str, IdentityState] = {}
        self._missing: dict[str, float] = {}  # identity -> monotonic time the miss expires
        self._lock = threading.Lock()

    def __call__(self, identity_id: str) -> IdentityState | None:
        state = self._states.get(identity_id)
        if state is not None:
            return state
        now = self._monotonic()
        if self._missing.get(identity_id, 0.0) > now:
            return None
        record = self._store.get_identity(identity_id)
        if record is not None:
            self.set(identity_id, record.state)
            return record.state
        with self._lock:
            if len(self._missing) >= self.MAX_MISSES:
                self._missing.clear()  # a scan of random ids: start over, stay bounded
            self._missing[identity_id] = now + self.MISS_SECONDS
        return None

    def refresh(
        self, *, new_active_devices: bool = True
    ) -> dict[str, tuple[IdentityKind, IdentityState]]:
        """Reload from the registry; returns the identities whose state changed.
        ``new_active_devices=False`` leaves out active devices not seen before: in a cluster
        the gateway that certified one admitted it already (``Gateway._admit_certified``)."""
        records = self._store.list_identities()
        states = {r.id: r.state for r in records}
        with self._lock:
            old, self._states = self._states, states
            self._missing.clear()
        return _changes(records, old, new_active_devices=new_active_devices)

    def reload(
        self, identity_ids: Iterable[str], *, new_active_devices: bool = True
    ) -> dict[str, tuple[IdentityKind, IdentityState]]:
        """``refresh`` for only these identities (the ones the audit trail says were touched):
        a few queries per change instead of the whole fleet every poll."""
        records = [
            record
            for record in map(self._store.get_identity, identity_ids)
            if record is not None
        ]
        with self._lock:
            # only the states these records replace, not a copy of the fleet's
            old = {r.id: self._states.get(r.id) for r in records}
            for record in records:
                self._states[record.id] = record.state
                self._missing.pop(record.id, None)
        return _changes(records, old, new_active_devices=new_active_devices)

    def set(self, identity_id: str, state: IdentityState) -> None:
        # In place: copying the table per change cost O(fleet) per enrollment. A reader on
        # another thread sees the old or the new state, both fine (single dict operations).
        with self._lock:
            self._states[identity_id] = state
            self._missing.pop(identity_id, None)


def _changes(
    records: Iterable[IdentityRecord],
    old: Mapping[str, IdentityState | None],
    *,
    new_active_devices: bool,
) -> dict[str, tuple[IdentityKind, IdentityState]]:
    """The records whose state differs from ``old`` (see ``IdentityStates.refresh``)."""
    return {
        r.id: (r.kind, r.state)
        for r in records
        if old.get(r.id) is not r.state
        and (
            new_active_devices
            or old.get(r.id) is not None
            or r.kind is not IdentityKind.DEVICE
            or r.state is not IdentityState.ACTIVE
        )
    }


@dataclass(frozen=True)
class GatewayEvent:
    """Something an operator watching the fleet wants to know, as it happens.

    ``kind``: certificate_issued, state_changed, connected, disconnected, refused, clone.
    ``subject``: the identity concerned (None for refusals of unknown identities).
    """

    kind: str
    subject: str | None
    at: datetime
    data: dict[str, str] = field(default_factory=dict)


EventListener = Callable[[GatewayEvent], None]


@dataclass(frozen=True)
class Admitted:
    """A device the gateway just certified: active from now on."""

    id: str
    kind: IdentityKind = IdentityKind.DEVICE
    state: IdentityState = IdentityState.ACTIVE


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
        broker_kind: str | None = None,
        cluster: ClusterMember | None = None,
        broker_cert_lifetime: timedelta = BROKER_CERT_LIFETIME,
    ) -> None:
        """``cluster``: this gateway is one of several sharing one registry (PostgreSQL) and
        one Mosquitto (see ``gateway.cluster``). ``broker_cert_lifetime``: of the broker's
        server certificate (renewed at half of it)."""
        if not isinstance(broker_cert_lifetime, timedelta):
            raise TypeError("broker_cert_lifetime must be a timedelta")
        if broker_cert_lifetime < MIN_LEAF_LIFETIME:
            raise ValueError(f"broker_cert_lifetime must be at least {MIN_LEAF_LIFETIME}")
        self.broker_cert_lifetime = broker_cert_lifetime
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store: Store = store if store is not None else SqlStore(settings.database)
        keys = load_keys(settings)
        try:
            self._keys = keys  # closed last at stop(): a token session
            self.root_certificate = keys.root_certificate
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
            # One device may not flood the core; the total stays above what two cores can serve
            # (~2,000 requests/s measured), so it bounds queues without capping a real fleet.
            limits = RateLimits(total_rate=3000.0, total_burst=6000)
            # Extensions (the admin API, behaviour metrics) add MQTT routes and event listeners
            # here before start().
            self.routes: list[Route] = []
            self.listeners: list[EventListener] = []
            self.watch = BehaviourWatch(self, settings.anomaly, leading=lambda: self._leads)
            watching = self.watch.enabled
            self.enrollment = EnrollmentService(
                self.store,
                self.issuer,
                self.policy,
                self.clock,
                rate_limiter=RateLimiter(limits, self.clock),
                observer=self.watch.observe if watching else None,
                lifetime_cap=self.watch.lifetime_cap if watching else None,
            )
            self.states = IdentityStates(self.store)
            self.acl = TopicAcl(self.states)
            self._internal_password = secrets.token_urlsafe(24)
            self.broker_kind = broker_kind or settings.broker.kind
            if cluster is not None and self.broker_kind != "mosquitto":
                raise ClusterError(
                    ClusterReason.NEEDS_MOSQUITTO,
                    "several gateways share one Mosquitto (--broker mosquitto)",
                )
            self.cluster = cluster
            self.broker: BrokerControl | None = None
            self._served_tls: TlsMaterial | None = None  # what this gateway's own broker serves
            self.transport: MqttTransport | None = None
            self.metrics: Counter[str] = Counter()
            self._tasks: list[asyncio.Task[None]] = []
            self._background: set[asyncio.Future[None]] = set()
            self._audit_seq = 0
            # changes the audit poll found but could not enforce (the broker failed): tried again
            # at the next poll, since the reload that found them will not report them again
            self._unenforced: dict[str, tuple[IdentityKind, IdentityState]] = {}
            self._trust_stamp: tuple[int, int] = (0, 0)
            self._refusals: dict[str, RefusalRecord] = {}
            self._seen: dict[str, datetime] = {}  # device -> when it last connected, unwritten
            self._loop: asyncio.AbstractEventLoop | None = None
            self.admin = attach_admin(self)
            # The counters an operator reads (`fleetgate metrics`, node_exporter's textfile
            # collector). Gateways of a cluster may share a home: a file each.
            self.metrics_file = MetricsWriter(
                metrics_path(settings.home, cluster.node if cluster is not None else None),
                self.admin.snapshot,
                # host-pid: the next start writes another file, so this one goes at a clean stop
                remove_at_close=cluster is not None and not cluster.node_given,
            )
        except BaseException:
            keys.close()  # a PKCS#11 token session: not left open by a gateway never run
            raise

    # -- certificates the broker needs -------------------------------------------------------

    def broker_tls(self) -> TlsMaterial:
        """A fresh server certificate for the broker; its key lives in memory only (a shared
        broker's is written to its folder)."""
        key = LocalSigner.generate(self.issuing.signer.key_type)
        host = self.settings.broker.host
        ips = (host,) if host.replace(".", "").isdigit() else ()
        cert = self.issuer.issue(
            LeafTemplate(
                kind=IdentityKind.SERVICE,
                name="broker",
                trust_domain=self.settings.trust_domain,
                lifetime=self.broker_cert_lifetime,
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

    _broker_tls = broker_tls

    async def renew_broker_tls_if_due(
        self, broker: BrokerControl, served: bytes | None, margin: timedelta | None = None
    ) -> TlsMaterial | None:
        """Give ``broker`` a new server certificate once the chain it serves (``served``, PEM)
        has ``margin`` or less left (by default half of ``broker_cert_lifetime``); the new
        material, or None when it was not due. The gateway's hourly job calls this for its own
        broker, a cluster's keeper for the shared one."""
        if margin is None:
            margin = self.broker_cert_lifetime / 2
        if not renewal_due(served, self.clock.now(), margin):
            return None
        tls = await asyncio.get_running_loop().run_in_executor(None, self.broker_tls)
        await broker.renew_server_certificate(tls)
        leaf = x509.load_pem_x509_certificate(tls.server_cert_pem)
        log.info(
            "renewed the broker's server certificate: serial %x, valid until %s",
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )
        return tls

    async def _renew_broker_tls(self) -> None:
        """The hourly job. A cluster's shared broker is its keeper's to renew (it alone
        writes that broker's files), not every gateway's."""
        if self.cluster is not None or self.broker is None:
            return
        served = self._served_tls.server_cert_pem if self._served_tls is not None else None
        renewed = await self.renew_broker_tls_if_due(self.broker, served)
        if renewed is not None:
            self._served_tls = renewed
            self.metrics["broker_tls.renewed"] += 1

    def crl_pem(self) -> bytes:
        entries = [
            RevokedEntry(serial=c.serial, revoked_at=c.revoked_at or c.issued_at)
            for c in self.store.revoked_certificates()
        ]
        # CRLNumber must grow with every CRL: milliseconds keep two CRLs in one second apart.
        number = int(self.clock.now().timestamp() * 1000)
        crl = build_crl(self.issuing, entries, self.clock, self.settings.ca.crl_validity, number)
        return crl.public_bytes(Encoding.PEM)

    @property
    def crl_refresh_seconds(self) -> float:
        return min(CRL_REFRESH_SECONDS, self.settings.ca.crl_validity.total_seconds() / 4)

    def ca_chain_pem(self) -> bytes:
        return pem(self.issuing.certificate) + pem(self.root_certificate)

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def ports(self) -> GatewayPorts:
        assert self.broker is not None, "gateway not started"
        ports = self.broker.ports
        return GatewayPorts(ports["enrollment"], ports["operational"], ports["internal"])

    def emit(self, kind: str, subject: str | None, /, **data: str) -> None:
        """Tell every listener; a failing listener never disturbs the gateway."""
        event = GatewayEvent(kind, subject, self.clock.now(), data)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed on %s", kind)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the gateway runs on (None before start)."""
        return self._loop

    def call(self, coro: Coroutine[object, object, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the gateway's event loop from another thread (a handler in the
        transport's worker) and wait for its result."""
        assert self._loop is not None, "gateway not started"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _connected(self, principal: Principal, remote: str) -> None:
        if not self._leads:
            # In a cluster the leader alone reads connection notices and tells operators and
            # records last-seen (once, not once per gateway); a gateway still hears what was
            # under way when it stepped down.
            return
        self.emit("connected", principal.name, kind=principal.kind, remote=remote,
                  listener=principal.listener)
        if principal.kind == "device":
            # Written with the others of this second in one transaction (see _flush_seen): a
            # write per connection queued the enrollment worker behind a commit each.
            self._seen[principal.name] = self.clock.now()

    def _disconnected(self, principal: Principal) -> None:
        if not self._leads:
            return
        self.emit("disconnected", principal.name, kind=principal.kind, listener=principal.listener)

    def _refused(self, refused: RefusedConnection) -> None:
        """Remember who was turned away, aggregated (a device retrying all day is one row);
        written to the registry once a second for the console's "unknown identities"."""
        anonymous = refused.cert_fingerprint is None and refused.client_id is None
        key = refusal_key(
            refused.listener,
            refused.reason,
            refused.cert_fingerprint,
            refused.client_id,
            # nothing else tells such clients apart: one row per source host, not one for all
            source_host=remote_host(refused.remote) if anonymous else None,
        )
        previous = self._refusals.get(key)
        try:
            self._refusals[key] = RefusalRecord(
                key=key,
                listener=refused.listener,
                reason=refused.reason,
                client_id=refused.client_id,
                cert_subject=refused.cert_subject,
                cert_issuer=refused.cert_issuer,
                cert_fingerprint=refused.cert_fingerprint,
                remote=refused.remote,
                first_seen=previous.first_seen if previous else refused.at,
                last_seen=refused.at,
                count=previous.count + 1 if previous else 1,
            )
        except ValueError:
            # A client id no registry can hold (NUL bytes, broken Unicode): counted, not kept.
            self.metrics["refusals.unrecordable"] += 1
        self.emit(
            "refused",
            refused.client_id,
            reason=refused.reason,
            remote=refused.remote,
            listener=refused.listener,
            issuer=refused.cert_issuer or "",
            subject=refused.cert_subject or "",
        )

    def _flush_refusals(self) -> None:
        batch, self._refusals = self._refusals, {}
        if batch:
            self.store.record_refusals(list(batch.values()))

    async def _flush_refusals_if_any(self) -> None:
        """The periodic flush. A thread hop only when someone was refused: most seconds
        nobody is (Mosquitto reports refused handshakes from its log). The devices seen
        connecting this second are written the same way."""
        loop = asyncio.get_running_loop()
        if self._refusals:
            await loop.run_in_executor(None, self._flush_refusals)
        if self._seen:
            await loop.run_in_executor(None, self._flush_seen)

    def _flush_seen(self) -> None:
        batch, self._seen = self._seen, {}
        try:
            self.store.touch_many(batch)
        except Exception:  # a failed last-seen update must never disturb the gateway
            self.metrics["last_seen.unrecorded"] += len(batch)
            log.exception("could not record last-seen for %d devices", len(batch))

    def _make_broker(self, crl: bytes) -> BrokerControl:
        listeners = ListenerConfig(
            host=self.settings.broker.host,
            enrollment_port=self.settings.broker.enrollment_port,
            operational_port=self.settings.broker.operational_port,
            internal_port=0,
        )
        observer = self.watch.observe if self.watch.enabled else None
        if self.cluster is not None:
            # The shared broker's certificate is its keeper's to renew (``_renew_broker_tls``
            # never asks this one).
            return self.cluster.broker(
                clock=self.clock,
                on_clone=self._clone_seen,
                on_connect=self._connected,
                on_disconnect=self._disconnected,
                observer=observer,
            )
        self._served_tls = tls = self._broker_tls()
        if self.broker_kind == "mosquitto":
            from gateway.mosquitto import MosquittoBroker

            return MosquittoBroker(
                self.settings.home / "mosquitto",
                listeners,
                tls,
                crl,
                identities=self.store.list_identities,
                clock=self.clock,
                on_clone=self._clone_seen,
                on_connect=self._connected,
                on_disconnect=self._disconnected,
                on_refused=self._refused,
                observer=observer,
            )
        return EmbeddedBroker(
            listeners,
            tls,
            self.acl,
            internal_password=self._internal_password,
            crl_pem=crl,
            on_connect=self._connected,
            on_disconnect=self._disconnected,
            on_refused=self._refused,
            on_clone=self._clone_seen,
            trust_domain=self.settings.trust_domain,
            clock=self.clock,
            observer=observer,
        )

    def _requests(self, topic: str, payload: bytes) -> list[Publish]:
        """The enrollment core's route: each request is first shown to the behaviour watch
        (the size only; enrollees are no identities the brokers report)."""
        self.watch.request_seen(topic, len(payload))
        return self.enrollment.handle(topic, payload)

    def _device_published(self, topic: str, payload: bytes) -> list[Outgoing]:
        """Mosquitto reports no publishes: the gateway's own client receives what devices
        publish (the ACL let it through) and tells the watch the topic and size."""
        observation = mosquitto_published(topic, len(payload))
        if observation is not None:
            self.watch.observe(observation)
        return []

    def _device_publish_filters(self) -> tuple[str, ...]:
        watching = self.watch.enabled and self.broker_kind == "mosquitto"
        return DEVICE_PUBLISH_FILTERS if watching else ()

    def _enrollment_routes(self) -> list[Route]:
        """The enrollment core's two routes, and what the watch needs besides: requests on
        the enrollment listener always pass by it; on Mosquitto renewals and device messages
        too (the embedded broker reports those itself, as publishes of their identity)."""
        watching = self.watch.enabled
        mosquitto = self.broker_kind == "mosquitto"
        plain = self.enrollment.handle
        return [
            Route(topics.ENROLL_REQUEST_FILTER, self._requests if watching else plain, shared=True),
            Route(
                topics.RENEW_REQUEST_FILTER,
                self._requests if watching and mosquitto else plain,
                shared=True,
            ),
            *(
                # in a cluster the leader's watch alone keeps them (``_take_lead``)
                Route(topic_filter, self._device_published, inline=True,
                      standby=self.cluster is not None)
                for topic_filter in self._device_publish_filters()
            ),
        ]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.states.refresh()
        self._audit_seq = self._audit_head_seq()
        crl = self.crl_pem()
        self.watch.bind(self._loop)
        self.broker = self._make_broker(crl)
        await self.broker.start()
        username, password = self.broker.internal_credentials
        cluster = self.cluster
        self.transport = MqttTransport(
            BrokerAddress(
                cluster.shared.internal_host if cluster else "127.0.0.1",
                self.broker.ports["internal"],
                username,
                password,
                # several gateways: one session each, requests spread over them by the broker
                client_id=cluster.client_id if cluster else "fleetgate-gateway",
                mqtt5=self.broker_kind == "mosquitto",
                share_group=SHARE_GROUP if cluster else None,
            ),
            [
                *self._enrollment_routes(),
                *(cluster.routes() if cluster else ()),
                *self.routes,
            ],
            prepare=self._admit_certified,
        )
        await self.transport.start()
        await self.transport.publish(Outgoing(topics.CA_TOPIC, self.ca_chain_pem(), retain=True))
        if cluster is None:  # in a cluster the leader publishes the CRL
            await self.transport.publish(Outgoing(topics.CRL_TOPIC, crl, retain=True))
        self.metrics_file.write()  # at once: `fleetgate metrics` need not wait 10 s
        self._tasks = [
            asyncio.create_task(self._every(CHANGE_POLL_SECONDS, self._sync_states)),
            asyncio.create_task(self._every(CHECKPOINT_SECONDS, self.audit.maybe_checkpoint)),
            asyncio.create_task(
                self._every(self.crl_refresh_seconds, self._refresh_crl_if_leading)
            ),
            asyncio.create_task(self._every(TRUST_REFRESH_SECONDS, self._reload_trust)),
            asyncio.create_task(self._every(EVALUATE_SECONDS, self._evaluate_behaviour)),
            asyncio.create_task(self._every(REFUSAL_FLUSH_SECONDS, self._flush_refusals_if_any)),
            asyncio.create_task(self._every(retention.SWEEP_SECONDS, self._sweep_if_leading)),
            asyncio.create_task(self._every(EXPORT_SECONDS, self.metrics_file.write)),
            asyncio.create_task(self._every(BROKER_TLS_CHECK_SECONDS, self._renew_broker_tls)),
        ]
        if cluster is not None:
            await cluster.start(on_elected=self._take_lead, on_deposed=self._step_down)

    def _audit_head_seq(self) -> int:
        head = self.store.audit_head()
        return head.seq if head is not None else 0

    async def _sync_states(self) -> None:
        """Enforce changes another process made in the registry (the CLI, another gateway).

        Every state change appends an audit event in the same transaction, so the audit head
        is a one-row "did anything change" signal, cheap to poll every 200 ms; only when it
        moved are the identities the new events name reloaded and the differences enforced
        (reloading the whole fleet at every poll cost the leader of a cluster enrolling a
        thousand devices more CPU than the enrollments themselves).

        In a cluster only the leader does this, once for all gateways, and then announces how
        far it got (a gateway waiting in ``set_state`` goes on)."""
        if not self._leads:
            return
        loop = asyncio.get_running_loop()
        seq = await loop.run_in_executor(None, self._audit_head_seq)
        if seq == self._audit_seq and not self._unenforced:
            return
        events = []
        if seq != self._audit_seq:
            events = await loop.run_in_executor(
                None, partial(self.store.audit_records, after_seq=self._audit_seq)
            )
        changed: dict[str, tuple[IdentityKind, IdentityState]] = {}
        if events:
            # Appends commit in sequence order (one writer at a time), so nothing can still
            # appear below the last event read.
            self._audit_seq = events[-1].seq
            changed = await loop.run_in_executor(
                None,
                partial(
                    self.states.reload,
                    {event.entry.subject for event in events},
                    new_active_devices=self.cluster is None,
                ),
            )
        todo = {**self._unenforced, **changed}  # a newer state of an identity wins
        if not todo and not events:
            return
        try:
            await self._enforce(todo)
        except Exception:
            self._unenforced = todo
            self.metrics["enforce.retry"] += 1
            raise
        self._unenforced = {}
        if self.cluster is not None and self.transport is not None:
            await self.cluster.announce(self.transport, self._audit_seq)

    @property
    def _leads(self) -> bool:
        """Whether this gateway does the broker control: always alone, the leader in a
        cluster."""
        return self.cluster is None or self.cluster.is_leader

    async def _take_lead(self) -> None:
        """Elected: first enforce what the last leader may have left undone (it may have died
        between a change and its enforcement), then lead."""
        assert self.cluster is not None and self.broker is not None and self.transport
        loop = asyncio.get_running_loop()
        seq = await loop.run_in_executor(None, self._audit_head_seq)
        await loop.run_in_executor(None, self.states.refresh)
        unsure = await loop.run_in_executor(None, self._unsure_since, self.cluster.watch.seq)
        await self.broker.sync(unsure)
        await self._refresh_crl()
        for topic_filter in self._device_publish_filters():
            await self.transport.activate(topic_filter, True)
        self._audit_seq = seq
        await self.cluster.announce(self.transport, seq)
        log.info("leading the cluster as %s (audit head %d)", self.cluster.node, seq)

    def _unsure_since(self, enforced: int) -> list[IdentityRecord]:
        """The identities whose broker state the last leader may not have enforced: those
        named by audit events after ``enforced``, the last sequence number it announced. With
        no announcement heard (a new cluster, a restarted broker), every identity. Each
        dynsec change makes Mosquitto rewrite its whole file and stalls its message routing
        meanwhile: re-sending a large fleet at every takeover would hold every gateway up for
        seconds."""
        if enforced <= 0:
            return self.store.list_identities()
        subjects = {r.entry.subject for r in self.store.audit_records(after_seq=enforced)}
        found = (self.store.get_identity(subject) for subject in sorted(subjects))
        return [record for record in found if record is not None]

    async def _step_down(self) -> None:
        assert self.cluster is not None
        await self.cluster.step_down(self.transport)
        if self.transport is not None:
            for topic_filter in self._device_publish_filters():
                await self.transport.activate(topic_filter, False)

    def _sweep_if_leading(self) -> None:
        """Delete stored answers and nonces the protocol no longer needs (gateway.retention);
        in a cluster the leader does it for the registry all share."""
        if self._leads:
            retention.sweep(self.store, self.clock)

    async def _refresh_crl_if_leading(self) -> None:
        if self._leads:
            await self._refresh_crl()

    async def _enforce(self, changed: dict[str, tuple[IdentityKind, IdentityState]]) -> None:
        assert self.broker is not None
        for identity_id, (kind, state) in changed.items():
            await self.broker.apply(identity_id, state, kind=kind)
            self.emit("state_changed", identity_id, kind=kind.value, state=state.value)
        if any(state is IdentityState.REVOKED for _, state in changed.values()):
            await self._refresh_crl()

    async def _refresh_crl(self) -> None:
        loop = asyncio.get_running_loop()
        crl = await loop.run_in_executor(None, self.crl_pem)
        assert self.broker is not None and self.transport is not None
        await self.broker.publish_crl(crl)
        await self.transport.publish(Outgoing(topics.CRL_TOPIC, crl, retain=True))

    # -- operator actions, enforced at once ----------------------------------------------------

    async def set_state(
        self, identity_id: str, state: IdentityState, *, action: str, actor: str, reason: str = ""
    ) -> IdentityRecord:
        """Change an identity's state in the registry (audited) and enforce it on the broker
        before returning. Raises ``OperationError``."""
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(
            None,
            partial(
                operations.change_state,
                self.store,
                identity_id,
                state,
                action=action,
                actor=actor,
                reason=reason,
                clock=self.clock,
            ),
        )
        self.states.set(identity_id, record.state)
        if not self._leads:
            # A cluster's leader enforces every change, once: wait until it has this one.
            # Raises ClusterError(NOT_ENFORCED) when no leader confirms in time.
            assert self.cluster is not None
            seq = await loop.run_in_executor(None, self._audit_head_seq)
            await self.cluster.wait_enforced(seq)
            return record
        await self._enforce({identity_id: (record.kind, record.state)})
        return record

    async def quarantine(self, identity_id: str, *, actor: str, reason: str) -> IdentityRecord:
        return await self.set_state(
            identity_id, IdentityState.QUARANTINED, action="quarantine", actor=actor, reason=reason
        )

    async def release(self, identity_id: str, *, actor: str) -> IdentityRecord:
        return await self.set_state(
            identity_id, IdentityState.ACTIVE, action="release", actor=actor
        )

    async def revoke(self, identity_id: str, *, actor: str, reason: str) -> IdentityRecord:
        return await self.set_state(
            identity_id, IdentityState.REVOKED, action="revoke", actor=actor, reason=reason
        )

    async def _evaluate_behaviour(self) -> None:
        """The behaviour watch's verdicts; in a cluster the leader alone learns and acts, as
        it alone enforces."""
        if self.watch.enabled:
            await self.watch.evaluate()

    def _clone_seen(self, principal: Principal, first: str, second: str) -> None:
        """A second live session of one device (the embedded broker refused it; Mosquitto let
        it take the session over and cuts it once the quarantine is in force): quarantine it,
        with the evidence in the audit trail. An operator releases it after looking. (At once,
        not at the watch's next evaluation: the watch hears of it too and finds it contained.)"""
        self.metrics["clones"] += 1
        self.watch.clone_seen(principal.name, first, second)
        self.emit("clone", principal.name, first=first, second=second)
        reason = f"clone_detected: live from {first}, second session from {second}"

        async def quarantine() -> None:
            try:
                await self.quarantine(principal.name, actor="gateway", reason=reason)
            except operations.OperationError as exc:  # already quarantined or revoked
                log.info("clone of %s: %s", principal.name, exc)

        self._spawn(quarantine())

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _reload_trust(self) -> None:
        """Pick up manufacturer roots an operator added to trust/manufacturers/ while running
        (a stat per second; the files are read only when the folder changed)."""
        try:
            files = list(self.settings.manufacturers_dir.glob("*.pem"))
            stamp = max((p.stat().st_mtime_ns for p in files), default=0), len(files)
        except OSError:
            return
        if stamp == self._trust_stamp:
            return
        self._trust_stamp = stamp
        roots = load_manufacturer_roots(self.settings)
        if roots != self._trusted_roots:
            self._trusted_roots = roots
            self.policy = policy_from_settings(self.settings, roots)
            self.enrollment.replace_policy(self.policy)
            log.info("trusted manufacturer roots reloaded: %d", len(roots))

    async def _admit_certified(self, reply: object) -> None:
        """A device about to receive a certificate connects on the operational listener a
        moment later: the broker must know it as active by then (a dynsec role on
        Mosquitto; the state the ACL reads on the embedded broker)."""
        identity_id = getattr(reply, "issued_to", None)
        if identity_id is None:
            return
        await self._admit_to_broker(identity_id)
        self.states.set(identity_id, IdentityState.ACTIVE)
        # The new expiry and serial (from the registry's record, or read back from a replayed
        # answer): consoles update the row in place.
        data = issued_certificate_data(
            getattr(reply, "payload", None), getattr(reply, "certificate", None)
        )
        self.emit("certificate_issued", identity_id, **data)

    async def _admit_to_broker(self, identity_id: str) -> None:
        assert self.broker is not None
        # sync, not apply: a renewing device is in force already and costs nothing here.
        await self.broker.sync([Admitted(identity_id)], certified=True)

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
        """Stop everything start() started, each part even when one before it failed (the
        first failure is raised once all ran); also after a start() that failed half-way."""
        try:
            try:
                if self.cluster is not None:
                    await self.cluster.stop()  # hand the lead over at once
            finally:
                for task in (*self._tasks, *self._background):
                    task.cancel()
                await asyncio.gather(*self._tasks, *self._background, return_exceptions=True)
                try:
                    if self.transport is not None:
                        await self.transport.stop()
                finally:
                    if self.broker is not None:
                        await self.broker.stop()
        finally:
            try:
                self._flush_refusals()
                self._flush_seen()
                self.audit.checkpoint()
            except Exception:
                log.exception("could not write the final refusals and audit checkpoint")
            try:
                # the last counts, with fleetgate_up 0, if this gateway wrote the file (one
                # whose start failed leaves the running gateway's alone); never raises
                self.metrics_file.close()
            finally:
                # Last: closing a PKCS#11 token session logs this process out of the token.
                self.close_keys()

    def close_keys(self) -> None:
        """End the issuing key's PKCS#11 session (nothing for file keys). stop() does it last;
        a gateway used only as a source of certificates and CRLs, never started, calls this."""
        self._keys.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
