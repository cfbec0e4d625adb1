"""The admin API from the operator's side: a Qt-free client for the console and for scripts.

paho-mqtt runs its network loop in a background thread and reconnects by itself with backoff.
``request`` blocks the calling thread until the reply (never call it from a UI thread);
``request_async`` returns at once and calls back from the client's thread. ``on_event`` and
``on_connection`` are also called from that thread: a Qt console hands them to its UI thread
with signals.

Requests wait for a live, subscribed connection before they are sent, so a request made while
reconnecting goes out once the connection is back (or times out). A request already sent when
the connection drops fails with ``connection_lost``: its reply could be lost with the session,
and whether a change it asked for was made is then for the operator to look up, not for the
client to guess by sending it again.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.admin.profile import Profile, ProfileError, ProfileProblem, load_profile
from gateway.admin.wire import EVENTS_TOPIC, encode_request, request_topic, response_topic
from pki.errors import PkiError
from pki.keys import decrypt_private_key

__all__ = [
    "AdminClient",
    "AdminError",
    "ClientReason",
    "Profile",
    "ProfileError",
    "load_profile",
]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
KEEPALIVE_SECONDS = 30
MIN_BACKOFF_SECONDS = 1
MAX_BACKOFF_SECONDS = 30
_TICK_SECONDS = 0.05


class ClientReason:
    """Reason codes the client itself raises (the gateway's are in ``wire.AdminReason``)."""

    TIMEOUT = "timeout"
    CONNECTION_LOST = "connection_lost"
    STOPPED = "stopped"
    BAD_REPLY = "bad_reply"


class AdminError(Exception):
    """A request that failed, or a profile that cannot be used: ``reason`` is a stable code
    (the gateway's, such as ``forbidden``, or the client's, such as ``timeout``)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


Callback = Callable[[dict[str, Any] | None, AdminError | None], None]


@dataclass
class _Pending:
    payload: bytes
    callback: Callback | None
    deadline: float  # time.monotonic()
    sent: bool = False


def tls_context(profile: Profile, passphrase: bytes) -> ssl.SSLContext:
    """Mutual TLS from the profile: verify the broker against the profile's CA, present the
    operator's certificate. The key is handed to OpenSSL still encrypted; only the public parts
    and the encrypted key touch a (private, temporary) file, because ``load_cert_chain`` reads
    files only."""
    try:
        decrypt_private_key(profile.encrypted_key_pem, passphrase)  # a clear error first
    except PkiError as exc:
        raise AdminError(str(exc.reason), exc.detail) from None
    except (TypeError, ValueError) as exc:
        raise AdminError("wrong_passphrase", str(exc)) from None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=profile.ca_pem.decode())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="fleetgate-console-") as folder:
        cert_path = Path(folder) / "certificate.pem"
        key_path = Path(folder) / "key.pem"
        cert_path.write_bytes(profile.certificate_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(profile.encrypted_key_pem)
        try:
            ctx.load_cert_chain(cert_path, key_path, password=bytes(passphrase))
        except ssl.SSLError as exc:
            raise AdminError(
                ProfileProblem.INVALID_FIELD.value,
                f"certificate and key do not go together: {exc.reason or exc}",
            ) from None
    return ctx


class AdminClient:
    def __init__(
        self,
        profile: Profile,
        passphrase: bytes,
        *,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        on_connection: Callable[[str], None] | None = None,
    ) -> None:
        """Raises AdminError (``wrong_passphrase``, ``profile_invalid_field``...) at once, so a
        login dialog can say what is wrong before anything touches the network."""
        if not isinstance(profile, Profile):
            raise TypeError(f"profile must be a Profile, not {type(profile).__name__}")
        if not isinstance(passphrase, bytes | bytearray):
            raise TypeError("passphrase must be bytes")
        self.profile = profile
        self._on_event = on_event
        self._on_connection = on_connection
        self._tls = tls_context(profile, bytes(passphrase))
        self._resp_topic = response_topic(profile.name)
        self._req_topic = request_topic(profile.name)
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._ready = False
        self._stopping = threading.Event()
        self._subscribe_mid: int | None = None
        self._watchdog: threading.Thread | None = None
        self._mqtt = self._make_client()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.profile.name,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.tls_set_context(self._tls)
        client.reconnect_delay_set(MIN_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS)
        client.on_connect = self._connected
        client.on_connect_fail = self._connect_failed
        client.on_disconnect = self._disconnected
        client.on_subscribe = self._subscribed
        client.on_message = self._message
        return client

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready

    def start(self) -> None:
        """Connect in the background; reconnects by itself until ``stop()``."""
        self._tell_connection("connecting")
        self._watchdog = threading.Thread(
            target=self._expire_loop, name="admin-client-timeouts", daemon=True
        )
        self._watchdog.start()
        self._mqtt.connect_async(self.profile.host, self.profile.port, KEEPALIVE_SECONDS)
        self._mqtt.loop_start()

    def stop(self) -> None:
        """Disconnect; requests still waiting fail with ``stopped``."""
        self._stopping.set()
        with contextlib.suppress(Exception):
            self._mqtt.disconnect()
        self._mqtt.loop_stop()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2)
        with self._lock:
            waiting, self._pending = list(self._pending.values()), {}
            self._ready = False
        for pending in waiting:
            self._finish(pending, None, AdminError(ClientReason.STOPPED, "client stopped"))

    # -- requests ------------------------------------------------------------------------------

    def request(
        self, op: str, args: Mapping[str, Any] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        """Send one request and wait for its result; raises AdminError. Blocks: never call it
        from a UI thread."""
        done = threading.Event()
        outcome: list[tuple[dict[str, Any] | None, AdminError | None]] = []

        def callback(result: dict[str, Any] | None, error: AdminError | None) -> None:
            outcome.append((result, error))
            done.set()

        self.request_async(op, args, callback, timeout=timeout)
        # The watchdog answers at the deadline; the margin only guards against a stuck one.
        if not done.wait(timeout + 5 * _TICK_SECONDS + 1.0):
            raise AdminError(ClientReason.TIMEOUT, f"no reply to {op} within {timeout} s")
        result, error = outcome[0]
        if error is not None:
            raise error
        assert result is not None
        return result

    def request_async(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        callback: Callback | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Send one request; ``callback(result, None)`` or ``callback(None, AdminError)``
        follows from the client's thread. Returns at once."""
        if self._stopping.is_set():
            raise AdminError(ClientReason.STOPPED, "client stopped")
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        payload = encode_request(request_id, op, args)
        pending = _Pending(payload, callback, time.monotonic() + timeout)
        with self._lock:
            self._pending[request_id] = pending
            send = self._ready
            if send:
                pending.sent = True
        if send:
            self._mqtt.publish(self._req_topic, payload, qos=1)

    # -- paho callbacks (paho's thread) --------------------------------------------------------

    def _connected(
        self, client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object
    ) -> None:
        if reason.is_failure:
            self._tell_connection(f"disconnected: {reason}")
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # Request and reply are small: without this each waits on delayed ACKs.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _, mid = client.subscribe([(self._resp_topic, 1), (EVENTS_TOPIC, 0)])
        self._subscribe_mid = mid

    def _subscribed(
        self, client: mqtt.Client, userdata: object, mid: int, codes: list[Any], props: object
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(code.is_failure for code in codes):
            # The broker refused a subscription: replies would never arrive.
            self._tell_connection("disconnected: subscription refused")
            client.disconnect()
            return
        with self._lock:
            self._ready = True
            unsent = [p for p in self._pending.values() if not p.sent]
            for pending in unsent:
                pending.sent = True
        for pending in unsent:
            client.publish(self._req_topic, pending.payload, qos=1)
        self._tell_connection("connected")

    def _connect_failed(self, client: mqtt.Client, userdata: object) -> None:
        self._tell_connection("disconnected: could not connect")

    def _disconnected(
        self, client: mqtt.Client, userdata: object, flags: object, reason: Any, props: object
    ) -> None:
        with self._lock:
            self._ready = False
            lost = {k: p for k, p in self._pending.items() if p.sent}
            for key in lost:
                del self._pending[key]
        for pending in lost.values():
            self._finish(
                pending,
                None,
                AdminError(ClientReason.CONNECTION_LOST, "the connection dropped before the reply"),
            )
        if not self._stopping.is_set():
            self._tell_connection(f"disconnected: {reason}")

    def _message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            log.warning("unreadable message on %s", message.topic)
            return
        if not isinstance(body, dict):
            return
        if message.topic == EVENTS_TOPIC:
            if self._on_event is not None:
                self._call(self._on_event, body)
            return
        if message.topic == self._resp_topic:
            self._reply(body)

    def _reply(self, body: dict[str, Any]) -> None:
        request_id = body.get("id")
        with self._lock:
            pending = self._pending.pop(request_id, None) if isinstance(request_id, str) else None
        if pending is None:
            return  # a late reply to a request that timed out, or someone else's
        if body.get("ok") is True and isinstance(body.get("result"), dict):
            self._finish(pending, body["result"], None)
            return
        error = body.get("error")
        if body.get("ok") is False and isinstance(error, dict):
            reason, detail = error.get("reason"), error.get("detail")
            self._finish(pending, None, AdminError(str(reason), str(detail or "")))
            return
        self._finish(pending, None, AdminError(ClientReason.BAD_REPLY, "unreadable reply"))

    # -- helpers -------------------------------------------------------------------------------

    def _expire_loop(self) -> None:
        while not self._stopping.wait(_TICK_SECONDS):
            now = time.monotonic()
            with self._lock:
                expired = [k for k, p in self._pending.items() if p.deadline <= now]
                late = [self._pending.pop(k) for k in expired]
            for pending in late:
                self._finish(
                    pending, None, AdminError(ClientReason.TIMEOUT, "no reply from the gateway")
                )

    def _finish(
        self, pending: _Pending, result: dict[str, Any] | None, error: AdminError | None
    ) -> None:
        if pending.callback is not None:
            self._call(pending.callback, result, error)

    def _tell_connection(self, status: str) -> None:
        if self._on_connection is not None:
            self._call(self._on_connection, status)

    @staticmethod
    def _call(function: Callable[..., None], *args: Any) -> None:
        # An exception escaping into paho would end its network thread.
        try:
            function(*args)
        except Exception:
            log.exception("admin client callback failed")


def open_profile(path: Path, passphrase: bytes, **callbacks: Any) -> AdminClient:
    """``load_profile`` then ``AdminClient``; ProfileError and AdminError as they say."""
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        raise AdminError(str(exc.reason), exc.detail) from None
    return AdminClient(profile, passphrase, **callbacks)
