"""The embedded MQTT broker: amqtt behind three listeners the gateway serves itself.

    enrollment  (TLS, server auth only)   devices without a certificate yet, client id = device id
    operational (mutual TLS + CRL)        devices, operators, services, named by their certificate
    internal    (127.0.0.1, plain TCP)    the gateway's own MQTT client, user name + password

Each accepted connection goes through, in order: TLS (with the client's certificate recorded
even when it is refused, see ``gateway.broker.tls``), the CONNECT read and judged here (see
``gateway.broker.connect`` for why before amqtt), and only then amqtt, through an external
listener. amqtt's auth plugin asks this object for the principal of a session and the broker
(``FilteringBroker``) asks it for every topic decision; the decisions themselves are
``gateway.acl.TopicAcl``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TypeGuard

from amqtt.session import Session
from cryptography import x509

from gateway.acl import (
    LISTENER_ENROLLMENT,
    LISTENER_INTERNAL,
    LISTENER_OPERATIONAL,
    Action,
    Principal,
    Refusal,
    TopicAcl,
)
from gateway.broker.amqtt_glue import (
    AuthPlugin,
    FilteringBroker,
    install_compact_sessions,
    install_quiet_disconnects,
    register,
    unregister,
)
from gateway.broker.connect import (
    ConnackCode,
    ConnectRequest,
    MalformedConnect,
    ReplayReader,
    StreamWriter,
    connack,
    read_connect,
)
from gateway.broker.ingress import IngressLimit, IngressMeter
from gateway.broker.refusals import (
    RefusalReason,
    RefusedConnection,
    peer_address,
    remote_host,
)
from gateway.broker.tls import (
    CertificateInfo,
    TlsMaterial,
    build_server_context,
    capturing_peer,
    certificate_info,
    classify_handshake_error,
    compact_read_buffer,
    revoked_serials,
)
from gateway.broker_control import IdentityLike
from gateway.observe import Connected, Denied, Disconnected, Observation, Observer, Published
from gateway.store import IdentityState
from pki.clock import Clock, SystemClock
from pki.profile import IdentityKind, is_identity_name, parse_spiffe_id

__all__ = ["INTERNAL_USERNAME", "LISTENERS", "EmbeddedBroker", "ListenerConfig"]

log = logging.getLogger(__name__)

INTERNAL_USERNAME = "fleetgate-gateway"
LISTENERS = (LISTENER_ENROLLMENT, LISTENER_OPERATIONAL, LISTENER_INTERNAL)
# Session attribute under which the admitted Principal travels with amqtt's Session object.
PRINCIPAL_ATTR = "fleetgate.principal"

# Who may take over a live session of another principal with the same client id: nobody,
# except a stronger proof of identity over a weaker one (a certificate over an anonymous
# enrollee squatting on that id, the gateway's password over anything).
_RANK = {"enrollee": 0, "device": 1, "operator": 1, "service": 1, "internal": 2}
_CONNACK_FOR_REFUSAL: dict[str, ConnackCode] = {
    Refusal.CLIENT_ID_MISMATCH: ConnackCode.IDENTIFIER_REJECTED,
}
# Whose reads the ingress limit paces: the identities a fleet has thousands of. The gateway's
# own clients, operators and services are few, trusted with more, and answer for themselves.
_INGRESS_LIMITED_KINDS = frozenset({"enrollee", "device"})
_KICK_WAIT_SECONDS = 1.0
_CONNACK_FLUSH_SECONDS = 1.0


def _tcp_socket(writer: asyncio.StreamWriter) -> socket.socket | None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        return sock  # type: ignore[no-any-return]
    return None


def _observed(principal: object) -> TypeGuard[Principal]:
    """Observations are about certificate identities (devices, operators, services): not
    enrollees, whose name is only a claim, nor the gateway's own internal client."""
    return isinstance(principal, Principal) and principal.listener == LISTENER_OPERATIONAL


def _check_port(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError(f"{name} must be a TCP port 0..65535 (0 = any free port), not {value!r}")


@dataclass(frozen=True)
class ListenerConfig:
    """Where the device-facing listeners bind. The internal listener is always on 127.0.0.1."""

    host: str = "127.0.0.1"
    enrollment_port: int = 8883
    operational_port: int = 8884
    internal_port: int = 0  # 0 = any free port

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty str")
        for name in ("enrollment_port", "operational_port", "internal_port"):
            _check_port(getattr(self, name), name)


class _Connection:
    """One accepted TCP connection, from accept to close."""

    __slots__ = (
        "adapter",
        "cert",
        "client_id",
        "done",
        "kicked",
        "listener",
        "principal",
        "remote",
        "session",
        "writer",
    )

    def __init__(self, listener: str, remote: str, writer: asyncio.StreamWriter) -> None:
        self.listener = listener
        self.remote = remote
        self.writer = writer
        self.adapter: StreamWriter | None = None
        self.cert: CertificateInfo | None = None
        self.client_id: str | None = None
        self.principal: Principal | None = None
        self.session: Session | None = None
        self.kicked = False
        self.done = asyncio.Event()

    def abort(self) -> None:
        if self.adapter is not None:
            self.adapter.abort()
        elif self.writer.transport is not None:
            self.writer.transport.abort()


class _KeepaliveWatchdog:
    """MQTT 3.1.1 section 3.1.2.10: no packet within 1.5 x keep alive -> disconnect. amqtt
    0.12.1 only times out its read and keeps waiting, so half-open connections would stay.

    A timer re-armed from the last activity rather than a task per connection: with thousands
    of idle sessions, a sleeping task each is memory held for nothing."""

    __slots__ = ("_broker", "_conn", "_handle", "_limit", "_reader")

    def __init__(
        self, broker: EmbeddedBroker, conn: _Connection, reader: ReplayReader, keep_alive: int
    ) -> None:
        self._broker = broker
        self._conn = conn
        self._reader = reader
        self._limit = keep_alive * 1.5
        self._handle: asyncio.TimerHandle | None = None
        if keep_alive > 0:
            self._arm(self._limit)

    def _arm(self, delay: float) -> None:
        self._handle = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        idle = time.monotonic() - self._reader.last_activity
        if idle < self._limit:
            self._arm(self._limit - idle)
        else:
            self._handle = None
            self._broker._keepalive_expired(self._conn)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _Refused(Exception):
    def __init__(
        self, reason: str, connack_code: ConnackCode | None = None, detail: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connack_code = connack_code
        self.detail = detail


class EmbeddedBroker:
    """amqtt in this process, with our listeners, authentication and topic ACLs.

    All methods belong to the event loop the broker was started in (call them from it).
    ``on_connect(principal, remote)`` runs when a client is admitted ("host:port" of the peer,
    "[host]:port" for IPv6: ``peer_address``),
    ``on_disconnect(principal)`` when an admitted client's connection ends, ``on_clone(principal,
    first_remote, second_remote)`` when a device identity tries a second live session,
    ``on_refused`` for
    every refused attempt. Callbacks run on the event loop: keep them quick.

    ``observer`` receives ``gateway.observe`` observations about the certificate identities of
    the operational listener (devices, operators, services; never enrollees nor the internal
    client): ``Connected`` on admission, ``Disconnected`` when that session ends, ``Published``
    for every publish the ACL allowed (a will included), ``Denied`` for every refused publish,
    subscription or delivery. An observer that raises is counted (``observer.errors``), logged
    once, and never breaks the broker.

    ``ingress_limit`` paces what each enrollee and device connection may send (a token bucket
    on packets and one on bytes per connection, ``gateway.broker.ingress`` for the defaults;
    None: no limit): a flooding client is slowed by not being read, the others are not.

    ``metrics`` counts ``denied.<action>`` for refused publishes/subscriptions/deliveries and
    ``refused.<reason>`` for refused connections; ``connected.<listener>`` for admissions;
    ``ingress.throttled`` for each pause of an over-budget connection, ``ingress.throttled_ms``
    for their total length.
    """

    def __init__(
        self,
        listeners: ListenerConfig,
        tls: TlsMaterial,
        acl: TopicAcl,
        *,
        internal_password: str,
        crl_pem: bytes | None = None,
        on_connect: Callable[[Principal, str], None] | None = None,
        on_disconnect: Callable[[Principal], None] | None = None,
        on_refused: Callable[[RefusedConnection], None] | None = None,
        on_clone: Callable[[Principal, str, str], None] | None = None,
        observer: Observer | None = None,
        internal_username: str = INTERNAL_USERNAME,
        trust_domain: str | None = None,
        clock: Clock | None = None,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        max_packet_bytes: int = 256 * 1024,
        session_expiry_seconds: int = 24 * 3600,
        ingress_limit: IngressLimit | None = IngressLimit(),  # frozen: one instance serves all
    ) -> None:
        if not isinstance(listeners, ListenerConfig):
            raise TypeError("listeners must be a ListenerConfig")
        if not isinstance(tls, TlsMaterial):
            raise TypeError("tls must be a TlsMaterial")
        if not isinstance(acl, TopicAcl):
            raise TypeError("acl must be a TopicAcl")
        if not isinstance(internal_password, str):
            raise TypeError("internal_password must be a str")
        if len(internal_password) < 16:
            raise ValueError("internal_password must have at least 16 characters")
        if ingress_limit is not None and not isinstance(ingress_limit, IngressLimit):
            raise TypeError("ingress_limit must be an IngressLimit or None")
        if not is_identity_name(internal_username):
            raise ValueError(f"internal_username {internal_username!r} is not a valid name")
        for name, value in (
            ("handshake_timeout", handshake_timeout),
            ("connect_timeout", connect_timeout),
            ("max_packet_bytes", max_packet_bytes),
            ("session_expiry_seconds", session_expiry_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self._listeners = listeners
        self._acl = acl
        self._internal_username = internal_username
        self._internal_password = internal_password.encode("utf-8")
        self._trust_domain = trust_domain
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._handshake_timeout = float(handshake_timeout)
        self._connect_timeout = float(connect_timeout)
        self._max_packet_bytes = int(max_packet_bytes)
        self._session_expiry = int(session_expiry_seconds)
        self._ingress_limit = ingress_limit
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_refused = on_refused
        self._on_clone = on_clone
        self._observer = observer
        self._observer_failed = False
        self._tls = tls
        self._crl_pem = crl_pem
        self._revoked = revoked_serials(crl_pem) if crl_pem is not None else frozenset[int]()
        # Built now, so bad material fails the constructor rather than the first client.
        self._contexts: dict[str, ssl.SSLContext] = self._build_contexts(tls, crl_pem)
        self.metrics: Counter[str] = Counter()
        self._key = secrets.token_hex(16)
        self._broker: FilteringBroker | None = None
        self._servers: dict[str, asyncio.Server] = {}
        self._ports: dict[str, int] = {}
        self._conns: set[_Connection] = set()
        self._pending: dict[str, _Connection] = {}
        self._live: dict[str, _Connection] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------------

    @staticmethod
    def _build_contexts(tls: TlsMaterial, crl_pem: bytes | None) -> dict[str, ssl.SSLContext]:
        return {
            LISTENER_ENROLLMENT: build_server_context(tls, verify_clients=False),
            LISTENER_OPERATIONAL: build_server_context(tls, verify_clients=True, crl_pem=crl_pem),
        }

    def _amqtt_config(self) -> dict[str, object]:
        # Every listener is "external": amqtt serves no socket itself.
        listeners: dict[str, object] = {"default": {"type": "external", "bind": None}}
        for name in LISTENERS:
            listeners[name] = {"type": "external", "bind": f"external:{name}"}
        return {
            "listeners": listeners,
            "session_expiry_interval": self._session_expiry,
            "plugins": {
                f"{AuthPlugin.__module__}.{AuthPlugin.__name__}": {"broker_key": self._key},
            },
        }

    async def start(self) -> None:
        """Start amqtt and bind the listeners; call inside the running event loop."""
        if self._broker is not None:
            raise RuntimeError("broker already started")
        install_quiet_disconnects()
        install_compact_sessions()
        register(self._key, self)
        self._stopping = False
        self._broker = FilteringBroker(
            self._amqtt_config(), permits=self.permits, on_publish=self._published
        )
        await self._broker.start()
        binds = (
            (LISTENER_ENROLLMENT, self._listeners.host, self._listeners.enrollment_port),
            (LISTENER_OPERATIONAL, self._listeners.host, self._listeners.operational_port),
            # The internal listener is plain TCP with a password: never off the box.
            (LISTENER_INTERNAL, "127.0.0.1", self._listeners.internal_port),
        )
        try:
            for name, host, port in binds:
                server = await asyncio.start_server(
                    partial(self._serve, name), host, port, reuse_address=True
                )
                self._servers[name] = server
                self._ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise
        log.info("broker listening: %s", self._ports)

    async def stop(self) -> None:
        """Close the listeners, cut every connection, stop amqtt. Safe to call twice."""
        self._stopping = True
        for server in self._servers.values():
            server.close()
        conns = list(self._conns)
        for conn in conns:
            await self._cut(conn, wait=False)
        if conns:
            waits = [asyncio.ensure_future(c.done.wait()) for c in conns]
            _, still_open = await asyncio.wait(waits, timeout=_KICK_WAIT_SECONDS * 2)
            for waiter in still_open:
                waiter.cancel()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._broker is not None:
            broker, self._broker = self._broker, None
            with contextlib.suppress(Exception):
                await broker.shutdown()
        for server in self._servers.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), _KICK_WAIT_SECONDS)
        self._servers.clear()
        unregister(self._key)

    @property
    def ports(self) -> dict[str, int]:
        """The ports actually bound, by listener name (see ``LISTENERS``)."""
        if len(self._ports) != len(LISTENERS):
            raise RuntimeError("broker not started")
        return dict(self._ports)

    # -- control --------------------------------------------------------------------------------

    def connected(self) -> dict[str, Principal]:
        """Client id -> principal of every live, admitted session."""
        return {cid: conn.principal for cid, conn in self._live.items() if conn.principal}

    def has_audience(self, topic: str) -> bool:
        """Whether a message published on ``topic`` now would reach a subscriber (True
        before the broker runs: nobody can tell yet)."""
        broker = self._broker
        return True if broker is None else broker.has_subscribers(topic)

    async def kick(self, client_id: str) -> bool:
        """Cut the live session of ``client_id`` at once (its will is not published). Returns
        False when no such client is connected."""
        conn = self._live.get(client_id) or self._pending.get(client_id)
        if conn is None:
            return False
        await self._cut(conn)
        return True

    @property
    def internal_credentials(self) -> tuple[str, str]:
        return self._internal_username, self._internal_password.decode("utf-8")

    async def apply(
        self, identity_id: str, state: IdentityState, *, kind: IdentityKind = IdentityKind.DEVICE
    ) -> None:
        """Enforce ``state`` now. The ACL reads identity states on every publish, delivery and
        CONNECT, so quarantine and release need nothing more here; a revoked identity's live
        session is cut (its certificate reaches the CRL through ``publish_crl``)."""
        if state is IdentityState.REVOKED:
            await self.kick(identity_id)

    async def sync(self, identities: Iterable[IdentityLike], *, certified: bool = False) -> int:
        """Nothing to push: the ACL asks for states as it goes. Live revoked sessions go."""
        cut = 0
        for identity in identities:
            if identity.state is IdentityState.REVOKED and await self.kick(identity.id):
                cut += 1
        return cut

    async def publish_crl(self, crl_pem: bytes) -> None:
        self.update_crl(crl_pem)

    def update_crl(self, crl_pem: bytes) -> None:
        """Check new handshakes against ``crl_pem`` from now on, and cut live sessions whose
        certificate it lists (revoked: session cut, reconnect refused)."""
        revoked = revoked_serials(crl_pem)
        self._contexts = self._build_contexts(self._tls, crl_pem)
        self._crl_pem = crl_pem
        self._revoked = revoked
        for conn in list(self._live.values()):
            if conn.principal is not None and conn.principal.serial in revoked:
                self._in_background(self._cut(conn))

    async def renew_server_certificate(self, tls: TlsMaterial) -> None:
        """``BrokerControl``: see ``update_server_tls``."""
        self.update_server_tls(tls)
        log.info("serving a new server certificate on %s", ", ".join(sorted(self._contexts)))

    def update_server_tls(self, tls: TlsMaterial) -> None:
        """Serve a renewed server certificate (and client CA) on new handshakes from now on.

        Both listeners' contexts are built anew and swapped in together, as ``update_crl``
        does: every handshake takes the context in place when it starts, and a session up
        already keeps the ``SSLObject`` (and the certificate) it was made with. New contexts
        rather than ``load_cert_chain`` into the live ones: a key of another type would be
        added beside the old certificate instead of replacing it, and a failure halfway would
        leave the two listeners serving different certificates."""
        if not isinstance(tls, TlsMaterial):
            raise TypeError("tls must be a TlsMaterial")
        self._contexts = self._build_contexts(tls, self._crl_pem)
        self._tls = tls

    def _in_background(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cut(self, conn: _Connection, *, wait: bool = True) -> None:
        conn.kicked = True
        session = conn.session
        if session is not None:
            session.will_flag = False  # a cut client does not get to speak its will
        broker = self._broker
        entry = broker.sessions.get(conn.client_id or "") if broker is not None else None
        if entry is not None and entry[0] is session:
            # ends amqtt's message loop for this client without waiting for the socket
            with contextlib.suppress(Exception):
                await entry[1].handle_connection_closed()
        conn.abort()
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.done.wait(), _KICK_WAIT_SECONDS)

    # -- called by the amqtt plugins ------------------------------------------------------------

    def authenticate(self, session: Session) -> bool:
        conn = self._pending.pop(session.client_id or "", None)
        if conn is None or conn.principal is None:
            # Only connections admitted by _serve reach amqtt; anything else is a bug.
            self.metrics["refused.not_admitted"] += 1
            return False
        conn.session = session
        session.attributes[PRINCIPAL_ATTR] = conn.principal
        self._live[conn.client_id or ""] = conn
        self.metrics[f"connected.{conn.listener}"] += 1
        if self._on_connect is not None:
            try:
                self._on_connect(conn.principal, conn.remote)
            except Exception:
                log.exception("on_connect callback failed")
        if _observed(conn.principal):
            self._observe(Connected(conn.principal.name, conn.remote))
        return True

    def permits(self, session: Session, action: Action, topic: str) -> bool:
        principal = session.attributes.get(PRINCIPAL_ATTR)
        allowed = False
        if isinstance(principal, Principal):
            try:
                allowed = self._acl.allows(principal, action, topic)
            except Exception:
                log.exception("ACL check failed; denying %s %s", action, topic)
        if not allowed:
            self.metrics[f"denied.{action}"] += 1
            log.debug("denied %s %r for %s", action, topic, session.client_id)
            if _observed(principal):
                self._observe(Denied(principal.name, action, topic))
        return allowed

    def _published(self, session: Session, topic: str, size: int) -> None:
        """amqtt routes a message the ACL let ``session`` publish (its will included)."""
        principal = session.attributes.get(PRINCIPAL_ATTR)
        if _observed(principal):
            self._observe(Published(principal.name, topic, size))

    def _observe(self, observation: Observation) -> None:
        observer = self._observer
        if observer is None:
            return
        try:
            observer(observation)
        except Exception:
            self.metrics["observer.errors"] += 1
            if not self._observer_failed:
                # once: an observer that fails tends to fail on every message
                self._observer_failed = True
                log.exception("observer failed on %r (later failures only counted)", observation)

    # -- one connection -------------------------------------------------------------------------

    async def _serve(
        self, listener: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        conn = _Connection(listener, peer_address(str(peer[0]), int(peer[1])), writer)
        self._conns.add(conn)
        try:
            sock = _tcp_socket(writer)
            if sock is not None:
                # request/reply over MQTT stalls on delayed ACKs without it (notes: 11/s -> 830/s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._serve_connection(conn, reader, writer)
        except _Refused as refused:
            await self._refuse(conn, refused)
        except Exception:
            log.exception("connection from %s on %s failed", conn.remote, listener)
        finally:
            self._conns.discard(conn)
            self._forget(conn)
            if conn.kicked:
                conn.abort()
            else:
                writer.close()
            conn.done.set()

    async def _serve_connection(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._stopping:
            raise _Refused(RefusalReason.SHUTTING_DOWN)
        cert_principal = None
        if conn.listener != LISTENER_INTERNAL:
            await self._handshake(conn, writer)
            if conn.listener == LISTENER_OPERATIONAL:
                cert_principal = self._principal_from_certificate(conn, writer)
        raw, request = await self._read_connect(conn, reader, writer)
        conn.client_id = request.client_id
        principal = self._admit(conn, request, cert_principal)
        holder = self._live.get(request.client_id)
        if holder is not None:
            await self._cut(holder)  # _admit allowed this takeover
        # No await from this check to the registration: two connections racing for one client
        # id must not both get through, or amqtt could pair a session with the other's principal.
        if request.client_id in self._pending or request.client_id in self._live:
            raise _Refused(RefusalReason.CLIENT_ID_IN_USE, ConnackCode.IDENTIFIER_REJECTED)
        if self._broker is None or self._stopping:
            raise _Refused(RefusalReason.SHUTTING_DOWN, ConnackCode.SERVER_UNAVAILABLE)
        conn.principal = principal
        self._pending[request.client_id] = conn
        await self._drop_foreign_session(request.client_id, principal)
        conn.adapter = StreamWriter(writer)
        limit = self._ingress_limit if principal.kind in _INGRESS_LIMITED_KINDS else None
        replay = ReplayReader(
            raw,
            reader,
            max_read=None if conn.listener == LISTENER_INTERNAL else self._max_packet_bytes,
            on_end=partial(self._stream_ended, conn),
            ingress=IngressMeter(limit, time.monotonic()) if limit is not None else None,
            on_throttled=self._throttled,
            sock=_tcp_socket(writer),
        )
        broker = self._broker
        if broker is None or self._stopping:
            raise _Refused(RefusalReason.SHUTTING_DOWN, ConnackCode.SERVER_UNAVAILABLE)
        # the certificate served the refusal reports; an admitted session keeps only its
        # principal (the parsed certificate weighs a few kB per connected device)
        conn.cert = None
        watchdog = _KeepaliveWatchdog(self, conn, replay, request.keep_alive)
        try:
            await broker.external_connected(replay, conn.adapter, conn.listener)
        finally:
            watchdog.cancel()

    async def _handshake(self, conn: _Connection, writer: asyncio.StreamWriter) -> None:
        with capturing_peer() as capture:
            try:
                await writer.start_tls(
                    self._contexts[conn.listener], ssl_handshake_timeout=self._handshake_timeout
                )
            except Exception as exc:
                reason, detail = classify_handshake_error(exc)
                conn.cert = certificate_info(capture.leaf)
                conn.kicked = True  # nothing to say to this peer: abort
                raise _Refused(reason, detail=detail) from None
        if not compact_read_buffer(writer):
            self.metrics["tls.buffer_not_compacted"] += 1

    def _principal_from_certificate(
        self, conn: _Connection, writer: asyncio.StreamWriter
    ) -> Principal:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        info = certificate_info(der)
        conn.cert = info
        if info is None:
            raise _Refused(RefusalReason.NO_CLIENT_CERTIFICATE)
        # A resumed TLS session skips OpenSSL's verification, CRL included: check again here.
        if info.serial in self._revoked:
            raise _Refused(RefusalReason.CERTIFICATE_REVOKED, detail="serial on the CRL")
        if ssl_object.session_reused:
            now = self._clock.now()
            if now > info.certificate.not_valid_after_utc:
                raise _Refused(RefusalReason.CERTIFICATE_EXPIRED, detail="resumed session")
        try:
            san = info.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = [
                u
                for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith("spiffe://")
            ]
            if len(uris) != 1:
                raise ValueError(f"{len(uris)} SPIFFE ids")
            trust_domain, kind, name = parse_spiffe_id(uris[0])
        except (x509.ExtensionNotFound, ValueError) as exc:
            raise _Refused(RefusalReason.NOT_OUR_IDENTITY, detail=str(exc)) from None
        if self._trust_domain is not None and trust_domain != self._trust_domain:
            raise _Refused(RefusalReason.NOT_OUR_IDENTITY, detail=f"trust domain {trust_domain}")
        return Principal(
            kind=kind.value,  # IdentityKind values are all PrincipalKinds
            name=name,
            listener=LISTENER_OPERATIONAL,
            cert_fingerprint=info.fingerprint,
            serial=info.serial if info.serial > 0 else None,
        )

    async def _read_connect(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[bytes, ConnectRequest]:
        try:
            async with asyncio.timeout(self._connect_timeout):
                return await read_connect(reader)
        except TimeoutError:
            raise _Refused(RefusalReason.CONNECT_TIMEOUT) from None
        except MalformedConnect as exc:
            if exc.unsupported_protocol:
                raise _Refused(
                    RefusalReason.UNSUPPORTED_PROTOCOL,
                    ConnackCode.UNACCEPTABLE_PROTOCOL,
                    exc.detail,
                ) from None
            raise _Refused(RefusalReason.MALFORMED_CONNECT, detail=exc.detail) from None
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            raise _Refused(RefusalReason.CONNECTION_CLOSED, detail=type(exc).__name__) from None

    def _admit(
        self, conn: _Connection, request: ConnectRequest, cert_principal: Principal | None
    ) -> Principal:
        client_id = request.client_id
        if not client_id:
            # amqtt would invent an id that our admission could not follow
            raise _Refused(RefusalReason.BAD_CLIENT_ID, ConnackCode.IDENTIFIER_REJECTED)
        if conn.listener == LISTENER_ENROLLMENT:
            if not is_identity_name(client_id):
                raise _Refused(RefusalReason.BAD_CLIENT_ID, ConnackCode.IDENTIFIER_REJECTED)
            principal = Principal("enrollee", client_id, LISTENER_ENROLLMENT)
        elif conn.listener == LISTENER_OPERATIONAL:
            assert cert_principal is not None
            principal = cert_principal
        else:
            password = request.password or b""
            # compare both, always: no early exit that times the user name
            name_ok = hmac.compare_digest(
                (request.username or "").encode("utf-8"), self._internal_username.encode("utf-8")
            )
            password_ok = hmac.compare_digest(password, self._internal_password)
            if not (name_ok and password_ok):
                raise _Refused(RefusalReason.BAD_CREDENTIALS, ConnackCode.BAD_USERNAME_OR_PASSWORD)
            principal = Principal("internal", self._internal_username, LISTENER_INTERNAL)
        refusal = self._acl.admits(principal, client_id=client_id)
        if refusal is not None:
            code = _CONNACK_FOR_REFUSAL.get(str(refusal), ConnackCode.NOT_AUTHORIZED)
            raise _Refused(str(refusal), code)
        if request.will_topic is not None and not self._acl.allows(
            principal, Action.PUBLISH, request.will_topic
        ):
            raise _Refused(RefusalReason.WILL_NOT_ALLOWED, ConnackCode.NOT_AUTHORIZED)
        if client_id in self._pending:
            raise _Refused(RefusalReason.CLIENT_ID_IN_USE, ConnackCode.IDENTIFIER_REJECTED)
        holder = self._live.get(client_id)
        if holder is not None and holder.principal is not None:
            same = holder.principal.identity == principal.identity
            elsewhere = remote_host(holder.remote) != remote_host(conn.remote)
            if same and principal.kind == "device" and elsewhere:
                # One device identity live from two hosts at once: a cloned key or
                # certificate. The first session keeps its place (it is the one trusted so
                # far); the second is refused and the gateway quarantines the identity. From
                # the same host it is the device itself reconnecting over a stale session
                # (a link drop the broker has not noticed yet): that takes over, as MQTT wants.
                self._report_clone(principal, holder, conn)
                raise _Refused(
                    RefusalReason.CLONE_DETECTED,
                    ConnackCode.NOT_AUTHORIZED,
                    f"already connected from {holder.remote}",
                )
            if not same and _RANK[principal.kind] <= _RANK[holder.principal.kind]:
                raise _Refused(RefusalReason.CLIENT_ID_IN_USE, ConnackCode.IDENTIFIER_REJECTED)
        return principal

    def _report_clone(self, principal: Principal, holder: _Connection, conn: _Connection) -> None:
        self.metrics["clones"] += 1
        if self._on_clone is not None:
            try:
                self._on_clone(principal, holder.remote, conn.remote)
            except Exception:
                log.exception("on_clone callback failed")

    async def _drop_foreign_session(self, client_id: str, principal: Principal) -> None:
        """A persistent session is never inherited by another identity: its subscriptions and
        queued messages were granted to the previous owner."""
        broker = self._broker
        entry = broker.sessions.get(client_id) if broker is not None else None
        if entry is None or broker is None:
            return
        previous = entry[0].attributes.get(PRINCIPAL_ATTR)
        if not isinstance(previous, Principal) or previous.identity != principal.identity:
            await broker._cleanup_session(client_id)

    def _throttled(self, seconds: float) -> None:
        self.metrics["ingress.throttled"] += 1
        self.metrics["ingress.throttled_ms"] += round(seconds * 1000)

    def _stream_ended(self, conn: _Connection) -> None:
        """The peer went away without DISCONNECT: amqtt is about to publish its will. Judge the
        will against the state now, not the state at CONNECT (quarantine may have come since)."""
        session, principal = conn.session, conn.principal
        if session is None or principal is None or not session.will_flag:
            return
        topic = session.will_topic or ""
        if conn.kicked or not self._acl.allows(principal, Action.PUBLISH, topic):
            session.will_flag = False
            self.metrics["denied.will"] += 1
            if not conn.kicked and _observed(principal):
                self._observe(Denied(principal.name, Action.PUBLISH, topic))

    def _keepalive_expired(self, conn: _Connection) -> None:
        log.info("keep-alive expired for %s", conn.client_id)
        self.metrics["disconnected.keepalive"] += 1
        self._in_background(self._cut(conn, wait=False))

    def _forget(self, conn: _Connection) -> None:
        cid = conn.client_id or ""
        if self._pending.get(cid) is conn:
            del self._pending[cid]
        if self._live.get(cid) is conn:
            del self._live[cid]
            if conn.principal is not None and self._on_disconnect is not None:
                try:
                    self._on_disconnect(conn.principal)
                except Exception:
                    log.exception("on_disconnect callback failed")
            if _observed(conn.principal):
                self._observe(Disconnected(conn.principal.name))

    async def _refuse(self, conn: _Connection, refused: _Refused) -> None:
        if self._stopping:
            # connections cut by stop() are not refusals worth reporting
            refused = _Refused(RefusalReason.SHUTTING_DOWN, refused.connack_code)
        if refused.connack_code is not None and not conn.kicked:
            with contextlib.suppress(Exception):
                conn.writer.write(connack(refused.connack_code))
                await asyncio.wait_for(conn.writer.drain(), _CONNACK_FLUSH_SECONDS)
        self.metrics[f"refused.{refused.reason}"] += 1
        cert = conn.cert
        record = RefusedConnection(
            listener=conn.listener,
            remote=conn.remote,
            reason=refused.reason,
            client_id=conn.client_id,
            cert_subject=cert.subject if cert else None,
            cert_issuer=cert.issuer if cert else None,
            cert_fingerprint=cert.fingerprint if cert else None,
            at=self._clock.now(),
            cert_serial=cert.serial if cert else None,
            detail=refused.detail,
        )
        log.info(
            "refused %s on %s: %s%s",
            conn.remote,
            conn.listener,
            refused.reason,
            f" ({cert.subject}, issuer {cert.issuer})" if cert else "",
        )
        if self._on_refused is not None:
            try:
                self._on_refused(record)
            except Exception:
                log.exception("on_refused callback failed")
