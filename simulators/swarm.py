"""A simulated fleet in worker processes of its own, driven and watched by another process.

A benchmark must not count the devices' CPU as the gateway's, and thousands of simulated TLS
clients need more than one core: each ``SwarmProcess`` runs a share of the fleet in a child
process (``python -m simulators.swarm``) and talks JSON lines over its stdin and stdout.

    -> spec                 the devices, where the gateway is, how they behave
    <- ready                birth certificates minted (the factory's work, before the clock runs)
    -> go {at}              start every sensor at time.monotonic() == at
    <- events [...]         SensorEvents, batched every 50 ms: [kind, device, at, detail]
    -> probe {device}       subscribe to the device's command topic as the device; answer
    <- probe {device, granted}
    -> drop {device}        stop one sensor (a revoked device gives up)
    -> stop
    <- done {outcomes}      one row per device (see ``OUTCOME_FIELDS``)

Stamps are ``time.monotonic()``, which on Linux is one clock for every process of a machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.protocol import topics
from gateway.protocol.messages import Firmware
from simulators.device import SensorEvent, SensorOptions, SimulatedSensor, granted
from simulators.factory import FIRMWARE_DIGEST, FIRMWARE_VERSION, MODEL, load_or_create_factory

__all__ = ["OUTCOME_FIELDS", "SwarmError", "SwarmProcess", "SwarmSpec", "split"]

OUTCOME_FIELDS = (
    "device",
    "enrolled",
    "failed",
    "renewed",
    "reattested",
    "cut",
    "refused",
    "expired",
    "started_at",
    "enrolled_at",
    "operational_at",
    "rejected",
    "renewal_seconds",
)
_FLUSH_SECONDS = 0.05


class SwarmError(RuntimeError):
    """A swarm worker did not start, or stopped answering."""


@dataclass(frozen=True)
class SwarmSpec:
    """What one worker process simulates. Every field survives a JSON round trip."""

    device_ids: tuple[str, ...]
    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: str
    factory_dir: str  # the simulated manufacturer's folder (``<home>/factory``)
    model: str = MODEL
    firmware_version: str = FIRMWARE_VERSION
    firmware_digest: str = FIRMWARE_DIGEST
    concurrency: int = 64  # enrollment connections open at once in this worker
    cert_lifetime: int | None = None
    telemetry_interval: float = 0.0
    reconnect_after_renewal: bool = False
    min_backoff: float = 0.5
    response_timeout: float = 10.0
    probe_reconnects: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.device_ids:
            raise ValueError("a swarm needs at least one device")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError("device ids must be unique")
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if "-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            raise ValueError("ca_pem must hold PEM certificates")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "device_ids": list(self.device_ids)})

    @classmethod
    def from_json(cls, text: str) -> SwarmSpec:
        data = json.loads(text)
        data["device_ids"] = tuple(data["device_ids"])
        return cls(**data)

    def sensor_options(self, index: int) -> SensorOptions:
        return SensorOptions(
            host=self.host,
            enrollment_port=self.enrollment_port,
            operational_port=self.operational_port,
            ca_pem=self.ca_pem.encode(),
            cert_lifetime=self.cert_lifetime,
            telemetry_interval=self.telemetry_interval,
            seed=self.seed + index,
            firmware=Firmware(version=self.firmware_version, digest=self.firmware_digest),
            response_timeout=self.response_timeout,
            min_backoff=self.min_backoff,
            max_backoff=max(self.min_backoff, 10.0),
            reconnect_after_renewal=self.reconnect_after_renewal,
            probe_reconnects=self.probe_reconnects,
        )


def split(device_ids: list[str], parts: int) -> list[tuple[str, ...]]:
    """Deal ``device_ids`` round-robin into at most ``parts`` non-empty shares."""
    if parts < 1:
        raise ValueError("parts must be at least 1")
    shares = [tuple(device_ids[i::parts]) for i in range(parts)]
    return [share for share in shares if share]


# -- the orchestrating side --------------------------------------------------------------------


@dataclass
class _Pending:
    probes: dict[str, asyncio.Future[bool]] = field(default_factory=dict)
    done: asyncio.Future[list[list[Any]]] | None = None


class SwarmProcess:
    """One worker process. ``await start()`` (returns once its devices are minted), ``go()``,
    watch ``on_event``, ``await stop()`` for the outcome rows."""

    def __init__(
        self, spec: SwarmSpec, on_event: Callable[[SensorEvent], None] | None = None
    ) -> None:
        self.spec = spec
        self._on_event = on_event
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[float] | None = None
        self._pending = _Pending()
        self._stderr_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self, timeout: float = 120.0, stderr_path: Path | None = None) -> float:
        """Start the worker; returns the seconds it took to mint its birth certificates."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._pending.done = loop.create_future()
        self._stderr_path = stderr_path
        stderr = open(stderr_path, "ab") if stderr_path is not None else None  # noqa: SIM115  closed below
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "simulators.swarm",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
                limit=64 * 1024 * 1024,
            )
        finally:
            if stderr is not None:
                stderr.close()
        self._reader = asyncio.create_task(self._read())
        self._send({"spec": self.spec.to_json()})
        try:
            return await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except TimeoutError:
            await self.kill()
            raise SwarmError(f"swarm worker not ready within {timeout} s") from None

    def go(self, at: float | None = None) -> None:
        self._send({"op": "go", "at": at if at is not None else time.monotonic()})

    def drop(self, device_id: str) -> None:
        self._send({"op": "drop", "device": device_id})

    async def probe(self, device_id: str, timeout: float = 10.0) -> bool:
        """Whether the broker grants ``device_id`` a subscription to its own command topic
        (an active device: yes; quarantined: no); False when it is not connected."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.probes[device_id] = future
        self._send({"op": "probe", "device": device_id})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.probes.pop(device_id, None)

    async def stop(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Stop every sensor; the outcome of each device, as dicts keyed by OUTCOME_FIELDS."""
        assert self._pending.done is not None
        try:
            self._send({"op": "stop"})
            rows = await asyncio.wait_for(asyncio.shield(self._pending.done), timeout)
        except (TimeoutError, ConnectionError) as exc:
            await self.kill()
            raise SwarmError(f"swarm worker did not report its outcome: {exc}") from None
        await self._wait_exit(timeout)
        return [dict(zip(OUTCOME_FIELDS, row, strict=True)) for row in rows]

    async def kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _wait_exit(self, timeout: float) -> None:
        assert self._process is not None
        try:
            await asyncio.wait_for(self._process.wait(), timeout)
        except TimeoutError:
            await self.kill()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    def _send(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise ConnectionError("swarm worker is not running")
        process.stdin.write(json.dumps(message).encode() + b"\n")

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            while line := await stdout.readline():
                self._handle(json.loads(line))
        finally:
            failure = SwarmError(f"swarm worker ended (see {self._stderr_path or 'its stderr'})")
            for future in (self._ready, self._pending.done, *self._pending.probes.values()):
                if future is not None and not future.done():
                    future.set_exception(failure)

    def _handle(self, message: dict[str, Any]) -> None:
        match message.get("ev"):
            case "ready":
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(float(message["seconds"]))
            case "events":
                if self._on_event is not None:
                    for kind, device, at, detail in message["events"]:
                        self._on_event(SensorEvent(kind, device, at, detail))
            case "probe":
                future = self._pending.probes.get(message["device"])
                if future is not None and not future.done():
                    future.set_result(bool(message["granted"]))
            case "done":
                if self._pending.done is not None and not self._pending.done.done():
                    self._pending.done.set_result(message["outcomes"])


# -- the worker side ---------------------------------------------------------------------------


class _Worker:
    def __init__(self, spec: SwarmSpec, commands: asyncio.StreamReader) -> None:
        self.spec = spec
        self._reader = commands
        self.stop = asyncio.Event()
        self.started = asyncio.Event()
        self._buffer: list[list[Any]] = []
        self._sensors: dict[str, SimulatedSensor] = {}
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._probes: set[asyncio.Task[None]] = set()
        self._start_at = 0.0

    def _emit(self, message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    def _record(self, event: SensorEvent) -> None:
        self._buffer.append([str(event.kind), event.device_id, event.at, event.detail])

    async def run(self) -> None:
        began = time.monotonic()
        factory = load_or_create_factory(Path(self.spec.factory_dir))
        gate = asyncio.Semaphore(self.spec.concurrency)
        for index, device_id in enumerate(self.spec.device_ids):
            self._sensors[device_id] = SimulatedSensor(
                factory.mint(device_id, self.spec.model),
                self.spec.sensor_options(index),
                gate,
                on_event=self._record,
            )
        self._emit({"ev": "ready", "seconds": time.monotonic() - began})
        commands = asyncio.create_task(self._commands())
        flusher = asyncio.create_task(self._flush_forever())
        try:
            await self.started.wait()
            await asyncio.sleep(max(0.0, self._start_at - time.monotonic()))
            for device_id, sensor in self._sensors.items():
                self._tasks[device_id] = asyncio.create_task(sensor.run(self.stop))
            await self.stop.wait()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        finally:
            commands.cancel()
            flusher.cancel()
        self._flush()
        self._emit({"ev": "done", "outcomes": [self._row(s) for s in self._sensors.values()]})

    @staticmethod
    def _row(sensor: SimulatedSensor) -> list[Any]:
        o = sensor.outcome
        return [
            sensor.device_id,
            o.enrolled,
            o.failed,
            o.renewed,
            o.reattested,
            o.cut,
            o.refused,
            o.expired,
            o.started_at,
            o.enrolled_at,
            o.operational_at,
            dict(o.rejected),
            [round(s, 6) for s in o.renewal_seconds],
        ]

    def _flush(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            self._emit({"ev": "events", "events": batch})

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_SECONDS)
            self._flush()

    async def _commands(self) -> None:
        while line := await self._reader.readline():
            message = json.loads(line)
            match message.get("op"):
                case "go":
                    self._start_at = float(message["at"])
                    self.started.set()
                case "probe":
                    probe = asyncio.create_task(self._probe(message["device"]))
                    self._probes.add(probe)
                    probe.add_done_callback(self._probes.discard)
                case "drop":
                    task = self._tasks.get(message["device"])
                    if task is not None:
                        task.cancel()
                case "stop":
                    break
        # stop, or the orchestrator went away (EOF): end the run either way
        self.started.set()
        self.stop.set()

    async def _probe(self, device_id: str) -> None:
        sensor = self._sensors.get(device_id)
        client = sensor.client if sensor is not None else None
        allowed = False
        if client is not None:
            with contextlib.suppress(Exception):
                allowed = granted(await client.subscribe(topics.commands_filter(device_id), qos=1))
        self._emit({"ev": "probe", "device": device_id, "granted": allowed})


async def _worker_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    spec = SwarmSpec.from_json(json.loads(first)["spec"])
    await _Worker(spec, reader).run()


def main() -> None:
    asyncio.run(_worker_main())


if __name__ == "__main__":
    main()
