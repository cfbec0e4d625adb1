"""Helpers of the reliability suite: a gateway run as a separate process (so it can die by
SIGKILL and come back on the same ports and registry), and simulated devices that keep going
through such deaths the way field devices must: reconnect with backoff and jitter, and send
the request in flight again, byte for byte."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import tomli_w
from cryptography import x509

from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.faults import FAULT_ENV
from gateway.home import init_home
from gateway.protocol.device import DeviceClient, DeviceState, Enrolled, Event, Rejected, Send
from gateway.protocol.messages import Firmware
from gateway.protocol.topics import Channel
from pki.clock import SystemClock
from pki.factory import FactoryCA
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION, trust_factory
from simulators.tls import mutual_context, server_auth_context

FLEETGATE = [sys.executable, "-m", "gateway.cli"]
RUNNING_LINE = b"Fleetgate running"  # what `fleetgate run` prints once it serves
FIRMWARE = Firmware(version=FIRMWARE_VERSION, digest=FIRMWARE_DIGEST)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_home(folder: Path, **tables: dict[str, object]) -> tuple[Settings, FactoryCA]:
    """A gateway home on fixed free ports (a restarted gateway must come back on the same
    ones), with ``tables`` merged into fleetgate.toml, and the simulated factory trusted."""
    init_home(folder)
    path = folder / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["broker"]["enrollment_port"] = free_port()
    data["broker"]["operational_port"] = free_port()
    for name, values in tables.items():
        table = data.setdefault(name, {}) if isinstance(values, dict) else None
        if table is None:
            data[name] = values
        else:
            table.update(values)
    path.write_text(tomli_w.dumps(data))
    settings = load_settings(folder)
    return settings, trust_factory(settings)


def fleetgate(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> (
    subprocess.CompletedProcess[str]
):
    return subprocess.run(
        [*FLEETGATE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


class GatewayProcess:
    """``fleetgate run`` in a child process; its output goes to numbered log files."""

    def __init__(self, settings: Settings, *, verbose: bool = False) -> None:
        self.settings = settings
        self.verbose = verbose
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.exit_codes: list[int] = []
        self.logs: list[Path] = []
        # time.monotonic() of each start(), each run found serving, and each kill(): how long
        # the gateway itself took to come back, apart from how long devices took to return
        self.started_at: list[float] = []
        self.serving_at: list[float] = []
        self.killed_at: list[float] = []

    def start(self, *, fault: str | None = None, env: dict[str, str] | None = None) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self.runs += 1
        log = self.settings.home / f"gateway-{self.runs}.log"
        self.logs.append(log)
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        environment.pop(FAULT_ENV, None)
        if fault is not None:
            environment[FAULT_ENV] = fault
        arguments = [*FLEETGATE, "run", "--home", str(self.settings.home)]
        if self.verbose:
            arguments.append("--verbose")
        with log.open("wb") as output:
            self.started_at.append(time.monotonic())
            self.process = subprocess.Popen(
                arguments, stdout=output, stderr=subprocess.STDOUT, env=environment
            )

    def wait_ready(self, seconds: float = 30.0) -> None:
        """Until this run serves: its operational port accepts connections and it has said
        "Fleetgate running" (printed once its transport is subscribed and the CA chain is
        published, i.e. it answers requests). Records the moment in ``serving_at``."""
        port = self.settings.broker.operational_port
        end = time.monotonic() + seconds
        listening = False
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited while starting:\n{self.output()}")
            if not listening:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        listening = True
                except OSError:
                    pass
            if listening and RUNNING_LINE in self.logs[-1].read_bytes():
                self.serving_at.append(time.monotonic())
                return
            time.sleep(0.02)
        what = "saying it runs" if listening else f"listening on {port}"
        raise AssertionError(f"gateway not {what}:\n{self.output()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def reap(self) -> int | None:
        """The exit code if the process ended (recorded once), else None."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is not None and len(self.exit_codes) < self.runs:
            self.exit_codes.append(code)
        return code

    def kill(self) -> None:
        """SIGKILL by pid: the gateway gets no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.killed_at.append(time.monotonic())
        self.process.wait(timeout=10)
        self.reap()

    def stop(self) -> int:
        """SIGTERM and wait: the clean shutdown signs the audit chain head."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        code = self.reap()
        assert code is not None
        return code

    def output(self) -> str:
        return "\n".join(
            f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}"
            for path in self.logs
            if path.exists()
        )


async def keep_alive(gateway: GatewayProcess, done: asyncio.Event) -> None:
    """Restart the gateway (without any fault) whenever it dies, until ``done``."""
    while not done.is_set():
        if gateway.reap() is not None:
            gateway.start()
            await asyncio.get_running_loop().run_in_executor(None, gateway.wait_ready)
        await asyncio.sleep(0.05)


@dataclass
class DeviceRun:
    """What one simulated device went through."""

    device_id: str
    certificates: list[x509.Certificate] = field(default_factory=list)
    rejections: list[str] = field(default_factory=list)
    reconnects: int = 0
    reconnect_delays: list[float] = field(default_factory=list)
    renewals: int = 0


class FieldDevice:
    """A ``DeviceClient`` over real MQTT and TLS that enrolls, then renews ``renewals`` times,
    through any number of broker or gateway deaths.

    On a lost connection it waits with exponential backoff and full jitter (so a fleet does not
    come back as one wave) and reconnects; the protocol machine's own timer then sends the
    request in flight again, unchanged.
    """

    def __init__(
        self,
        credential: object,
        ca_pem: bytes,
        settings: Settings,
        *,
        renewals: int = 1,
        seed: int = 0,
        response_timeout: float = 1.0,
        max_backoff: float = 2.0,
    ) -> None:
        self._random = random.Random(seed)
        self.client = DeviceClient(
            credential,  # type: ignore[arg-type]
            firmware=FIRMWARE,
            clock=SystemClock(),
            random=self._random,
            response_timeout=response_timeout,
            retry_after=0.3,
            max_retry_after=max_backoff,
        )
        self.run = DeviceRun(self.client.device_id)
        self._ca_pem = ca_pem
        self._host = settings.broker.host
        self._ports = {
            Channel.ENROLL: settings.broker.enrollment_port,
            Channel.RENEW: settings.broker.operational_port,
        }
        self._renewals = renewals
        self._max_backoff = max_backoff
        self._carry: list[Event] = []

    @property
    def done(self) -> bool:
        return (
            self.client.state is DeviceState.FAILED
            or (self.client.state is DeviceState.ENROLLED and self.run.renewals >= self._renewals)
        )

    async def go(self, deadline: float) -> DeviceRun:
        loop = asyncio.get_running_loop()
        self._carry = self.client.start()
        backoff = 0.1
        while not self.done:
            if loop.time() > deadline:
                raise AssertionError(f"{self.run.device_id} still {self.client.state}: {self.run}")
            channel = self._next_channel()
            try:
                await self._session(channel, deadline)
                backoff = 0.1
            except aiomqtt.MqttError:
                self.run.reconnects += 1
                delay = self._random.uniform(0, backoff)  # full jitter
                self.run.reconnect_delays.append(delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self._max_backoff)
        return self.run

    def _next_channel(self) -> Channel:
        for event in self._carry:
            if isinstance(event, Send):
                return event.channel
        return Channel.RENEW if self.client.current is not None else Channel.ENROLL

    async def _session(self, channel: Channel, deadline: float) -> None:
        if channel is Channel.ENROLL:
            tls = server_auth_context(self._ca_pem)
        else:
            current = self.client.current
            assert current is not None
            tls = mutual_context(self._ca_pem, current.key, current.certificate, current.chain[:-1])
        async with aiomqtt.Client(
            self._host,
            self._ports[channel],
            identifier=self.client.device_id,
            tls_context=tls,
            timeout=3,
            keepalive=10,
        ) as mqtt:
            for topic in self.client.subscriptions(channel):
                await mqtt.subscribe(topic, qos=1)
            messages = mqtt.messages.__aiter__()
            events, self._carry = self._carry, []
            loop = asyncio.get_running_loop()
            while True:
                switch = await self._act(mqtt, channel, events)
                if switch is not None:
                    self._carry = switch
                    return
                if self.done:
                    return
                if loop.time() > deadline:
                    return
                wait = 0.2
                due = self.client.next_deadline()
                if due is not None:
                    wait = max(0.0, min(wait, (due - SystemClock().now()).total_seconds()))
                try:
                    message = await asyncio.wait_for(messages.__anext__(), wait)
                except TimeoutError:
                    events = self.client.timeout()
                    continue
                events = self.client.receive(str(message.topic), bytes(message.payload))

    async def _act(
        self, mqtt: aiomqtt.Client, channel: Channel, events: list[Event]
    ) -> list[Event] | None:
        """Publish, record; returns the remaining events when they need the other listener."""
        pending = list(events)
        while pending:
            event = pending.pop(0)
            match event:
                case Send() if event.channel is channel:
                    await mqtt.publish(event.topic, event.payload, qos=1)
                case Send():
                    return [event, *pending]
                case Enrolled():
                    self.run.certificates.append(event.certificate)
                    if event.renewal:
                        self.run.renewals += 1
                    if self.run.renewals < self._renewals:
                        # Renew at once rather than at 2/3 of the lifetime: a stream of renewals.
                        pending = [*self.client.renew(), *pending]
                case Rejected():
                    self.run.rejections.append(event.reason)
        return None
