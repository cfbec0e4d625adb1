"""What every simulation mode shares: its options, its summary, held sessions."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import aiomqtt

from gateway.protocol import topics
from gateway.protocol.device import Enrolled
from gateway.protocol.messages import Challenge, IssuedCertificate
from simulators.device import (
    DeviceOutcome,
    SensorOptions,
    granted,
)
from simulators.fleet import FleetSummary, device_ids
from simulators.tls import NODELAY, mutual_context

# How long a mode waits for the gateway to act on what it saw (a quarantine after a clone).
REACTION_SECONDS = 5.0
ANSWER_TYPES = frozenset({Challenge.TYPE, IssuedCertificate.TYPE, "pending", "undecodable"})
DELIVERY_SECONDS = 0.5


class Mode(StrEnum):
    NORMAL = "normal"
    REPLAY = "replay"
    CLONE = "clone"
    FLOOD = "flood"
    ROGUE = "rogue"
    TAMPER = "tamper"
    PROBER = "prober"
    EXFIL = "exfil"


@dataclass(frozen=True)
class ModeOptions:
    mode: Mode
    devices: int  # normal: the fleet; flood: devices enrolling beside the flood; else: actors
    host: str
    enrollment_port: int
    operational_port: int
    ca_pem: bytes
    duration: float | None = None  # normal only: stop after this many seconds
    cert_lifetime: int | None = None
    telemetry_interval: float = 5.0
    clone_address: str = "127.0.0.2"  # where the clone connects from
    flood_parallel: int = 32  # flood: requests in flight from the one flooding client
    flood_rounds: int = 3  # flood: calm and storm rounds, alternating
    flood_concurrency: int = 4  # flood: devices of a round enrolling at once
    response_timeout: float = 10.0
    progress: bool = False
    batch: str = field(default_factory=lambda: secrets.token_hex(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        if isinstance(self.devices, bool) or not isinstance(self.devices, int):
            raise TypeError("devices must be an int")
        if self.devices < 1:
            raise ValueError("a simulation needs at least one device")
        if self.mode is Mode.PROBER and self.devices < 2:
            raise ValueError("prober needs at least 2 devices (a prober and its victim)")
        for name in ("flood_parallel", "flood_rounds", "flood_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    def sensor(self, seed: int = 0, **changes: Any) -> SensorOptions:
        options = SensorOptions(
            host=self.host,
            enrollment_port=self.enrollment_port,
            operational_port=self.operational_port,
            ca_pem=self.ca_pem,
            cert_lifetime=self.cert_lifetime,
            telemetry_interval=self.telemetry_interval,
            seed=seed,
            response_timeout=self.response_timeout,
        )
        return dataclasses.replace(options, **changes)

    def ids(self, role: str, count: int | None = None) -> list[str]:
        return device_ids(f"{self.batch}-{role}", count or self.devices)


@dataclass
class ModeSummary(FleetSummary):
    mode: str = Mode.NORMAL.value
    quarantined: int = 0
    cut: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    denied: Counter[str] = field(default_factory=Counter)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, outcome: DeviceOutcome) -> None:
        super().add(outcome)
        self.cut += outcome.cut

    def as_dict(self) -> dict[str, object]:
        return {
            **super().as_dict(),
            "mode": self.mode,
            "quarantined": self.quarantined,
            "cut": self.cut,
            "refused": dict(self.refused),
            "denied": dict(self.denied),
            "details": self.details,
        }


class Session:
    """An operational session held open, watched for a cut; what it receives is kept."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.cut = False
        self.received: list[tuple[str, bytes]] = []
        self._watch = asyncio.ensure_future(self._watch_messages())

    async def _watch_messages(self) -> None:
        try:
            async for message in self.client.messages:
                payload = message.payload
                self.received.append(
                    (str(message.topic), bytes(payload) if isinstance(payload, bytes) else b"")
                )
        except aiomqtt.MqttError:
            self.cut = True

    async def rights(self, device_id: str) -> bool | None:
        """Whether the session may still subscribe to the device's commands (None: gone)."""
        if self.cut:
            return None
        try:
            return granted(await self.client.subscribe(topics.commands_filter(device_id), qos=1))
        except aiomqtt.MqttError:
            self.cut = True
            return None

    async def close(self) -> None:
        self._watch.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._watch
        with contextlib.suppress(Exception):
            await self.client.__aexit__(None, None, None)


async def open_session(
    options: ModeOptions, enrolled: Enrolled, device_id: str, bind_address: str
) -> Session:
    client = aiomqtt.Client(
        options.host,
        options.operational_port,
        identifier=device_id,
        tls_context=mutual_context(
            options.ca_pem, enrolled.key, enrolled.certificate, enrolled.chain[:-1]
        ),
        timeout=options.response_timeout,
        bind_address=bind_address,
        socket_options=NODELAY,
    )
    await client.__aenter__()
    return Session(client)
