"""One simulated sensor: the device-side protocol machine driven over real MQTT and TLS.

The sensor owns two kinds of connection, as a real device does: the enrollment listener
(server-authenticated TLS, client id = its serial number) until it holds a certificate, then
the operational listener (mutual TLS with that certificate) where it publishes telemetry and
renews. `gateway.protocol.device.DeviceClient` makes every protocol decision; this module only
moves bytes and keeps time.

What happens to a sensor is counted in its ``DeviceOutcome`` and, for drivers that need it as it
happens (the benchmarks, the hostile modes), told to an ``on_event`` callback as
``SensorEvent``\\ s stamped with ``time.monotonic()`` (one clock for every process of a machine,
so a benchmark can compare a stamp taken here with one taken in the gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from enum import StrEnum

import aiomqtt

from gateway.protocol import topics
from gateway.protocol.device import (
    AwaitingApproval,
    DeviceClient,
    DeviceState,
    Enrolled,
    Event,
    Rejected,
    Send,
)
from gateway.protocol.messages import Firmware
from gateway.protocol.reasons import ReasonCode
from gateway.protocol.topics import Channel
from pki.clock import Clock, SystemClock
from pki.factory import BirthCredential
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION
from simulators.probe import admission
from simulators.telemetry import SensorModel
from simulators.tls import NODELAY, mutual_context, shared_server_auth_context


@dataclass(frozen=True)
class SensorOptions:
    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: bytes
    cert_lifetime: int | None = None
    telemetry_interval: float = 5.0  # 0: no telemetry (an idle session, as in the benchmarks)
    seed: int = 0
    firmware: Firmware = field(
        default_factory=lambda: Firmware(version=FIRMWARE_VERSION, digest=FIRMWARE_DIGEST)
    )
    response_timeout: float = 10.0
    max_backoff: float = 10.0
    min_backoff: float = 0.5
    # Present a renewed certificate at once (a new operational session) instead of keeping
    # the session opened with the previous one until it drops.
    reconnect_after_renewal: bool = False
    bind_address: str = ""  # source address of every connection ("" = the system's choice)
    keepalive: int = 60
    # After a cut, ask the broker with a bare CONNECT whether it would admit the device before
    # reconnecting for real: a client library reports a refused certificate only at its
    # timeout (see ``simulators.probe``), and a benchmark wants the moment of refusal.
    probe_reconnects: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ca_pem, bytes) or b"-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ValueError("ca_pem must be PEM certificates (bytes)")
        for name in ("enrollment_port", "operational_port"):
            port = getattr(self, name)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"{name} must be a TCP port, not {port!r}")
        if self.telemetry_interval < 0:
            raise ValueError("telemetry_interval must be >= 0 (0: no telemetry)")
        if self.response_timeout <= 0:
            raise ValueError("response_timeout must be positive")
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError("backoff must satisfy 0 < min_backoff <= max_backoff")
        if self.keepalive < 1:
            raise ValueError("keepalive must be at least 1 s")


@dataclass
class DeviceOutcome:
    enrolled: int = 0  # 1 once the sensor held a certificate
    pending: int = 0  # 1 while it waits for an operator
    failed: int = 0  # 1 when the gateway told it to give up
    renewed: int = 0
    reattested: int = 0
    telemetry: int = 0
    connection_errors: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    cut: int = 0  # admitted sessions the broker closed
    refused: int = 0  # connections the broker refused (TLS, CONNACK, or no subscription)
    expired: int = 0  # certificates that expired before a renewal replaced them
    # time.monotonic() stamps of the first enrollment: first connect, certificate, operational
    started_at: float | None = None
    enrolled_at: float | None = None
    operational_at: float | None = None
    renewal_seconds: list[float] = field(default_factory=list)


class SensorEventKind(StrEnum):
    CONNECTED = "connected"  # detail: channel
    CUT = "cut"  # an admitted session was closed by the other side; detail: channel
    REFUSED = "refused"  # a connection attempt was refused; detail: channel and why
    ENROLLED = "enrolled"  # a certificate in hand (first or re-attested)
    OPERATIONAL = "operational"  # the first operational session after an enrollment
    RENEWED = "renewed"  # detail: seconds from the renew request to the new certificate
    EXPIRED = "expired"  # the certificate expired before it was renewed
    REJECTED = "rejected"  # detail: reason code
    FAILED = "failed"  # the gateway told the sensor to give up; detail: reason code


@dataclass(frozen=True)
class SensorEvent:
    kind: SensorEventKind
    device_id: str
    at: float  # time.monotonic()
    detail: str = ""


SensorListener = Callable[[SensorEvent], None]


class SessionRefused(aiomqtt.MqttError):
    """Connected, but the broker granted none of the subscriptions the session needs: as good
    as a refused connection (Mosquitto admits a deleted client with no rights at all)."""


class _PhaseSwitch(Exception):
    """The machine wants the other listener (e.g. re-attestation while operational)."""

    def __init__(self, send: Send) -> None:
        super().__init__(send.channel.value)
        self.send = send


class _Reconnect(Exception):
    """Leave this session on purpose (a renewed certificate to present)."""


def granted(codes: Iterable[object]) -> bool:
    """True when no SUBACK return code is a failure (0x80 and above)."""
    for code in codes:
        value = getattr(code, "value", code)
        if not isinstance(value, int) or value >= 0x80:
            return False
    return True


class SimulatedSensor:
    def __init__(
        self,
        credential: BirthCredential,
        options: SensorOptions,
        gate: asyncio.Semaphore,
        *,
        clock: Clock | None = None,
        on_event: SensorListener | None = None,
    ) -> None:
        self.device_id = credential.serial_number
        self.options = options
        self.outcome = DeviceOutcome()
        self._gate = gate
        self._clock = clock or SystemClock()
        self._random = random.Random(options.seed)
        self._on_event = on_event
        self.machine = DeviceClient(
            credential,
            firmware=options.firmware,
            clock=self._clock,
            random=self._random,
            response_timeout=options.response_timeout,
            lifetime=options.cert_lifetime,
        )
        self._sensor = SensorModel(options.seed)
        self._carry: list[Event] = []  # events to act on when the next connection is up
        self._client: aiomqtt.Client | None = None
        self._renew_sent_at: float | None = None
        self._expired_serial: int | None = None
        self._fresh_certificate = False  # enrolled, no operational session yet
        self._after_cut = False  # the last operational session was cut by the broker
        self._began = False  # machine.start() called

    @property
    def client(self) -> aiomqtt.Client | None:
        """The live MQTT connection, if any (for drivers that probe the broker as this
        device)."""
        return self._client

    def _tell(self, kind: SensorEventKind, detail: str = "") -> float:
        now = time.monotonic()
        if self._on_event is not None:
            self._on_event(SensorEvent(kind, self.device_id, now, detail))
        return now

    # -- the life of a sensor ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> DeviceOutcome:
        # The machine starts (its first request and that request's timer) once the first
        # enrollment connection is up: a sensor waiting its turn at the gate has not asked yet.
        backoff = self.options.min_backoff
        while not stop.is_set() and self.machine.state is not DeviceState.FAILED:
            channel = self._next_channel()
            try:
                if channel is Channel.ENROLL:
                    async with self._gate:
                        await self._session(Channel.ENROLL, stop)
                else:
                    await self._session(Channel.RENEW, stop)
                backoff = self.options.min_backoff
            except aiomqtt.MqttError:
                self.outcome.connection_errors += 1
                # Backoff with jitter: a fleet that lost its broker must not return as one wave.
                await _sleep_or_stop(stop, backoff * self._random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, self.options.max_backoff)
        return self.outcome

    def _next_channel(self) -> Channel:
        for event in self._carry:
            if isinstance(event, Send):
                return event.channel
        return Channel.RENEW if self.machine.current is not None else Channel.ENROLL

    def _tls_for(self, channel: Channel) -> ssl.SSLContext:
        if channel is Channel.ENROLL:
            return shared_server_auth_context(self.options.ca_pem)
        current = self.machine.current
        assert current is not None
        return mutual_context(
            self.options.ca_pem, current.key, current.certificate, current.chain[:-1]
        )

    def _client_for(self, channel: Channel, tls: ssl.SSLContext) -> aiomqtt.Client:
        port = (
            self.options.enrollment_port
            if channel is Channel.ENROLL
            else self.options.operational_port
        )
        return aiomqtt.Client(
            self.options.host,
            port,
            identifier=self.device_id,
            tls_context=tls,
            keepalive=self.options.keepalive,
            timeout=self.options.response_timeout,
            bind_address=self.options.bind_address,
            socket_options=NODELAY,
        )

    async def _session(self, channel: Channel, stop: asyncio.Event) -> None:
        tls = self._tls_for(channel)
        client = self._client_for(channel, tls)
        if self.outcome.started_at is None:
            self.outcome.started_at = time.monotonic()
        if channel is Channel.RENEW and self._after_cut and self.options.probe_reconnects:
            await self._probe_admission(tls)
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            self.outcome.refused += 1
            self._tell(SensorEventKind.REFUSED, f"{channel}: {exc}")
            raise
        self._client = client
        admitted = False
        try:
            for topic in self.machine.subscriptions(channel):
                if not granted(await client.subscribe(topic, qos=1)):
                    raise SessionRefused(f"subscription to {topic} refused")
            admitted = True
            self._after_cut = False
            if not self._began:
                self._began = True
                self._carry = self.machine.start()
            now = self._tell(SensorEventKind.CONNECTED, channel)
            if channel is Channel.RENEW and self._fresh_certificate:
                self._fresh_certificate = False
                if self.outcome.operational_at is None:
                    self.outcome.operational_at = now
                self._tell(SensorEventKind.OPERATIONAL)
            await _until_stopped(self._pump(client, channel, stop), stop)
        except _PhaseSwitch as switch:
            self._carry = [switch.send]
        except _Reconnect:
            pass
        except SessionRefused:
            self.outcome.refused += 1
            self._tell(SensorEventKind.REFUSED, f"{channel}: no subscription granted")
            raise
        except aiomqtt.MqttError:
            if admitted and not stop.is_set():
                self.outcome.cut += 1
                self._after_cut = True
                self._tell(SensorEventKind.CUT, channel)
            raise
        finally:
            self._client = None
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def _probe_admission(self, tls: ssl.SSLContext) -> None:
        verdict = await admission(
            self.options.host,
            self.options.operational_port,
            tls,
            self.device_id,
            topics.renew_response(self.device_id),
            timeout=self.options.response_timeout,
        )
        if verdict.refused:
            self.outcome.refused += 1
            self._tell(SensorEventKind.REFUSED, f"{Channel.RENEW}: {verdict}")
            raise SessionRefused(str(verdict))

    async def _pump(self, client: aiomqtt.Client, channel: Channel, stop: asyncio.Event) -> None:
        messages: AsyncIterator[aiomqtt.Message] = client.messages.__aiter__()
        pending, self._carry = self._carry, []
        loop = asyncio.get_running_loop()
        next_reading = loop.time()
        telemetry = channel is Channel.RENEW and self.options.telemetry_interval > 0
        while not stop.is_set():
            renewed = await self._act(client, channel, pending)
            pending = []
            if self.machine.state is DeviceState.FAILED:
                return
            if channel is Channel.ENROLL and self.machine.state is DeviceState.ENROLLED:
                return  # certificate in hand: move to the operational listener
            if renewed and self.options.reconnect_after_renewal:
                raise _Reconnect
            # No polling: an idle sensor sleeps until its next deadline or message, so a
            # simulated fleet of thousands costs its machine nothing while it waits.
            wait: float | None = None
            deadline = self.machine.next_deadline()
            if deadline is not None:
                wait = max(0.0, (deadline - self._clock.now()).total_seconds())
            if telemetry:
                if loop.time() >= next_reading:
                    await client.publish(
                        topics.telemetry(self.device_id), self._sensor.payload(), qos=0
                    )
                    self.outcome.telemetry += 1
                    next_reading = loop.time() + self.options.telemetry_interval
                until_reading = max(0.0, next_reading - loop.time())
                wait = until_reading if wait is None else min(wait, until_reading)
            try:
                message = await asyncio.wait_for(messages.__anext__(), wait)
            except TimeoutError:
                self._note_expiry()
                pending = self.machine.timeout()
                continue
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                pending = self.machine.receive(str(message.topic), bytes(payload))

    def _note_expiry(self) -> None:
        """Count a certificate that ran out before a renewal replaced it (once per
        certificate: the machine re-attests from here)."""
        current = self.machine.current
        if current is None or self._clock.now() < current.not_after:
            return
        serial = current.certificate.serial_number
        if serial != self._expired_serial:
            self._expired_serial = serial
            self.outcome.expired += 1
            self._tell(SensorEventKind.EXPIRED)

    async def _act(self, client: aiomqtt.Client, channel: Channel, events: list[Event]) -> bool:
        """Carry out the machine's events; True when a renewal just completed."""
        renewed = False
        for index, event in enumerate(events):
            match event:
                case Send() if event.channel is channel:
                    if channel is Channel.RENEW and self._renew_sent_at is None:
                        self._renew_sent_at = time.monotonic()
                    await client.publish(event.topic, event.payload, qos=event.qos)
                case Send():
                    self._carry = list(events[index + 1 :])
                    raise _PhaseSwitch(event)
                case Enrolled():
                    self._enrolled(event)
                    renewed = event.renewal
                case AwaitingApproval():
                    self.outcome.pending = 1
                case Rejected():
                    self.outcome.rejected[event.reason] += 1
                    self._tell(SensorEventKind.REJECTED, event.reason)
                    if event.reason == ReasonCode.CERTIFICATE_EXPIRED:
                        self._note_expiry()
                    if event.final:
                        self.outcome.failed = 1
                        self._tell(SensorEventKind.FAILED, event.reason)
                    if self.machine.state is not DeviceState.RENEW_SENT:
                        self._renew_sent_at = None
        return renewed

    def _enrolled(self, event: Enrolled) -> None:
        self.outcome.pending = 0
        if event.renewal:
            self.outcome.renewed += 1
            started, self._renew_sent_at = self._renew_sent_at, None
            seconds = time.monotonic() - started if started is not None else 0.0
            self.outcome.renewal_seconds.append(seconds)
            self._tell(SensorEventKind.RENEWED, f"{seconds:.6f}")
            return
        if self.outcome.enrolled:
            self.outcome.reattested += 1
        self.outcome.enrolled = 1
        self._fresh_certificate = True
        now = self._tell(SensorEventKind.ENROLLED)
        if self.outcome.enrolled_at is None:
            self.outcome.enrolled_at = now


async def _until_stopped(work: Coroutine[object, object, None], stop: asyncio.Event) -> None:
    """Run ``work`` until it ends or ``stop`` is set (then cancel it); its exceptions pass."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if not task.cancelled():
        task.result()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
