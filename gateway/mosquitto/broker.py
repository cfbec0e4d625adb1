"""``MosquittoBroker``: Mosquitto 2 with dynamic security as the gateway's ``BrokerControl``.

Two ways to run it:

- managed (default): the gateway writes the configuration, certificates, CRL, the dynsec
  file and the device patterns (``patterns``: active devices' rights, no dynsec object per
  device) into ``run_dir`` (mode 0700) and runs two supervised ``mosquitto`` processes on the
  given ports (0 = pick a free one). The main instance has the operational listener (mutual
  TLS, dynsec) and the internal one (the gateway's clients, loopback). The enrollment instance
  (``enrollment``) has the enrollment listener (anonymous, server-authenticated TLS, each client
  id kept to its own topics) and a bridge carrying enrollment requests and answers to and from
  the main instance, so the gateway's one message client on the internal listener sees every
  request. Two brokers, two client-id namespaces: nothing an enrollee does touches a device's
  operational session. Every start rebuilds the dynsec file from the registry
  (``identities``): the registry is the truth, and one file write is far cheaper than one
  command per identity. A renewed server certificate replaces the files and reloads both
  instances (``renew_server_certificate``).
- external (``external=True``): the operator runs Mosquitto and gives the gateway an admin
  account of its dynamic-security plugin. The gateway creates its own objects over
  ``$CONTROL`` and keeps them in step; it does not start, stop or signal the broker. The CRL
  is then the operator's to load: ``publish_crl`` writes ``crl_path`` if given (point the
  operational listener's ``crlfile`` at it), and the operator must reload Mosquitto (SIGHUP,
  ``systemctl reload mosquitto``) for it to take effect. ``connected()``, the connection
  callbacks and clone detection work only if the operator's configuration has
  ``log_dest topic`` (see ``sessions``). Enrollment there is the operator's single broker with
  the shared enrollee role (see ``dynsec`` for what that exposes). Active devices get a dynsec
  client and role each there, unless ``device_patterns=True`` says the broker's ``acl_file``
  holds ``patterns.render_device_patterns()`` (the cluster's shared broker, whose keeper
  writes it).

The gateway talks to the plugin through one admin MQTT connection on the internal listener.
Every change goes through a group commit (``commit``): one ``$CONTROL`` message in flight,
the changes that arrive meanwhile together in the next, quarantines, revocations and kicks
(``apply``, ``kick``) ahead of admissions (``sync``), the changes of one identity in the
order they were made. A refused command raises ``MosquittoError(COMMAND_FAILED)`` with the
plugin's error text, in the caller whose change it was. The same connection reads the
main instance's connection notices; a monitor connection reads the enrollment instance's. From
them come ``connected()`` and the callbacks ``on_connect(principal, "host:port")`` ("[host]:port"
for an IPv6 peer, as the embedded broker writes one: ``log_lines.logged_peer``) and
``on_disconnect(principal)`` (approximate: notices sent while a connection was down are missed;
a broker restart counts as every session ending). The ``observer`` (``gateway.observe``) hears
the same as ``Connected(identity, "host:port")`` and ``Disconnected(identity)``, for
certificate identities only (devices, operators, services on the operational listener; not
enrollees, not the gateway's own clients); a takeover is the old session's ``Disconnected``
then the new one's ``Connected``. What it cannot hear from Mosquitto 2.0.11, see
``gateway.mosquitto.observe``.

What the bridges cost (loopback, 2 busy cores; an enrollee on TLS sends a QoS 1 request, a
client with the gateway's credentials answers at QoS 1; median of 380 round trips, 2 ms apart):
1.1-1.25 ms with both on one broker, 1.3-1.4 ms through the two bridges (p95 2-6 ms either way),
and 42 ms through a single bridge carrying both directions (see ``enrollment`` for why).
Back-to-back, ~1300-1400 round trips a second pass the bridges, against ~1650 on one broker.

Clones: one device identity live from two hosts at once means a copied key and certificate.
The embedded broker refuses the second connection. Mosquitto cannot be asked first: a second
connection with a live client id (on the operational listener, the certificate's CN) takes the
session over and the first connection is closed, before the gateway hears of it. The broker's
"connected" notice for a client id that is live already shows the takeover (see ``sessions``);
when the two connections come from different hosts, ``on_clone(principal, first_address,
second_address)`` runs, the gateway quarantines the identity right after (one ``modifyRole``),
and once that quarantine is in force the broker cuts the second session (a take-over by the
admin account), unless another has replaced it meanwhile. So on Mosquitto the clone holds the
session, with the device's rights, for the few milliseconds until the quarantine is in force,
then loses it; the first session is gone too (Mosquitto closed it), and whichever reconnects
finds the device quarantined. A takeover from another host while the device is quarantined
already is cut at once. From the same host it is the device itself reconnecting over a stale
session: no clone, as on the embedded broker. The check relies on the notices, so a session
whose end was missed while the admin connection was down could make a reconnect from a new
address look like a clone.

Revocation: the deny-all role and a kick in one message, then the CRL (``publish_crl``). A
device reconnecting before the CRL is reloaded completes its handshake; every such session
is cut as soon as its connection notice arrives (see ``_observe``), and once more after the
reload if it is somehow still there.

Refused handshakes (a broker we start): the main instance's log names each connection the
operational listener turned away during the TLS handshake, and ``on_refused`` hears of it with
its address, time and reason (see ``gateway.mosquitto.handshakes`` for what Mosquitto's log
cannot tell: the certificate's subject and issuer, and why its verification failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiomqtt

from gateway import observe
from gateway.acl import (
    LISTENER_ENROLLMENT,
    LISTENER_INTERNAL,
    LISTENER_OPERATIONAL,
    Principal,
    PrincipalKind,
)
from gateway.broker.refusals import RefusedConnection, remote_host
from gateway.broker_control import IdentityLike
from gateway.mosquitto import dynsec
from gateway.mosquitto.commit import GroupCommit
from gateway.mosquitto.config import MosquittoConfig, render_config
from gateway.mosquitto.crl import check_crl
from gateway.mosquitto.enrollment import (
    EnrollmentConfig,
    render_enrollment_acl,
    render_enrollment_config,
    render_monitor_acl,
    render_password_file,
)
from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from gateway.mosquitto.files import rotate_if_large, write_atomic
from gateway.mosquitto.handshakes import HandshakeRefused, HandshakeWatch
from gateway.mosquitto.patterns import render_device_patterns
from gateway.mosquitto.process import (
    MosquittoProcess,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
)
from gateway.mosquitto.sessions import Connected, Session, SessionTracker
from gateway.observe import Observation, Observer
from gateway.protocol import topics
from gateway.store import IdentityState
from pki.clock import Clock, SystemClock
from pki.profile import IdentityKind, is_identity_name

__all__ = [
    "IdentityLike",
    "ListenerPorts",
    "Listeners",
    "MosquittoBroker",
    "ServerTls",
    "ServerTlsMaterial",
]

log = logging.getLogger(__name__)

LOG_NOTICE_TOPIC = "$SYS/broker/log/N"  # connections come and go at notice level
LOG_INFO_TOPIC = "$SYS/broker/log/I"  # "Reloading config." is logged at info level
LOG_ERROR_TOPIC = "$SYS/broker/log/E"  # a refused handshake's OpenSSL error (``handshakes``)
MONITOR_USERNAME = "_fg_monitor"
_RELOAD_NOTICE = "Reloading config."
_PORT_RETRIES = 3
_LOG_LIMIT = 16 * 1024 * 1024
_LOOPBACK = "127.0.0.1"
_LOOPBACK_ONLY = frozenset({"internal", "monitor"})  # listeners of the gateway's own clients


class ListenerPorts(Protocol):
    """Where the broker listens (``gateway.broker.ListenerConfig`` has this shape)."""

    @property
    def host(self) -> str: ...
    @property
    def enrollment_port(self) -> int: ...
    @property
    def operational_port(self) -> int: ...
    @property
    def internal_port(self) -> int: ...


class ServerTls(Protocol):
    """The broker's TLS material (``gateway.broker.TlsMaterial`` has this shape)."""

    @property
    def server_cert_pem(self) -> bytes: ...
    @property
    def server_key_pem(self) -> bytes: ...
    @property
    def client_ca_pem(self) -> bytes: ...


def _check_port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value < 65536:
        raise ValueError(f"{what} must be between 0 and 65535, got {value}")
    return value


@dataclass(frozen=True)
class Listeners:
    """A ``ListenerPorts`` value; port 0 means "pick a free port at start"."""

    host: str = "127.0.0.1"
    enrollment_port: int = 0
    operational_port: int = 0
    internal_port: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError("host must be a non-empty str")
        for name in ("enrollment_port", "operational_port", "internal_port"):
            _check_port(getattr(self, name), name)


@dataclass(frozen=True)
class ServerTlsMaterial:
    """A ``ServerTls`` value: PEM server chain, PEM key, PEM CAs that issue client certs."""

    server_cert_pem: bytes
    server_key_pem: bytes
    client_ca_pem: bytes

    def __post_init__(self) -> None:
        for name in ("server_cert_pem", "server_key_pem", "client_ca_pem"):
            value = getattr(self, name)
            if not isinstance(value, bytes):
                raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
            if b"-----BEGIN " not in value:
                raise ValueError(f"{name} is not PEM")


def _check_tls(tls: object) -> None:
    for name in ("server_cert_pem", "server_key_pem", "client_ca_pem"):
        if not isinstance(getattr(tls, name, None), bytes):
            raise TypeError(f"tls.{name} must be bytes")


def _nodelay(client: aiomqtt.Client) -> None:
    """No Nagle on the admin connection: each command batch waits for its answer, and
    delayed ACKs add 40-90 ms per round trip otherwise (measured on Mosquitto)."""
    sock = getattr(client._client, "socket", lambda: None)()  # paho's socket under aiomqtt
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _granted(codes: Iterable[object]) -> bool:
    """True when no SUBACK code is a failure (0x80 and above)."""
    for code in codes:
        value = getattr(code, "value", code)
        if not isinstance(value, int) or value >= 0x80:
            return False
    return True


# Sessions the observer hears of: a certificate's identity on the operational listener, not an
# enrollee (no identity yet) nor the gateway's own clients.
_CERTIFICATE_KINDS: frozenset[str] = frozenset({"device", "operator", "service"})
_ADMIN_TOPICS = f"{topics.PREFIX}/admin/"  # operators' alone (``gateway.acl``)

_PRINCIPAL_KIND: dict[IdentityKind, PrincipalKind] = {
    IdentityKind.DEVICE: "device",
    IdentityKind.OPERATOR: "operator",
    IdentityKind.SERVICE: "service",
}


@dataclass
class _Link:
    """One of the gateway's own MQTT connections to a broker instance (the admin connection
    to the main instance, the monitor connection to the enrollment instance), kept up by
    ``MosquittoBroker._keep_up``. Mutable state, not a value."""

    name: str
    port: Callable[[], int]
    username: str
    password: str
    client_id: str
    required: tuple[str, ...]  # subscriptions without which the link is useless
    optional: tuple[str, ...]  # subscriptions an external broker may refuse
    on_message: Callable[[str, bytes], None]
    host: str = _LOOPBACK
    tls: ssl.SSLContext | None = None
    on_lost: Callable[[], None] | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    client: aiomqtt.Client | None = None
    last_error: str = ""
    task: asyncio.Task[None] | None = None


@dataclass
class _Lane:
    """The changes of one identity under way: one at a time, and how many of those waiting
    are urgent. Mutable state, not a value."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    urgent: int = 0


@dataclass(frozen=True)
class _Instance:
    """Which broker a notice came from, and what its listener ports mean there."""

    name: str
    tracker: SessionTracker
    listeners: dict[int, str]


class MosquittoBroker:
    """Mosquitto as ``BrokerControl`` (see the module docstring for managed and external)."""

    def __init__(
        self,
        run_dir: Path,
        listeners: ListenerPorts,
        tls: ServerTls | None,
        crl_pem: bytes | None,
        *,
        external: bool = False,
        admin_password: str | None = None,
        admin_username: str = dynsec.DEFAULT_ADMIN_USERNAME,
        admin_host: str = "127.0.0.1",
        admin_tls: ssl.SSLContext | None = None,
        internal_password: str | None = None,
        internal_username: str = dynsec.DEFAULT_INTERNAL_USERNAME,
        identities: Callable[[], Iterable[IdentityLike]] | None = None,
        crl_path: Path | None = None,
        mosquitto_binary: Path | None = None,
        plugin_path: Path | None = None,
        clock: Clock | None = None,
        on_clone: Callable[[Principal, str, str], None] | None = None,
        on_connect: Callable[[Principal, str], None] | None = None,
        on_disconnect: Callable[[Principal], None] | None = None,
        on_refused: Callable[[RefusedConnection], None] | None = None,
        observer: Observer | None = None,
        command_timeout: float = 10.0,
        device_patterns: bool = False,
        batch_size: int = 200,
        batch_seconds: float = 0.03,
        follow_sessions: bool = True,
    ) -> None:
        """``follow_sessions=False`` (an external broker only): the admin connection leaves the
        main instance's connection notices unread until ``follow_sessions(True)`` (see that
        method).

        ``on_refused`` (a broker we start only): every TLS handshake the operational listener
        refuses, as a ``RefusedConnection`` with the address, the time and a reason code
        (``gateway.mosquitto.handshakes``: ``no_client_certificate``, ``certificate_invalid``
        for any certificate that failed verification, ``client_rejected_server``,
        ``connection_closed``, ``tls_handshake_failed``). Mosquitto logs nothing of the
        certificate, so ``cert_subject``, ``cert_issuer``, ``cert_fingerprint`` and
        ``cert_serial`` are None, ``client_id`` too (a refused handshake sends no CONNECT); it
        does not say which CA issued a rogue certificate, nor whether a certificate was
        revoked, expired or of a foreign CA. An external broker's log is its operator's: not
        read for this."""
        if not isinstance(run_dir, Path):
            raise TypeError(f"run_dir must be a Path, not {type(run_dir).__name__}")
        for name in ("host", "enrollment_port", "operational_port", "internal_port"):
            if not hasattr(listeners, name):
                raise TypeError(f"listeners has no {name!r}")
        ports = {
            "enrollment": _check_port(listeners.enrollment_port, "enrollment_port"),
            "operational": _check_port(listeners.operational_port, "operational_port"),
            "internal": _check_port(listeners.internal_port, "internal_port"),
        }
        if external:
            if admin_password is None:
                raise ValueError("an external broker needs the admin password of its dynsec plugin")
            if 0 in ports.values():
                raise ValueError("an external broker's ports must be given (0 is not a port there)")
            if on_refused is not None:
                raise ValueError("an external broker's refusals are in its own log, not read")
        else:
            if tls is None or crl_pem is None:
                raise ValueError("a managed broker needs its TLS material and a CRL")
            _check_tls(tls)
            if not isinstance(crl_pem, bytes):
                raise TypeError("crl_pem must be bytes")
        if not isinstance(batch_size, int) or batch_size < 3:
            raise ValueError("batch_size must be an int of at least 3 (one identity's commands)")
        if command_timeout <= 0:
            raise ValueError("command_timeout must be positive")
        if isinstance(batch_seconds, bool) or not isinstance(batch_seconds, int | float):
            raise TypeError("batch_seconds must be a number")
        if batch_seconds <= 0:
            raise ValueError("batch_seconds must be positive")
        if not follow_sessions and not external:
            raise ValueError("a broker we start is followed: its bridges are seen in its notices")
        for name, callback in (
            ("on_clone", on_clone),
            ("on_connect", on_connect),
            ("on_disconnect", on_disconnect),
            ("on_refused", on_refused),
            ("observer", observer),
        ):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable")
        self._admin_username = dynsec.check_reserved_username(admin_username)
        self._internal_username = dynsec.check_reserved_username(internal_username)
        reserved = {self._admin_username, self._internal_username}
        if len(reserved) < 2:
            raise ValueError("admin and internal usernames must differ")
        if reserved & {dynsec.DEFAULT_BRIDGE_USERNAME, MONITOR_USERNAME}:
            raise ValueError(
                f"{dynsec.DEFAULT_BRIDGE_USERNAME} and {MONITOR_USERNAME} are the enrollment "
                "instance's accounts"
            )
        self._run_dir = run_dir
        self._host = listeners.host
        self._ports = ports
        self._monitor_port = 0
        self._tls = tls
        self._crl_pem = crl_pem
        self._external = external
        # A broker we start always has the patterns; an external one only if its owner says so.
        self._device_patterns = device_patterns or not external
        self._admin_password = admin_password or secrets.token_urlsafe(32)
        self._internal_password = internal_password or secrets.token_urlsafe(32)
        self._bridge_password = secrets.token_urlsafe(32)
        self._monitor_password = secrets.token_urlsafe(32)
        # Secret and fresh at every start: an enrollee naming the bridge's local client id or
        # the monitor's would take that session over (see ``enrollment``).
        self._bridge_ids = {
            name: (f"_fg_{name}-{secrets.token_hex(8)}", f"_fg_{name}-{secrets.token_hex(16)}")
            for name in ("requests", "answers")
        }
        self._bridges_up: set[str] = set()  # remote client ids of the bridges now connected
        self._identities = identities
        self._crl_path = crl_path if external else run_dir / "crl.pem"
        self._binary = mosquitto_binary
        self._plugin_path = plugin_path
        self._clock: Clock = clock or SystemClock()
        self._command_timeout = command_timeout
        self._batch_size = batch_size
        self._on_clone = on_clone
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_refused = on_refused
        # what the admin API's `metrics` and <home>/metrics.prom show in their broker section
        self.metrics: Counter[str] = Counter()
        self._observer = observer
        self._follow_sessions: bool = bool(follow_sessions)

        self._process: MosquittoProcess | None = None
        self._enrollment_process: MosquittoProcess | None = None
        self._pending: dict[str, asyncio.Future[dynsec.Response]] = {}
        # by instance: whoever waits for its "Reloading config." (``_reload``)
        self._reload_waiters: dict[str, list[asyncio.Future[None]]] = {
            "main": [],
            "enrollment": [],
        }
        # by instance: held from writing its files to the confirmation of their reload, so a
        # reload confirms the files its caller wrote (without it, renewing the certificate and
        # publishing a CRL at once, the CRL could be confirmed by the renewal's earlier reload)
        self._reload_locks: dict[str, asyncio.Lock] = {
            "main": asyncio.Lock(),
            "enrollment": asyncio.Lock(),
        }
        self._tracker = SessionTracker()
        self._operators: set[str] = set()  # client ids of the operators' live sessions
        # Whether every session of the main instance was seen begin: a broker we start, read
        # since it started with no gap; never for one followed from some moment on.
        self._sessions_whole = False
        self._handshakes = HandshakeWatch(())  # its TLS port is known at start
        # device sessions judged clones, cut once the identity's quarantine is in force
        self._clones: dict[str, Session] = {}
        self._cuts: set[asyncio.Task[None]] = set()  # sessions being cut (``_cut``)
        self._enrollment_tracker = SessionTracker()
        self._bridges_ready = asyncio.Event()
        self._enforced: dict[str, dynsec.Enforcement] = {}
        # identities with a dynsec client and role of their own, as far as we know (with
        # device patterns, not the active devices that were never anything else)
        self._provisioned: set[str] = set()
        self._lanes: dict[str, _Lane] = {}
        self._commit = GroupCommit(
            self._exchange, max_commands=batch_size, budget=batch_seconds
        )
        self._admin = _Link(
            name="admin",
            host=admin_host,
            tls=admin_tls,
            port=lambda: self._ports["internal"],
            username=self._admin_username,
            password=self._admin_password,
            client_id=f"fleetgate-control-{secrets.token_hex(4)}",
            required=(dynsec.RESPONSE_TOPIC,),
            optional=self._admin_optional(),
            on_message=self._on_admin_message,
            on_lost=self._admin_lost,
        )
        self._monitor = _Link(
            name="monitor",
            port=lambda: self._monitor_port,
            username=MONITOR_USERNAME,
            password=self._monitor_password,
            client_id=f"_fg_monitor-{secrets.token_hex(16)}",
            required=(LOG_NOTICE_TOPIC,),
            optional=(LOG_INFO_TOPIC,),  # its reloads, when its certificate is renewed
            on_message=self._on_monitor_message,
        )
        self._started = False

    def _admin_optional(self) -> tuple[str, ...]:
        """Connection notices feed connected(); absent on an external broker without
        `log_dest topic`, which only makes connected() empty. The info lines only tell that a
        SIGHUP we sent was taken: an external broker is reloaded by its owner (the cluster's
        keeper), and every gateway of a cluster reading them for nothing cost each a message
        per line of the fleet's connections. The error lines name refused handshakes (see
        ``on_refused``), for a broker we start only, like the info lines."""
        notices = (LOG_NOTICE_TOPIC,) if self._follow_sessions else ()
        return notices if self._external else (*notices, LOG_INFO_TOPIC, LOG_ERROR_TOPIC)

    @property
    def follows_sessions(self) -> bool:
        return self._follow_sessions

    async def follow_sessions(self, follow: bool) -> None:
        """Read the main instance's connection notices (``connected()``, the connect and
        disconnect callbacks, the observer, clone judgement) or leave them unread.

        Each notice of the fleet costs every reader an MQTT message: a gateway of a cluster
        that does not lead, and so acts on none of them, leaves them unread. Turning it off
        forgets the sessions (nothing heard meanwhile would keep them true) without telling
        anyone they ended; turning it on starts from nothing, so a session that began before
        is unknown until it ends or is taken over. For a takeover that means: a clone that
        took over a session begun before is not seen as one; the device it pushed out
        reconnects and takes the session back, and that takeover is judged."""
        follow = bool(follow)
        if not follow and not self._external:
            raise ValueError("a broker we start is followed: its bridges are seen in its notices")
        if follow == self._follow_sessions:
            return
        self._follow_sessions = follow
        self._admin.optional = self._admin_optional()
        if not follow:
            self._tracker.clear()
            self._operators.clear()
        self._sessions_whole = False  # either way: sessions may begin or have begun unseen
        client = self._admin.client
        if client is None:
            return  # the link subscribes as told when it (re)connects
        try:
            if follow:
                await client.subscribe(LOG_NOTICE_TOPIC, qos=0)
            else:
                await client.unsubscribe(LOG_NOTICE_TOPIC)
        except aiomqtt.MqttError as exc:
            # the link is going down; it comes back with the subscriptions asked for now
            log.debug("could not %s the connection notices: %s",
                      "follow" if follow else "leave", exc)

    # -- BrokerControl --------------------------------------------------------------------

    @property
    def ports(self) -> dict[str, int]:
        """``enrollment``: the enrollment instance's TLS listener (managed) or the operator's
        enrollment listener (external); ``operational`` and ``internal`` on the main one."""
        if 0 in self._ports.values():
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "ports are chosen at start()")
        return dict(self._ports)

    @property
    def internal_credentials(self) -> tuple[str, str]:
        """Username and password of the gateway's message client on the internal listener
        (publish and subscribe anywhere outside ``$`` topics)."""
        return self._internal_username, self._internal_password

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def process(self) -> MosquittoProcess | None:
        """The main instance's process (None for an external broker)."""
        return self._process

    @property
    def enrollment_process(self) -> MosquittoProcess | None:
        """The enrollment instance's process (None for an external broker)."""
        return self._enrollment_process

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        try:
            if self._external:
                await self._start_link(self._admin)
                await self.execute(
                    dynsec.baseline_commands(self._internal_username, self._internal_password)
                )
                if self._identities is not None:
                    await self.sync(self._identities())
            else:
                self._write_run_dir()
                await self._start_main()
                self._handshakes = HandshakeWatch((self._ports["operational"],))
                # the admin link reads the main instance's notices before the bridge can
                # connect, so the bridge's arrival is not missed
                await self._start_link(self._admin)
                # nobody else knows the new process yet: every session is seen begin (a
                # broker we start is always followed: __init__ and follow_sessions refuse less)
                self._sessions_whole = True
                await self._start_enrollment()
                await self._start_link(self._monitor)
                await self._await_bridges()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        # The links first: a notice they handle while the cuts are awaited would start a new
        # cut that nobody cancels.
        for link in (self._monitor, self._admin):
            task, link.task = link.task, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        cuts, self._cuts = self._cuts, set()
        for cut in cuts:
            cut.cancel()
        await asyncio.gather(*cuts, return_exceptions=True)
        self._clones.clear()
        await self._commit.close()
        self._fail_pending("the broker is stopping")
        # the enrollment instance first: its bridge would only retry against a stopped broker
        for process in (self._enrollment_process, self._process):
            if process is not None:
                await process.stop()
        self._tracker.clear()
        self._enrollment_tracker.clear()
        self._operators.clear()
        self._sessions_whole = False
        self._bridges_up.clear()
        self._bridges_ready.clear()
        self._started = False

    async def apply(
        self, identity_id: str, state: IdentityState, *, kind: IdentityKind = IdentityKind.DEVICE
    ) -> None:
        """Enforce one identity's state now (live sessions included; see ``dynsec``), ahead
        of queued admissions. On a broker we started, a state already in force sends
        nothing."""
        target = dynsec.Enforcement(identity_id, kind, IdentityState(state))
        # A broker we started has no other writer, so what we remember is what holds; an
        # external one may have been changed by another gateway of the cluster.
        await self._enforce(
            [target], force=self._external, urgent=True, certain=not self._external
        )

    async def sync(
        self, identities: Iterable[IdentityLike], *, certified: bool = False
    ) -> int:
        """Bring every listed identity to its state, sending only what changed since the last
        apply/sync; returns how many identities changed. Safe to call periodically with the
        whole registry.

        ``certified``: devices this gateway has just issued a certificate to, active now. On
        an external broker another writer (a cluster's leader, this gateway before a restart)
        may have left a role for an identity we never gave one; a sync resets it, but an
        admission must not: whoever quarantined the device meanwhile enforces that change
        itself, and a reset sent after it would undo it. A device that was never anything
        but active has no objects, so an admission sends nothing."""
        targets = [
            dynsec.Enforcement(item.id, IdentityKind(item.kind), IdentityState(item.state))
            for item in identities
        ]
        return await self._enforce(
            targets, force=False, urgent=False, certain=certified or not self._external
        )

    async def kick(self, client_id: str) -> bool:
        """Cut ``client_id``'s live sessions, on either instance; True if one was connected as
        far as the brokers' notices tell (see ``sessions``). A certificate identity keeps its
        rights and may reconnect; use ``apply(..., REVOKED)`` to keep it out."""
        if not isinstance(client_id, str) or not client_id or "\x00" in client_id:
            raise ValueError("client_id must be a non-empty str without NUL")
        on_main = client_id in self._tracker
        enrolling = client_id in self._enrollment_tracker
        was_connected = on_main or enrolling
        if self._enrollment_process is not None and (enrolling or not on_main):
            # an enrollee (or a session the notices missed): take its client id over on the
            # enrollment instance
            await self._take_over(client_id, self._monitor)
        known = self._enforced.get(client_id)
        if (
            known is not None
            and known.state is not IdentityState.REVOKED
            and client_id in self._provisioned
        ):
            try:
                await self.execute(dynsec.kick_commands(client_id), urgent=True)
                return was_connected
            except MosquittoError as exc:
                if exc.reason is not MosquittoReason.COMMAND_FAILED:
                    raise
        await self._take_over(client_id, self._admin)
        return was_connected

    async def publish_crl(self, crl_pem: bytes) -> None:
        """Install ``crl_pem`` for the next handshakes. Refuses (CRL_EXPIRED) a CRL whose
        nextUpdate has passed: Mosquitto would then turn away every certificate."""
        check_crl(crl_pem, self._clock.now())
        if self._external:
            if self._crl_path is None:
                log.warning("external broker without crl_path: the CRL is not installed")
            else:
                # the operator's broker may run as another user; a CRL holds nothing secret
                write_atomic(self._crl_path, crl_pem, 0o644)
                log.info("CRL written to %s; reload the broker to apply it", self._crl_path)
            self._crl_pem = crl_pem
            return
        process = self._process
        if process is None or not process.running:
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "mosquitto is not running")
        assert self._crl_path is not None
        async with self._reload_locks["main"]:
            write_atomic(self._crl_path, crl_pem)
            self._crl_pem = crl_pem
            await self._reload(process, "main")
        # Sessions of revoked identities are cut as they are seen (``_observe``); one whose
        # cut failed gets another now that the CRL keeps its reconnects out.
        for client_id, session in self._tracker.sessions().items():
            if self._revoked_session(session):
                self._cut(client_id, "revoked")

    async def renew_server_certificate(self, tls: ServerTls) -> None:
        """Serve ``tls``'s server certificate on both instances' new handshakes: ``server.pem``
        and ``server.key`` rewritten (each atomically), then both reloaded (SIGHUP: Mosquitto
        re-reads its certificates; sessions up stay, on the handshake they made). Returns once
        both have confirmed the reload; MosquittoError NOT_RUNNING when an instance is not
        running, RELOAD_UNCONFIRMED when one does not confirm in time (the files are in place
        then: the next reload or restart serves them).

        An external broker's files are its owner's: ValueError (a cluster's keeper renews the
        certificate of the broker it runs, through this method of its managed broker)."""
        if self._external:
            raise ValueError("an external broker's server certificate is renewed by its owner")
        _check_tls(tls)
        main, enrollment = self._process, self._enrollment_process
        if main is None or enrollment is None or not (main.running and enrollment.running):
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "mosquitto is not running")
        async with self._reload_locks["main"], self._reload_locks["enrollment"]:  # this order
            # the key first: a certificate read with its old key would fail a restart meanwhile
            write_atomic(self._run_dir / "server.key", tls.server_key_pem)
            write_atomic(self._run_dir / "server.pem", tls.server_cert_pem)
            self._tls = tls
            # both waited for (not the first failure alone): the locks cover both reloads
            outcomes = await asyncio.gather(
                self._reload(main, "main"),
                self._reload(enrollment, "enrollment"),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        log.info("both instances serve the new server certificate")

    def connected(self) -> dict[str, Principal]:
        """Client id -> who, from the brokers' connection notices (approximate: see
        ``sessions``). A client id live on both instances (an enrollee using a device's id)
        is listed as the main instance's client."""
        result: dict[str, Principal] = {}
        for instance in (self._main_instance(), self._enrollment_instance()):
            for client_id, session in instance.tracker.sessions().items():
                principal = self._principal(instance, session)
                if principal is not None:
                    result.setdefault(client_id, principal)
        return result

    def has_audience(self, topic: str) -> bool:
        """Whether a message on ``topic`` now would reach anyone, as far as the connection
        notices tell. Mosquitto does not say who subscribed to what; but only operators may
        read the admin topics (``gateway.acl``), so an admin event with no operator connected
        reaches nobody. Any other topic, or sessions that may have begun unseen (an external
        broker, notices followed from some moment on, a gap while the admin connection was
        down): True (nobody can tell)."""
        if not self._sessions_whole or not topic.startswith(_ADMIN_TOPICS):
            return True  # an operator may have connected before we looked
        return bool(self._operators)

    # -- who is who ------------------------------------------------------------------------

    def _main_instance(self) -> _Instance:
        listeners = {
            self._ports["internal"]: LISTENER_INTERNAL,
            self._ports["operational"]: LISTENER_OPERATIONAL,
        }
        if self._external:  # the operator's one broker has the enrollment listener too
            listeners[self._ports["enrollment"]] = LISTENER_ENROLLMENT
        return _Instance("main", self._tracker, listeners)

    def _enrollment_instance(self) -> _Instance:
        return _Instance(
            "enrollment", self._enrollment_tracker, {self._ports["enrollment"]: LISTENER_ENROLLMENT}
        )

    def _principal(self, instance: _Instance, session: Session) -> Principal | None:
        """Who a session is; None for our own plumbing (admin, monitor, bridge) and for what
        cannot be a principal (a client id that is no identity name)."""
        listener = instance.listeners.get(session.port) if session.port is not None else None
        client_id = session.client_id
        if listener is None or not is_identity_name(client_id):
            return None
        if session.username == self._admin_username:
            return None  # the control connection, or one of its kicks (``_take_over``)
        if session.username == self._internal_username:
            return Principal("internal", client_id, listener)
        if listener == LISTENER_OPERATIONAL and session.username is not None:
            known = self._enforced.get(session.username)
            kind: PrincipalKind = _PRINCIPAL_KIND[known.kind] if known else "device"
            if is_identity_name(session.username):
                return Principal(kind, session.username, listener)
            return None
        if listener == LISTENER_ENROLLMENT and session.username is None:
            return Principal("enrollee", client_id, listener)
        return None

    def _observe(self, instance: _Instance, line: str) -> None:
        """One connection notice: keep the session table, tell the gateway, judge takeovers."""
        change = instance.tracker.feed(line)
        if change is None:
            return
        session = change.session
        bridge = instance.name == "main" and session.client_id in self._bridge_remotes()
        if isinstance(change, Connected):
            if bridge:
                self._bridges_up.add(session.client_id)
                if self._bridges_up == self._bridge_remotes():
                    self._bridges_ready.set()
            if change.replaced is not None:
                self._tell(instance, change.replaced, connected=False)
                if instance.name == "main":
                    self._judge_takeover(change.replaced, session)
            self._tell(instance, session, connected=True)
            if instance.name == "main" and self._revoked_session(session):
                # Revocation sets the deny-all role and kicks, then the gateway installs the
                # new CRL (``publish_crl``): a reconnect in between completes its handshake
                # under the old CRL and gets CONNACK. Kicking once more after the reload would
                # not close that for sure (a handshake done under the old CRL may send its
                # CONNECT after that kick; a CRL signed before a later revocation is reloaded
                # after it). Every session of a revoked identity, whenever it began, shows in
                # a notice like this one: cutting each one as it is seen leaves none, and once
                # the CRL is in force no handshake of the identity gets this far.
                self._cut(session.client_id, "revoked")
        else:
            if bridge:
                self._bridges_up.discard(session.client_id)
                self._bridges_ready.clear()
                log.warning("an enrollment bridge to the main instance is down")
            self._tell(instance, session, connected=False)

    def _bridge_remotes(self) -> set[str]:
        return {remote for remote, _ in self._bridge_ids.values()}

    def _tell(self, instance: _Instance, session: Session, *, connected: bool) -> None:
        principal = self._principal(instance, session)
        if instance.name == "main":
            if not connected:
                self._operators.discard(session.client_id)  # whatever it is known as now
            elif principal is not None and principal.kind == "operator":
                self._operators.add(session.client_id)
        if principal is None:
            return
        address = session.address  # "[v6]:port", as the embedded broker's (Session)
        try:
            if connected and self._on_connect is not None:
                self._on_connect(principal, address)
            elif not connected and self._on_disconnect is not None:
                self._on_disconnect(principal)
        except Exception:
            log.exception("%s callback failed", "on_connect" if connected else "on_disconnect")
        if principal.kind in _CERTIFICATE_KINDS:
            self._notify(
                observe.Connected(principal.name, address)
                if connected
                else observe.Disconnected(principal.name)
            )

    def _notify(self, observation: Observation) -> None:
        if self._observer is None:
            return
        try:
            self._observer(observation)
        except Exception:
            log.exception("observer failed on %s", type(observation).__name__)

    def _restarted(self, instance: _Instance) -> None:
        """A broker process was restarted: every session it had is gone."""
        for session in instance.tracker.clear():
            self._tell(instance, session, connected=False)
        if instance.name == "main":
            self._handshakes.clear()
            self._clones.clear()
            # devices reconnect before the admin connection does: some are never seen begin
            self._sessions_whole = False
            self._bridges_up.clear()
            self._bridges_ready.clear()

    # -- managed processes ----------------------------------------------------------------

    def _write_run_dir(self) -> None:
        run_dir = self._run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(run_dir, 0o700)  # keys and password hashes live here
        tls = self._tls
        assert tls is not None and self._crl_pem is not None and self._crl_path is not None
        check_crl(self._crl_pem, self._clock.now())
        write_atomic(run_dir / "server.pem", tls.server_cert_pem)
        write_atomic(run_dir / "server.key", tls.server_key_pem)
        write_atomic(run_dir / "client-ca.pem", tls.client_ca_pem)
        write_atomic(self._crl_path, self._crl_pem)
        targets = [
            dynsec.Enforcement(item.id, IdentityKind(item.kind), IdentityState(item.state))
            for item in (self._identities() if self._identities is not None else ())
        ]
        initial = dynsec.initial_config(
            admin_username=self._admin_username,
            admin_password=self._admin_password,
            internal_username=self._internal_username,
            internal_password=self._internal_password,
            bridge_username=dynsec.DEFAULT_BRIDGE_USERNAME,
            bridge_password=self._bridge_password,
            identities=targets,
            device_patterns=self._device_patterns,
        )
        write_atomic(run_dir / "dynsec.json", json.dumps(initial, indent=1).encode())
        write_atomic(run_dir / "devices.acl", render_device_patterns().encode())
        self._enforced = {t.identity: t for t in targets}
        self._provisioned = {
            t.identity
            for t in targets
            if dynsec.has_objects(t, device_patterns=self._device_patterns)
        }
        write_atomic(run_dir / "enrollment.acl", render_enrollment_acl().encode())
        write_atomic(run_dir / "monitor.acl", render_monitor_acl(MONITOR_USERNAME).encode())
        write_atomic(
            run_dir / "monitor.passwd",
            render_password_file(MONITOR_USERNAME, self._monitor_password, os.urandom).encode(),
        )
        for name in ("mosquitto.log", "mosquitto.out", "enrollment.log", "enrollment.out"):
            rotate_if_large(run_dir / name, _LOG_LIMIT)

    async def _spawn(
        self,
        wanted: dict[str, int],
        make: Callable[[dict[str, int]], MosquittoProcess],
    ) -> tuple[MosquittoProcess, dict[str, int]]:
        """Start the process ``make`` builds for the ports ``wanted`` (0: picked here), picking
        again when a picked port was taken meanwhile."""
        for attempt in range(_PORT_RETRIES):
            ports = {
                name: port or free_port(_LOOPBACK if name in _LOOPBACK_ONLY else self._host)
                for name, port in wanted.items()
            }
            process = make(ports)
            try:
                await process.start()
            except MosquittoError as exc:
                picked = any(port == 0 for port in wanted.values())
                if picked and "in use" in exc.detail and attempt + 1 < _PORT_RETRIES:
                    log.info("a picked port was taken meanwhile; picking again")
                    continue
                raise
            return process, ports
        raise AssertionError("unreachable: the last attempt raises")

    async def _start_main(self) -> None:
        binary = find_mosquitto(self._binary)
        plugin = find_dynsec_plugin(self._plugin_path)
        run_dir = self._run_dir.absolute()
        assert self._crl_path is not None
        crl_path = self._crl_path.absolute()
        instance = self._main_instance

        def make(ports: dict[str, int]) -> MosquittoProcess:
            config = MosquittoConfig(
                run_as_user=pwd.getpwuid(os.geteuid()).pw_name,
                plugin_path=plugin,
                dynsec_path=run_dir / "dynsec.json",
                log_path=run_dir / "mosquitto.log",
                host=self._host,
                internal_port=ports["internal"],
                operational_port=ports["operational"],
                server_cert_path=run_dir / "server.pem",
                server_key_path=run_dir / "server.key",
                client_ca_path=run_dir / "client-ca.pem",
                crl_path=crl_path,
                device_acl_path=run_dir / "devices.acl",
            )
            config_path = run_dir / "mosquitto.conf"
            write_atomic(config_path, render_config(config).encode())
            return MosquittoProcess(
                config_path,
                listeners=[
                    (_LOOPBACK, ports["internal"]),
                    (self._host, ports["operational"]),
                ],
                binary=binary,
                output_path=run_dir / "mosquitto.out",
                log_path=config.log_path,
                on_restart=lambda: self._restarted(instance()),
            )

        wanted = {name: self._ports[name] for name in ("internal", "operational")}
        self._process, ports = await self._spawn(wanted, make)
        self._ports.update(ports)

    async def _start_enrollment(self) -> None:
        binary = find_mosquitto(self._binary)
        run_dir = self._run_dir.absolute()
        instance = self._enrollment_instance

        def make(ports: dict[str, int]) -> MosquittoProcess:
            config = EnrollmentConfig(
                run_as_user=pwd.getpwuid(os.geteuid()).pw_name,
                log_path=run_dir / "enrollment.log",
                host=self._host,
                enrollment_port=ports["enrollment"],
                monitor_port=ports["monitor"],
                server_cert_path=run_dir / "server.pem",
                server_key_path=run_dir / "server.key",
                acl_path=run_dir / "enrollment.acl",
                monitor_acl_path=run_dir / "monitor.acl",
                password_path=run_dir / "monitor.passwd",
                bridge_port=self._ports["internal"],
                bridge_username=dynsec.DEFAULT_BRIDGE_USERNAME,
                bridge_password=self._bridge_password,
                bridge_request_clientids=self._bridge_ids["requests"],
                bridge_answer_clientids=self._bridge_ids["answers"],
            )
            config_path = run_dir / "enrollment.conf"
            write_atomic(config_path, render_enrollment_config(config).encode())
            return MosquittoProcess(
                config_path,
                listeners=[(_LOOPBACK, ports["monitor"]), (self._host, ports["enrollment"])],
                binary=binary,
                output_path=run_dir / "enrollment.out",
                log_path=config.log_path,
                on_restart=lambda: self._restarted(instance()),
            )

        wanted = {"enrollment": self._ports["enrollment"], "monitor": 0}
        self._enrollment_process, ports = await self._spawn(wanted, make)
        self._ports["enrollment"] = ports["enrollment"]
        self._monitor_port = ports["monitor"]

    async def _await_bridges(self) -> None:
        """Return once both bridges are connected to the main instance. The answers bridge
        subscribes as soon as the main instance accepts it, before any request can have
        crossed, so from here every request that crosses finds its answer's way back."""
        try:
            await asyncio.wait_for(self._bridges_ready.wait(), self._command_timeout)
        except TimeoutError:
            tail = ""
            with contextlib.suppress(OSError):
                lines = (self._run_dir / "enrollment.log").read_text(errors="replace")
                tail = "\n".join(lines.splitlines()[-10:])
            raise MosquittoError(
                MosquittoReason.START_FAILED,
                f"the enrollment bridges did not connect within {self._command_timeout} s"
                + (f":\n{tail}" if tail else ""),
            ) from None

    async def _reload(self, process: MosquittoProcess, instance: str) -> None:
        """SIGHUP to ``instance``'s ``process``, then wait for the broker's own "Reloading
        config." message (the admin link reads the main instance's, the monitor link the
        enrollment instance's). The broker logs it and then reloads certificates and CRL in
        the same turn of its single-threaded loop, so any connection opened after the message
        arrives is handled with the new files. The caller holds ``_reload_locks[instance]``
        since it wrote them: any notice that comes is then of this reload."""
        waiters = self._reload_waiters[instance]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        log_name = "mosquitto.log" if instance == "main" else "enrollment.log"
        rotate_if_large(self._run_dir / log_name, _LOG_LIMIT)  # reopened by the reload
        try:
            process.reload()
            await asyncio.wait_for(waiter, self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.RELOAD_UNCONFIRMED,
                f"no reload notice from the {instance} instance within "
                f"{self._command_timeout} s after SIGHUP",
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def _reloaded(self, instance: str, line: bytes) -> None:
        if line.rstrip().endswith(_RELOAD_NOTICE.encode()):
            for waiter in self._reload_waiters[instance]:
                if not waiter.done():
                    waiter.set_result(None)

    # -- the gateway's own connections ------------------------------------------------------

    async def _start_link(self, link: _Link) -> None:
        link.task = asyncio.create_task(self._keep_up(link), name=f"mosquitto-{link.name}")
        try:
            await asyncio.wait_for(link.ready.wait(), self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.ADMIN_UNAVAILABLE,
                f"{link.name} connection not ready in {self._command_timeout} s: "
                f"{link.last_error or 'no answer'}",
            ) from None

    async def _keep_up(self, link: _Link) -> None:
        backoff = 0.1
        while True:
            try:
                async with aiomqtt.Client(
                    link.host,
                    link.port(),
                    identifier=link.client_id,
                    username=link.username,
                    password=link.password,
                    tls_context=link.tls,
                    keepalive=30,
                    clean_session=True,
                    timeout=self._command_timeout,
                ) as client:
                    _nodelay(client)
                    for topic in link.required:
                        if not _granted(await client.subscribe(topic, qos=1)):
                            raise MosquittoError(
                                MosquittoReason.ADMIN_UNAVAILABLE,
                                f"{link.username} may not read {topic}",
                            )
                    for topic in link.optional:
                        await client.subscribe(topic, qos=0)
                    link.client = client
                    link.ready.set()
                    backoff = 0.1
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            link.on_message(str(message.topic), bytes(payload))
            except (aiomqtt.MqttError, MosquittoError) as exc:
                link.last_error = str(exc)
                log.debug("%s connection to mosquitto lost: %s", link.name, exc)
            finally:
                link.client = None
                link.ready.clear()
                if link.on_lost is not None:
                    link.on_lost()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _on_admin_message(self, topic: str, payload: bytes) -> None:
        if topic == dynsec.RESPONSE_TOPIC:
            try:
                response = dynsec.decode_response(payload)
            except MosquittoError as exc:
                log.warning("unreadable dynsec response: %s", exc)
                return
            future = self._pending.get(response.batch_id or "")
            if future is not None and not future.done():
                future.set_result(response)
        elif topic == LOG_NOTICE_TOPIC:
            line = payload.decode("utf-8", "replace")
            if self._follow_sessions:  # not one that was under way as they were left
                self._observe(self._main_instance(), line)
            if not self._external:
                self._watch_handshake(line)
        elif topic == LOG_ERROR_TOPIC:
            self._watch_handshake(payload.decode("utf-8", "replace"))
        elif topic == LOG_INFO_TOPIC:
            self._reloaded("main", payload)

    def _watch_handshake(self, line: str) -> None:
        refused = self._handshakes.feed(line)
        if refused is not None and refused.port in (None, self._ports["operational"]):
            self._refused(refused)

    def _refused(self, refused: HandshakeRefused) -> None:
        """Tell ``on_refused`` of a handshake the operational listener refused (the only TLS
        listener of the main instance)."""
        detail = refused.detail
        if refused.candidates > 1:
            detail += (
                f" ({refused.candidates} handshakes were under way: the address may be "
                "another of them)"
            )
        log.info("refused %s on %s: %s (%s)", refused.address, LISTENER_OPERATIONAL,
                 refused.reason, refused.detail)
        self.metrics[f"refused.{refused.reason.value}"] += 1
        if self._on_refused is None:
            return
        try:
            self._on_refused(
                RefusedConnection(
                    listener=LISTENER_OPERATIONAL,
                    remote=refused.address,
                    reason=refused.reason.value,
                    client_id=None,
                    cert_subject=None,  # Mosquitto logs nothing of the certificate
                    cert_issuer=None,
                    cert_fingerprint=None,
                    at=self._clock.now(),
                    detail=detail,
                )
            )
        except Exception:
            log.exception("on_refused callback failed")

    def _on_monitor_message(self, topic: str, payload: bytes) -> None:
        if topic == LOG_NOTICE_TOPIC:
            self._observe(self._enrollment_instance(), payload.decode("utf-8", "replace"))
        elif topic == LOG_INFO_TOPIC:
            self._reloaded("enrollment", payload)

    def _judge_takeover(self, previous: Session, current: Session) -> None:
        """A live client id on the main instance connected again: a clone when it is a device
        certificate on the operational listener, now from another host (see the module
        docstring)."""
        if current.username in (self._admin_username, self._internal_username):
            return  # our own kick of a session (``_take_over``)
        if current.port != self._ports["operational"] or current.username is None:
            return
        known = self._enforced.get(current.username)
        first, second = previous.address, current.address
        if (
            known is None
            or known.kind is not IdentityKind.DEVICE
            or known.state is IdentityState.REVOKED
            or previous.username != current.username
            or remote_host(first) == remote_host(second)
        ):
            return
        log.warning(
            "device %s live from %s connected again from %s: clone",
            current.username, first, second,
        )
        if self._on_clone is None:
            return
        principal = Principal("device", current.username, LISTENER_OPERATIONAL)
        try:
            self._on_clone(principal, first, second)
        except Exception:
            log.exception("on_clone callback failed")
        # The embedded broker refuses the second session; Mosquitto gave it the first one's
        # place. Cut it once the quarantine the gateway is applying is in force, so that its
        # reconnect, if any, finds the device quarantined (see ``_quarantine_in_force``).
        self._clones[current.username] = current
        if known.state is IdentityState.QUARANTINED:
            self._quarantine_in_force(current.username)  # no quarantine follows: it holds

    def _quarantine_in_force(self, identity: str) -> None:
        """Cut the session judged a clone of ``identity``, if it is still the live one."""
        clone = self._clones.pop(identity, None)
        if clone is not None:
            self._cut(identity, "clone", only=clone)

    def _revoked_session(self, session: Session) -> bool:
        """A certificate's session on the operational listener, of an identity revoked here."""
        if session.port != self._ports["operational"] or session.username is None:
            return False
        known = self._enforced.get(session.username)
        return known is not None and known.state is IdentityState.REVOKED

    def _cut(self, client_id: str, why: str, *, only: Session | None = None) -> None:
        """End ``client_id``'s session on the main instance, in the background: a take-over
        through the admin account (no dynsec command, so no rewrite of the plugin's file).
        ``only``: unless that is no longer the live session."""

        async def cut() -> None:
            if only is not None and self._tracker.sessions().get(client_id) != only:
                return
            try:
                await self._take_over(client_id, self._admin)
            except MosquittoError as exc:
                log.warning("could not cut the %s session of %s: %s", why, client_id, exc)

        task = asyncio.create_task(cut(), name=f"mosquitto-cut-{why}")
        self._cuts.add(task)
        task.add_done_callback(self._cuts.discard)

    def _admin_lost(self) -> None:
        self._sessions_whole = False  # notices sent meanwhile are missed
        self._fail_pending("the admin connection was lost")

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, why))

    async def _admin_client(self) -> aiomqtt.Client:
        link = self._admin
        if link.task is None:
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "start() the broker first")
        try:
            await asyncio.wait_for(link.ready.wait(), self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.ADMIN_UNAVAILABLE,
                f"no admin connection: {link.last_error or 'not connected'}",
            ) from None
        client = link.client
        if client is None:
            raise MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, "admin connection lost")
        return client

    async def _exchange(
        self, batch: tuple[dynsec.Command, ...]
    ) -> tuple[dynsec.CommandResult, ...]:
        """One message of commands and its answers in order (``GroupCommit``'s exchange)."""
        client = await self._admin_client()
        batch_id = secrets.token_hex(8)
        future: asyncio.Future[dynsec.Response] = asyncio.get_running_loop().create_future()
        self._pending[batch_id] = future
        try:
            try:
                await client.publish(
                    dynsec.CONTROL_TOPIC, dynsec.encode_batch(batch, batch_id), qos=1
                )
            except aiomqtt.MqttError as exc:
                raise MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, str(exc)) from None
            try:
                response = await asyncio.wait_for(future, self._command_timeout)
            except TimeoutError:
                raise MosquittoError(
                    MosquittoReason.NO_RESPONSE,
                    f"no answer to {len(batch)} command(s) within {self._command_timeout} s",
                ) from None
        finally:
            self._pending.pop(batch_id, None)
        return dynsec.order_results(batch, response)

    @property
    def commit(self) -> GroupCommit:
        """The group commit every dynsec change goes through (its counters: ``messages``,
        ``commands``)."""
        return self._commit

    async def execute(
        self, commands: Sequence[dynsec.Command], *, urgent: bool = False
    ) -> list[dynsec.CommandResult]:
        """Send dynsec commands (``gateway.mosquitto.dynsec`` builds them), in messages of at
        most ``batch_size`` shared with other callers' changes, and return their results;
        MosquittoError(COMMAND_FAILED) names each refused command."""
        results: list[dynsec.CommandResult] = []
        for part in dynsec.batches(commands, self._batch_size) if commands else ():
            results.extend(await self._commit.submit(part, urgent=urgent))
        return results

    async def _enforce(
        self, targets: list[dynsec.Enforcement], *, force: bool, urgent: bool, certain: bool
    ) -> int:
        """Enforce each target as a unit of its own (``GroupCommit`` puts many in one
        message); returns how many were sent. Every target is tried; then the first failure is
        raised (a refused command names every refusal)."""
        if not self._started:
            # most changes send nothing now (active devices): say so rather than pretend
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "start() the broker first")
        latest = {target.identity: target for target in targets}  # a later entry wins
        outcomes = await asyncio.gather(
            *(
                self._enforce_one(t, force=force, urgent=urgent, certain=certain)
                for t in latest.values()
            ),
            return_exceptions=True,
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        for error in errors:
            if not isinstance(error, MosquittoError):
                raise error
        if errors:
            refused = [e for e in errors if isinstance(e, MosquittoError)]
            unavailable = [e for e in refused if e.reason is not MosquittoReason.COMMAND_FAILED]
            if unavailable:
                raise unavailable[0]
            failures = tuple(f for e in refused for f in e.failures)
            raise MosquittoError(
                MosquittoReason.COMMAND_FAILED,
                "; ".join(f"{what}: {error}" for what, error in failures),
                failures=failures,
            )
        return sum(1 for sent in outcomes if sent is True)

    async def _enforce_one(
        self, target: dynsec.Enforcement, *, force: bool, urgent: bool, certain: bool
    ) -> bool:
        """One identity's change; changes of one identity never overlap (each decides what to
        send from what the previous one left), and an urgent one takes a queued change of the
        same identity along to the front. True if commands were sent."""
        identity = target.identity
        lane = self._lanes.setdefault(identity, _Lane())
        lane.users += 1
        if urgent:
            lane.urgent += 1
            self._commit.promote(identity)
        try:
            async with lane.lock:
                sent = force or self._enforced.get(identity) != target
                if sent:
                    await self._send_enforcement(
                        target, urgent=lambda: urgent or lane.urgent > 0, certain=certain
                    )
            if target.state is IdentityState.QUARANTINED:
                self._quarantine_in_force(identity)
            return sent
        finally:
            lane.users -= 1
            if urgent:
                lane.urgent -= 1
            if lane.users == 0:
                self._lanes.pop(identity, None)

    async def _send_enforcement(
        self, target: dynsec.Enforcement, *, urgent: Callable[[], bool], certain: bool
    ) -> None:
        identity = target.identity
        known = self._enforced.get(identity)
        patterns = self._device_patterns
        provisioned = (
            known is not None
            and identity in self._provisioned
            and known.kind is target.kind
            # without patterns a revoked identity's objects are deleted
            and (patterns or known.state is not IdentityState.REVOKED)
        )

        def commands_for(provisioned: bool) -> list[dynsec.Command]:
            return dynsec.enforce_commands(
                target,
                provisioned=provisioned,
                device_patterns=patterns,
                # a broker we started has no other writer: what we know is what holds
                # (see ``sync`` for what else is certain)
                certain=certain,
            )

        commands = commands_for(provisioned)
        if not commands:  # an active device with no dynsec object: the patterns grant it
            # On an external broker that is an assumption (a certified admission, see
            # ``sync``), not knowledge: a later sync of this identity (a new leader's repair
            # of what the last one left undone) must still send its reset.
            if not self._external:
                self._enforced[identity] = target
            return
        try:
            results = await self._commit.submit(commands, urgent=urgent(), key=identity)
        except MosquittoError as exc:
            if exc.reason is not MosquittoReason.COMMAND_FAILED or not provisioned:
                raise
            # Something changed the plugin's objects behind our back (a role we thought we
            # had is gone): forget what we knew and send the full, idempotent form once.
            self._enforced.pop(identity, None)
            self._provisioned.discard(identity)
            provisioned = False
            commands = commands_for(False)
            results = await self._commit.submit(commands, urgent=urgent(), key=identity)
        if not provisioned:
            more = dynsec.follow_up(target, commands, results, device_patterns=patterns)
            if more:
                await self._commit.submit(more, urgent=urgent(), key=identity)
        self._enforced[identity] = target
        if provisioned or dynsec.has_objects(target, device_patterns=patterns):
            self._provisioned.add(identity)
        else:
            self._provisioned.discard(identity)

    async def _take_over(self, client_id: str, link: _Link) -> None:
        """Connect with the same client id through ``link``'s account: Mosquitto drops the
        older connection at once. Used for clients without a dynsec account (enrollees). A
        clean session, so a persistent session of that id is discarded too."""
        if link.task is None:
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "start() the broker first")
        try:
            async with aiomqtt.Client(
                link.host,
                link.port(),
                identifier=client_id,
                username=link.username,
                password=link.password,
                tls_context=link.tls,
                clean_session=True,
                timeout=self._command_timeout,
            ):
                pass
        except aiomqtt.MqttError as exc:
            raise MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, f"kick failed: {exc}") from None
