"""``MosquittoBroker``: Mosquitto 2 with dynamic security as the gateway's ``BrokerControl``.

Two ways to run it:

- managed (default): the gateway writes the configuration, certificates, CRL and the dynsec
  file into ``run_dir`` (mode 0700) and runs ``mosquitto`` as a supervised child process on
  the given ports (0 = pick a free one). Every start rebuilds the dynsec file from the
  registry (``identities``): the registry is the truth, and one file write is far cheaper than
  one command per identity.
- external (``external=True``): the operator runs Mosquitto and gives the gateway an admin
  account of its dynamic-security plugin. The gateway creates its own objects over
  ``$CONTROL`` and keeps them in step; it does not start, stop or signal the broker. The CRL
  is then the operator's to load: ``publish_crl`` writes ``crl_path`` if given (point the
  operational listener's ``crlfile`` at it), and the operator must reload Mosquitto (SIGHUP,
  ``systemctl reload mosquitto``) for it to take effect. ``connected()`` and clone detection
  work only if the operator's configuration has ``log_dest topic`` (see ``sessions``).

The gateway talks to the plugin through one admin MQTT connection on the internal listener
and waits for the answer to each batch of commands; a refused command raises
``MosquittoError(COMMAND_FAILED)`` with the plugin's error text.

Clones: one device identity live from two hosts at once means a copied key and certificate.
The embedded broker refuses the second connection. Mosquitto cannot be asked first: a second
connection with a live client id (on the operational listener, the certificate's CN) takes the
session over and the first connection is closed, before the gateway hears of it. The broker's
"connected" notice for a client id that is live already shows the takeover (see ``sessions``);
when the two connections come from different hosts, ``on_clone(principal, first_address,
second_address)`` runs, and the gateway quarantines the identity right after (one
``modifyRole``: the clone stays connected but can only publish under its quarantine topics). So
on Mosquitto the clone holds the session, with the device's rights for the few milliseconds
until the quarantine is in force, and the first session is gone (when it reconnects, it takes
the session back, quarantined too). From the same host it is the device itself reconnecting
over a stale session: no clone, as on the embedded broker. The check relies on the notices, so a
session whose end was missed while the admin connection was down could make a reconnect from
a new address look like a clone.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiomqtt

from gateway.acl import (
    LISTENER_ENROLLMENT,
    LISTENER_INTERNAL,
    LISTENER_OPERATIONAL,
    Principal,
    PrincipalKind,
)
from gateway.broker_control import IdentityLike
from gateway.mosquitto import dynsec
from gateway.mosquitto.config import MosquittoConfig, render_config
from gateway.mosquitto.crl import check_crl
from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from gateway.mosquitto.files import rotate_if_large, write_atomic
from gateway.mosquitto.process import (
    MosquittoProcess,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
)
from gateway.mosquitto.sessions import SessionTracker, Takeover
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
_RELOAD_NOTICE = "Reloading config."
_PORT_RETRIES = 3
_LOG_LIMIT = 16 * 1024 * 1024


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


def _address_host(address: str) -> str:
    """The host of Mosquitto's "host:port" (an IPv6 host has colons of its own)."""
    return address.rsplit(":", 1)[0]


_PRINCIPAL_KIND: dict[IdentityKind, PrincipalKind] = {
    IdentityKind.DEVICE: "device",
    IdentityKind.OPERATOR: "operator",
    IdentityKind.SERVICE: "service",
}


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
        command_timeout: float = 10.0,
        batch_size: int = 200,
    ) -> None:
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
        else:
            if tls is None or crl_pem is None:
                raise ValueError("a managed broker needs its TLS material and a CRL")
            for name in ("server_cert_pem", "server_key_pem", "client_ca_pem"):
                if not isinstance(getattr(tls, name, None), bytes):
                    raise TypeError(f"tls.{name} must be bytes")
            if not isinstance(crl_pem, bytes):
                raise TypeError("crl_pem must be bytes")
        if not isinstance(batch_size, int) or batch_size < 3:
            raise ValueError("batch_size must be an int of at least 3 (one identity's commands)")
        if command_timeout <= 0:
            raise ValueError("command_timeout must be positive")
        if on_clone is not None and not callable(on_clone):
            raise TypeError("on_clone must be callable")
        self._admin_username = dynsec.check_reserved_username(admin_username)
        self._internal_username = dynsec.check_reserved_username(internal_username)
        if self._admin_username == self._internal_username:
            raise ValueError("admin and internal usernames must differ")
        self._run_dir = run_dir
        self._host = listeners.host
        self._ports = ports
        self._tls = tls
        self._crl_pem = crl_pem
        self._external = external
        self._admin_password = admin_password or secrets.token_urlsafe(32)
        self._admin_host = admin_host
        self._admin_tls = admin_tls
        self._internal_password = internal_password or secrets.token_urlsafe(32)
        self._identities = identities
        self._crl_path = crl_path if external else run_dir / "crl.pem"
        self._binary = mosquitto_binary
        self._plugin_path = plugin_path
        self._clock: Clock = clock or SystemClock()
        self._command_timeout = command_timeout
        self._batch_size = batch_size
        self._on_clone = on_clone

        self._process: MosquittoProcess | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self._client: aiomqtt.Client | None = None
        self._ready = asyncio.Event()
        self._last_admin_error: str = ""
        self._pending: dict[str, asyncio.Future[dynsec.Response]] = {}
        self._reload_waiters: list[asyncio.Future[None]] = []
        self._tracker = SessionTracker()
        self._enforced: dict[str, dynsec.Enforcement] = {}
        self._admin_client_id = f"fleetgate-control-{secrets.token_hex(4)}"
        self._started = False

    # -- BrokerControl --------------------------------------------------------------------

    @property
    def ports(self) -> dict[str, int]:
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
        return self._process

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("already started")
        self._started = True
        try:
            if self._external:
                await self._start_admin()
                await self.execute(
                    dynsec.baseline_commands(self._internal_username, self._internal_password)
                )
                if self._identities is not None:
                    await self.sync(self._identities())
            else:
                await self._start_managed()
                await self._start_admin()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        task, self._admin_task = self._admin_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending("the broker is stopping")
        if self._process is not None:
            await self._process.stop()
        self._tracker.clear()
        self._started = False

    async def apply(
        self, identity_id: str, state: IdentityState, *, kind: IdentityKind = IdentityKind.DEVICE
    ) -> None:
        """Enforce one identity's state now (live sessions included; see ``dynsec``)."""
        target = dynsec.Enforcement(identity_id, kind, IdentityState(state))
        await self._enforce([target], force=True)

    async def sync(self, identities: Iterable[IdentityLike]) -> int:
        """Bring every listed identity to its state, sending only what changed since the last
        apply/sync; returns how many identities changed. Safe to call periodically with the
        whole registry."""
        targets = [
            dynsec.Enforcement(item.id, IdentityKind(item.kind), IdentityState(item.state))
            for item in identities
        ]
        return await self._enforce(targets, force=False)

    async def kick(self, client_id: str) -> bool:
        """Cut ``client_id``'s live session; True if it was connected as far as the broker's
        notices tell (see ``sessions``). A certificate identity keeps its rights and may
        reconnect; use ``apply(..., REVOKED)`` to keep it out."""
        if not isinstance(client_id, str) or not client_id or "\x00" in client_id:
            raise ValueError("client_id must be a non-empty str without NUL")
        was_connected = client_id in self._tracker
        known = self._enforced.get(client_id)
        if known is not None and known.state is not IdentityState.REVOKED:
            try:
                await self.execute(dynsec.kick_commands(client_id))
                return was_connected
            except MosquittoError as exc:
                if exc.reason is not MosquittoReason.COMMAND_FAILED:
                    raise
        await self._take_over(client_id)
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
        write_atomic(self._crl_path, crl_pem)
        self._crl_pem = crl_pem
        await self._reload(process)

    def connected(self) -> dict[str, Principal]:
        """Client id -> who, from the broker's connection notices (approximate: see
        ``sessions``)."""
        listener_of = {
            self._ports["internal"]: LISTENER_INTERNAL,
            self._ports["operational"]: LISTENER_OPERATIONAL,
            self._ports["enrollment"]: LISTENER_ENROLLMENT,
        }
        own = {self._admin_username, self._internal_username}
        result: dict[str, Principal] = {}
        for client_id, session in self._tracker.sessions().items():
            listener = listener_of.get(session.port) if session.port is not None else None
            if listener is None or not is_identity_name(client_id):
                continue
            if session.username in own:
                result[client_id] = Principal("internal", client_id, listener)
            elif listener == LISTENER_OPERATIONAL and session.username is not None:
                known = self._enforced.get(session.username)
                kind: PrincipalKind = _PRINCIPAL_KIND[known.kind] if known else "device"
                if is_identity_name(session.username):
                    result[client_id] = Principal(kind, session.username, listener)
            elif session.username is None:
                # anonymous: an enrollee, or someone using the enrollee rights on the internal
                # listener (allow_anonymous is global); the listener tells which
                result[client_id] = Principal("enrollee", client_id, listener)
        return result

    # -- managed process --------------------------------------------------------------------

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
            identities=targets,
        )
        write_atomic(run_dir / "dynsec.json", json.dumps(initial, indent=1).encode())
        self._enforced = {t.identity: t for t in targets}
        for name in ("mosquitto.log", "mosquitto.out"):
            rotate_if_large(run_dir / name, _LOG_LIMIT)

    async def _start_managed(self) -> None:
        binary = find_mosquitto(self._binary)
        plugin = find_dynsec_plugin(self._plugin_path)
        self._write_run_dir()
        run_dir = self._run_dir.absolute()
        assert self._crl_path is not None
        wanted = dict(self._ports)
        for attempt in range(_PORT_RETRIES):
            ports = {
                name: port or free_port("127.0.0.1" if name == "internal" else self._host)
                for name, port in wanted.items()
            }
            config = MosquittoConfig(
                run_as_user=pwd.getpwuid(os.geteuid()).pw_name,
                plugin_path=plugin,
                dynsec_path=run_dir / "dynsec.json",
                log_path=run_dir / "mosquitto.log",
                host=self._host,
                internal_port=ports["internal"],
                operational_port=ports["operational"],
                enrollment_port=ports["enrollment"],
                server_cert_path=run_dir / "server.pem",
                server_key_path=run_dir / "server.key",
                client_ca_path=run_dir / "client-ca.pem",
                crl_path=self._crl_path.absolute(),
            )
            config_path = run_dir / "mosquitto.conf"
            write_atomic(config_path, render_config(config).encode())
            process = MosquittoProcess(
                config_path,
                listeners=[
                    ("127.0.0.1", ports["internal"]),
                    (self._host, ports["operational"]),
                    (self._host, ports["enrollment"]),
                ],
                binary=binary,
                output_path=run_dir / "mosquitto.out",
                log_path=config.log_path,
                on_restart=self._tracker.clear,
            )
            try:
                await process.start()
            except MosquittoError as exc:
                picked = any(port == 0 for port in wanted.values())
                if picked and "in use" in exc.detail and attempt + 1 < _PORT_RETRIES:
                    log.info("a picked port was taken meanwhile; picking again")
                    continue
                raise
            self._process = process
            self._ports = ports
            return

    async def _reload(self, process: MosquittoProcess) -> None:
        """SIGHUP, then wait for the broker's own "Reloading config." message. The broker logs
        it and then reloads certificates and CRL in the same turn of its single-threaded loop,
        so any connection opened after the message arrives is handled with the new CRL."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reload_waiters.append(waiter)
        rotate_if_large(self._run_dir / "mosquitto.log", _LOG_LIMIT)  # reopened by the reload
        try:
            process.reload()
            await asyncio.wait_for(waiter, self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.RELOAD_UNCONFIRMED,
                f"no reload notice within {self._command_timeout} s after SIGHUP",
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._reload_waiters.remove(waiter)

    # -- admin connection -------------------------------------------------------------------

    async def _start_admin(self) -> None:
        self._admin_task = asyncio.create_task(self._admin_loop(), name="mosquitto-admin")
        try:
            await asyncio.wait_for(self._ready.wait(), self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.ADMIN_UNAVAILABLE,
                f"admin connection not ready in {self._command_timeout} s: "
                f"{self._last_admin_error or 'no answer'}",
            ) from None

    async def _admin_loop(self) -> None:
        backoff = 0.1
        while True:
            try:
                async with aiomqtt.Client(
                    self._admin_host,
                    self._ports["internal"],
                    identifier=self._admin_client_id,
                    username=self._admin_username,
                    password=self._admin_password,
                    tls_context=self._admin_tls,
                    keepalive=30,
                    clean_session=True,
                    timeout=self._command_timeout,
                ) as client:
                    _nodelay(client)
                    if not _granted(await client.subscribe(dynsec.RESPONSE_TOPIC, qos=1)):
                        raise MosquittoError(
                            MosquittoReason.ADMIN_UNAVAILABLE,
                            f"{self._admin_username} may not read {dynsec.RESPONSE_TOPIC}",
                        )
                    # connection notices feed connected(); absent on an external broker
                    # without `log_dest topic`, which only makes connected() empty
                    await client.subscribe(LOG_NOTICE_TOPIC, qos=0)
                    await client.subscribe(LOG_INFO_TOPIC, qos=0)
                    self._client = client
                    self._ready.set()
                    backoff = 0.1
                    async for message in client.messages:
                        payload = message.payload
                        if isinstance(payload, bytes | bytearray):
                            self._on_message(str(message.topic), bytes(payload))
            except (aiomqtt.MqttError, MosquittoError) as exc:
                self._last_admin_error = str(exc)
                log.debug("admin connection to mosquitto lost: %s", exc)
            finally:
                self._client = None
                self._ready.clear()
                self._fail_pending("the admin connection was lost")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _on_message(self, topic: str, payload: bytes) -> None:
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
            takeover = self._tracker.feed(payload.decode("utf-8", "replace"))
            if takeover is not None:
                self._judge_takeover(takeover)
        elif topic == LOG_INFO_TOPIC and payload.rstrip().endswith(_RELOAD_NOTICE.encode()):
            for waiter in self._reload_waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _judge_takeover(self, takeover: Takeover) -> None:
        """A live client id connected again: a clone when it is a device certificate on the
        operational listener, now from another host (see the module docstring)."""
        previous, current = takeover.previous, takeover.current
        if current.username in (self._admin_username, self._internal_username):
            return  # our own kick of a session (``_take_over``)
        operational = self._ports["operational"]
        if current.port != operational or current.username is None:
            if previous.port == operational and previous.username is not None:
                # Mosquitto shares one client-id namespace across listeners: an anonymous
                # client on the enrollment listener can close a device's operational session
                # by naming its id (MQTT takeover; 2.0 offers no per-listener id rule).
                log.warning(
                    "session of %s (%s) taken over by %s on port %s",
                    previous.client_id, previous.address, current.address, current.port,
                )
            return
        known = self._enforced.get(current.username)
        if (
            known is None
            or known.kind is not IdentityKind.DEVICE
            or known.state is IdentityState.REVOKED
            or previous.username != current.username
            or _address_host(previous.address) == _address_host(current.address)
        ):
            return
        log.warning(
            "device %s live from %s connected again from %s: clone",
            current.username, previous.address, current.address,
        )
        if self._on_clone is None:
            return
        principal = Principal("device", current.username, LISTENER_OPERATIONAL)
        try:
            self._on_clone(principal, previous.address, current.address)
        except Exception:
            log.exception("on_clone callback failed")

    def _fail_pending(self, why: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, why))

    async def _admin(self) -> aiomqtt.Client:
        if self._admin_task is None:
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "start() the broker first")
        try:
            await asyncio.wait_for(self._ready.wait(), self._command_timeout)
        except TimeoutError:
            raise MosquittoError(
                MosquittoReason.ADMIN_UNAVAILABLE,
                f"no admin connection: {self._last_admin_error or 'not connected'}",
            ) from None
        client = self._client
        if client is None:
            raise MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, "admin connection lost")
        return client

    async def _send(self, batch: tuple[dynsec.Command, ...]) -> tuple[dynsec.CommandResult, ...]:
        client = await self._admin()
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
        return dynsec.check_results(batch, response)

    async def execute(self, commands: Sequence[dynsec.Command]) -> list[dynsec.CommandResult]:
        """Send dynsec commands (``gateway.mosquitto.dynsec`` builds them) in batches and
        return their results; MosquittoError(COMMAND_FAILED) names each refused command."""
        results: list[dynsec.CommandResult] = []
        for batch in dynsec.batches(commands, self._batch_size):
            results.extend(await self._send(batch))
        return results

    async def _enforce(self, targets: list[dynsec.Enforcement], *, force: bool) -> int:
        """Send each changed target's commands, several identities per message but never one
        identity split across two, and remember what holds after each answered message."""
        changed = [t for t in targets if force or self._enforced.get(t.identity) != t]
        batch: list[dynsec.Command] = []
        members: list[dynsec.Enforcement] = []
        for target in changed:
            known = self._enforced.get(target.identity)
            provisioned = (
                known is not None
                and known.state is not IdentityState.REVOKED
                and known.kind is target.kind
            )
            commands = dynsec.enforce_commands(target, provisioned=provisioned)
            if batch and len(batch) + len(commands) > self._batch_size:
                await self._flush(batch, members)
                batch, members = [], []
            batch.extend(commands)
            members.append(target)
        if batch:
            await self._flush(batch, members)
        return len(changed)

    async def _flush(
        self, commands: list[dynsec.Command], members: list[dynsec.Enforcement]
    ) -> None:
        try:
            await self._send(tuple(commands))
        except MosquittoError as exc:
            if exc.reason is not MosquittoReason.COMMAND_FAILED:
                raise
            # Something changed the plugin's objects behind our back (a role we thought we
            # had is gone): forget what we knew and send the full, idempotent form once.
            for target in members:
                self._enforced.pop(target.identity, None)
            retry = [
                command
                for target in members
                for command in dynsec.enforce_commands(target, provisioned=False)
            ]
            await self.execute(retry)
        for target in members:
            self._enforced[target.identity] = target

    async def _take_over(self, client_id: str) -> None:
        """Connect with the same client id: Mosquitto drops the older connection at once. Used
        for clients without a dynsec account (enrollees). A clean session, so a persistent
        session of that id is discarded too."""
        try:
            async with aiomqtt.Client(
                self._admin_host,
                self._ports["internal"],
                identifier=client_id,
                username=self._admin_username,
                password=self._admin_password,
                tls_context=self._admin_tls,
                clean_session=True,
                timeout=self._command_timeout,
            ):
                pass
        except aiomqtt.MqttError as exc:
            raise MosquittoError(MosquittoReason.ADMIN_UNAVAILABLE, f"kick failed: {exc}") from None
