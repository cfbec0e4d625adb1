"""The floor: what one onboarded device must cost the server at the least, measured in the same
run as the benchmark it is compared with.

- Enrollment: the hello and the enroll of one device through ``EnrollmentService.handle``
  (decode, CSR and chain checks, evidence signature, issuance, durable SQLite rows through
  ``SqlStore``), in this process, with no network: the gateway's own code path, CPU only.
- Handshakes: a device opens two TLS connections (server-authenticated to enroll, mutual to
  work). Their cost is read from the running gateway's processes (gateway and broker): N bare
  handshakes on each listener, nothing else, CPU per handshake after subtracting what the idle
  gateway spends meanwhile. The same TLS stack the fleet meets: asyncio's in the embedded
  broker, Mosquitto's OpenSSL in C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.bench.procstat import sample_all
from gateway.enrollment.testing import LoopbackGateway
from gateway.protocol.device import Send
from gateway.registry import SqlStore

__all__ = ["Floor", "enrollment_cpu_ms", "handshake_cpu_ms", "idle_cpu_rate"]

_WARMUP = 10


@dataclass(frozen=True)
class Floor:
    """``enrollment_ms`` is measured on the idle machine before the fleet starts;
    ``loaded_enrollment_ms`` (if any) the same enrollment again while the fleet onboards, on
    the cores the gateway shares with the broker and the simulators: how much slower the same
    code runs in the gateway's conditions, apart from what the gateway does besides."""

    enrollment_ms: float
    enrollment_handshake_ms: float
    operational_handshake_ms: float
    loaded_enrollment_ms: float | None = None

    @property
    def _handshakes_ms(self) -> float:
        return self.enrollment_handshake_ms + self.operational_handshake_ms

    @property
    def per_device_ms(self) -> float:
        return self.enrollment_ms + self._handshakes_ms

    @property
    def loaded_per_device_ms(self) -> float | None:
        if self.loaded_enrollment_ms is None:
            return None
        return self.loaded_enrollment_ms + self._handshakes_ms

    def under_load(self, enrollment_ms: float | None) -> Floor:
        return dataclasses.replace(self, loaded_enrollment_ms=enrollment_ms)

    def as_dict(self) -> dict[str, float | None]:
        loaded = self.loaded_per_device_ms
        return {
            "floor_enroll_cpu_ms": round(self.enrollment_ms, 3),
            "floor_handshake_enrollment_ms": round(self.enrollment_handshake_ms, 3),
            "floor_handshake_operational_ms": round(self.operational_handshake_ms, 3),
            "floor_cpu_ms_per_device": round(self.per_device_ms, 3),
            "floor_enroll_cpu_ms_under_load": (
                None if self.loaded_enrollment_ms is None
                else round(self.loaded_enrollment_ms, 3)
            ),
            "floor_cpu_ms_per_device_under_load": None if loaded is None else round(loaded, 3),
        }


def enrollment_cpu_ms(samples: int, folder: Path) -> float:
    """Median CPU milliseconds of the gateway's side of one enrollment (hello + enroll) on a
    SQLite registry in ``folder``."""
    if samples < 1:
        raise ValueError("samples must be at least 1")
    folder.mkdir(parents=True, exist_ok=True)
    store = SqlStore(f"sqlite:///{folder / 'floor.db'}")
    try:
        loopback = LoopbackGateway(store=store)
        costs: list[float] = []
        for index in range(_WARMUP + samples):
            client = loopback.device(f"floor-{index:06d}")
            spent = 0.0
            pending = list(client.start())
            while pending:
                event = pending.pop(0)
                if not isinstance(event, Send):
                    continue
                # Only the gateway's work is timed; the device's key and signatures are not.
                began = time.thread_time()
                answers = loopback.service.handle(event.topic, event.payload)
                spent += time.thread_time() - began
                for answer in answers:
                    pending.extend(client.receive(answer.topic, answer.payload))
            if client.current is None:
                raise RuntimeError(f"floor enrollment {index} did not complete")
            if index >= _WARMUP:
                costs.append(spent)
    finally:
        store.close()
    costs.sort()
    return costs[len(costs) // 2] * 1000


def _cpu(pids: list[int]) -> float:
    return sum(s.cpu_seconds for s in sample_all(pids))


async def idle_cpu_rate(pids: list[int], seconds: float = 2.0) -> float:
    """CPU seconds per second the server spends doing nothing asked of it (timers, polls)."""
    began, before = time.monotonic(), _cpu(pids)
    await asyncio.sleep(seconds)
    return (_cpu(pids) - before) / (time.monotonic() - began)


async def handshake_cpu_ms(
    pids: list[int],
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    count: int,
    idle_rate: float,
    parallel: int = 4,
) -> float:
    """Server CPU milliseconds per TLS handshake on ``host:port``: ``count`` connections that
    complete the handshake and close, ``parallel`` at a time."""
    if count < 1:
        raise ValueError("count must be at least 1")
    remaining = count

    async def one_after_another() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            _, writer = await asyncio.open_connection(host, port, ssl=context)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    began, before = time.monotonic(), _cpu(pids)
    await asyncio.gather(*(one_after_another() for _ in range(parallel)))
    # Let the server finish with the last connections before reading its clock.
    await asyncio.sleep(0.3)
    spent = _cpu(pids) - before - idle_rate * (time.monotonic() - began)
    return max(spent, 0.0) * 1000 / count
