"""One client's storm of enrollment requests, in a process of its own.

A flood measured from inside the process of the devices it is meant to slow down would slow
them by taking their own CPU: the storm runs in ``python -m simulators.storm`` and reports its
counts when told to stop (a line on stdin, or EOF).

The storm is hello after hello, each with a fresh request id and a real birth certificate
chain, ``parallel`` publishes in flight: for each one that gets through, the gateway verifies a
chain and writes a nonce, the most it does for a request that needs no key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import aiomqtt

from gateway.protocol import topics
from gateway.protocol.codec import decode_response, encode
from gateway.protocol.messages import Error, Hello
from simulators.tls import NODELAY, shared_server_auth_context

__all__ = ["StormProcess", "StormSpec", "answer_kind", "storm"]


def answer_kind(payload: bytes) -> str:
    """An error answer's reason code, or the answer's type."""
    try:
        answer = decode_response(payload)
    except Exception:
        return "undecodable"
    return answer.reason if isinstance(answer, Error) else answer.TYPE


@dataclass(frozen=True)
class StormSpec:
    host: str
    port: int  # the enrollment listener
    ca_pem: str
    device_id: str
    chain: tuple[str, ...]  # base64 DER: birth certificate, then intermediates
    parallel: int = 32
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if not self.chain:
            raise ValueError("a hello needs the birth certificate chain")


async def storm(spec: StormSpec, stop: asyncio.Event, counts: Counter[str]) -> None:
    """Send hellos until ``stop``; count ``sent`` and every answer by its kind."""
    chain = tuple(base64.b64decode(c) for c in spec.chain)
    topic = topics.enroll_request(spec.device_id)
    async with aiomqtt.Client(
        spec.host,
        spec.port,
        identifier=spec.device_id,
        tls_context=shared_server_auth_context(spec.ca_pem.encode()),
        timeout=spec.timeout,
        max_queued_outgoing_messages=100_000,
        socket_options=NODELAY,
    ) as client:
        await client.subscribe(topics.enroll_response(spec.device_id), qos=1)

        async def answers() -> None:
            async for message in client.messages:
                payload = message.payload
                counts[answer_kind(payload if isinstance(payload, bytes) else b"")] += 1

        async def sender() -> None:
            while not stop.is_set():
                hello = Hello(id=secrets.token_urlsafe(12), chain=chain)
                await client.publish(topic, encode(hello), qos=1)
                counts["sent"] += 1

        reader = asyncio.create_task(answers())
        try:
            await asyncio.gather(*(sender() for _ in range(spec.parallel)))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


class StormProcess:
    """``await start(spec)``, later ``await stop()`` for the counts."""

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None

    async def start(self, spec: StormSpec) -> None:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators.storm",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(asdict(spec)).encode() + b"\n")

    async def stop(self, timeout: float = 30.0) -> dict[str, int]:
        process = self._process
        if process is None:
            return {}
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(b"stop\n"), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return {}
        lines = stdout.decode().strip().splitlines()
        counts: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        return {str(k): int(v) for k, v in counts.items()}


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    data = json.loads(first)
    spec = StormSpec(**{**data, "chain": tuple(data["chain"])})
    stop = asyncio.Event()
    counts: Counter[str] = Counter()

    async def until_told() -> None:
        await reader.readline()  # "stop", or EOF when the driver went away
        stop.set()

    watcher = asyncio.create_task(until_told())
    try:
        await storm(spec, stop, counts)
    except aiomqtt.MqttError as exc:
        counts["connection_lost"] += 1
        print(f"storm ended: {exc}", file=sys.stderr)
    finally:
        watcher.cancel()
    sys.stdout.write(json.dumps(dict(counts)) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(_main())
