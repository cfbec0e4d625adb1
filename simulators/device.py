"""One simulated sensor: the device-side protocol machine driven over real MQTT and TLS.

The sensor owns two kinds of connection, as a real device does: the enrollment listener
(server-authenticated TLS, client id = its serial number) until it holds a certificate, then
the operational listener (mutual TLS with that certificate) where it publishes telemetry and
renews. `gateway.protocol.device.DeviceClient` makes every protocol decision; this module only
moves bytes and keeps time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

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
from gateway.protocol.topics import Channel
from pki.clock import Clock, SystemClock
from pki.factory import BirthCredential
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION
from simulators.telemetry import SensorModel
from simulators.tls import mutual_context, server_auth_context

# How often a waiting sensor looks at the stop flag, at most.
_POLL = 0.5


@dataclass(frozen=True)
class SensorOptions:
    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: bytes
    cert_lifetime: int | None = None
    telemetry_interval: float = 5.0
    seed: int = 0
    firmware: Firmware = field(
        default_factory=lambda: Firmware(version=FIRMWARE_VERSION, digest=FIRMWARE_DIGEST)
    )
    response_timeout: float = 10.0
    max_backoff: float = 10.0


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


class _PhaseSwitch(Exception):
    """The machine wants the other listener (e.g. re-attestation while operational)."""

    def __init__(self, send: Send) -> None:
        super().__init__(send.channel.value)
        self.send = send


class SimulatedSensor:
    def __init__(
        self,
        credential: BirthCredential,
        options: SensorOptions,
        gate: asyncio.Semaphore,
        *,
        clock: Clock | None = None,
    ) -> None:
        self.device_id = credential.serial_number
        self.options = options
        self.outcome = DeviceOutcome()
        self._gate = gate
        self._clock = clock or SystemClock()
        self._random = random.Random(options.seed)
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

    # -- the life of a sensor ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> DeviceOutcome:
        self._carry = self.machine.start()
        backoff = 0.5
        while not stop.is_set() and self.machine.state is not DeviceState.FAILED:
            channel = self._next_channel()
            try:
                if channel is Channel.ENROLL:
                    async with self._gate:
                        await self._session(Channel.ENROLL, stop)
                else:
                    await self._session(Channel.RENEW, stop)
                backoff = 0.5
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

    async def _session(self, channel: Channel, stop: asyncio.Event) -> None:
        if channel is Channel.ENROLL:
            tls = server_auth_context(self.options.ca_pem)
            port = self.options.enrollment_port
        else:
            current = self.machine.current
            assert current is not None
            tls = mutual_context(
                self.options.ca_pem, current.key, current.certificate, current.chain[:-1]
            )
            port = self.options.operational_port
        async with aiomqtt.Client(
            self.options.host,
            port,
            identifier=self.device_id,
            tls_context=tls,
            keepalive=60,
            timeout=self.options.response_timeout,
        ) as client:
            for topic in self.machine.subscriptions(channel):
                await client.subscribe(topic, qos=1)
            try:
                await self._pump(client, channel, stop)
            except _PhaseSwitch as switch:
                self._carry = [switch.send]

    async def _pump(self, client: aiomqtt.Client, channel: Channel, stop: asyncio.Event) -> None:
        messages: AsyncIterator[aiomqtt.Message] = client.messages.__aiter__()
        pending, self._carry = self._carry, []
        loop = asyncio.get_running_loop()
        next_reading = loop.time()
        while not stop.is_set():
            await self._act(client, channel, pending)
            pending = []
            if self.machine.state is DeviceState.FAILED:
                return
            if channel is Channel.ENROLL and self.machine.state is DeviceState.ENROLLED:
                return  # certificate in hand: move to the operational listener
            wait = _POLL
            deadline = self.machine.next_deadline()
            if deadline is not None:
                wait = min(wait, max(0.0, (deadline - self._clock.now()).total_seconds()))
            if channel is Channel.RENEW:
                if loop.time() >= next_reading:
                    await client.publish(
                        topics.telemetry(self.device_id), self._sensor.payload(), qos=0
                    )
                    self.outcome.telemetry += 1
                    next_reading = loop.time() + self.options.telemetry_interval
                wait = min(wait, max(0.0, next_reading - loop.time()))
            try:
                message = await asyncio.wait_for(messages.__anext__(), wait)
            except TimeoutError:
                pending = self.machine.timeout()
                continue
            payload = message.payload
            if isinstance(payload, bytes | bytearray):
                pending = self.machine.receive(str(message.topic), bytes(payload))

    async def _act(self, client: aiomqtt.Client, channel: Channel, events: list[Event]) -> None:
        for index, event in enumerate(events):
            match event:
                case Send() if event.channel is channel:
                    await client.publish(event.topic, event.payload, qos=event.qos)
                case Send():
                    self._carry = list(events[index + 1 :])
                    raise _PhaseSwitch(event)
                case Enrolled():
                    self.outcome.pending = 0
                    if event.renewal:
                        self.outcome.renewed += 1
                    elif self.outcome.enrolled:
                        self.outcome.reattested += 1
                    self.outcome.enrolled = 1
                case AwaitingApproval():
                    self.outcome.pending = 1
                case Rejected():
                    self.outcome.rejected[event.reason] += 1
                    if event.final:
                        self.outcome.failed = 1


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
