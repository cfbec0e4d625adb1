"""The gateway under test, in a process of its own, controlled over JSON lines.

``GatewayProcess`` (the benchmark's side) starts ``python -m gateway.bench.server``; the child
runs an ordinary ``gateway.service.Gateway`` on the given home and broker and answers:

    -> {"home": ..., "broker": ..., "tuning": {...}}
    <- {"ev": "ready", "pid", "broker_pid", "ports", "ca_pem"}
    -> {"op": "revoke" | "quarantine" | "release", "id": ...}
    <- {"ev": "done", "op", "id", "t0", "t1", "error"}   time.monotonic() around the call
    -> {"op": "metrics"}
    <- {"ev": "metrics", ...}
    -> {"op": "stop"}  (or EOF: the benchmark went away)

The operator actions are the service's own ``Gateway.revoke`` / ``quarantine``, which return
once the broker enforces the change: ``t1 - t0`` is the time to apply it.

``tuning`` exists to measure proposed changes to modules the benchmark does not own before they
are made (each key names one; see docs/benchmarks.md); a plain run passes none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.collector import CollectorPolicy

__all__ = ["TUNINGS", "GatewayProcess", "ServerError"]

TUNINGS = ("ssl_buffer_kb", "state_miss_seconds", "admit_batch", "gc_log", "collector")


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and theirs, from /proc (Linux)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            pending.append(child)
    return found


class ServerError(RuntimeError):
    """The gateway process did not start, or did not answer."""


class GatewayProcess:
    """The benchmark's handle on the gateway child process."""

    def __init__(
        self,
        home: Path,
        broker: str,
        *,
        tuning: dict[str, Any] | None = None,
        log_path: Path | None = None,
    ) -> None:
        unknown = set(tuning or {}) - set(TUNINGS)
        if unknown:
            raise ValueError(f"unknown tuning {sorted(unknown)}; known: {list(TUNINGS)}")
        self.home = home
        self.broker = broker
        self.tuning = dict(tuning or {})
        self.log_path = log_path
        self.pid = 0
        self.broker_pid: int | None = None
        self.ports: dict[str, int] = {}
        self.ca_pem = ""
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lock = asyncio.Lock()

    @property
    def server_pids(self) -> list[int]:
        """Every process doing the server's work: the gateway and whatever it started (the
        Mosquitto processes, on that broker), read afresh each time."""
        return [self.pid, *descendants(self.pid)]

    async def start(self, timeout: float = 60.0) -> None:
        stderr = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115  closed below
        try:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway.bench.server",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr if stderr is not None else asyncio.subprocess.DEVNULL,
            )
        finally:
            if stderr is not None:
                stderr.close()
        self._reader = asyncio.create_task(self._read())
        self._send({"home": str(self.home), "broker": self.broker, "tuning": self.tuning})
        ready = await self._reply(timeout)
        if ready.get("ev") != "ready":
            await self.kill()
            raise ServerError(f"gateway did not start: {ready.get('error', ready)}")
        self.pid = int(ready["pid"])
        self.broker_pid = ready.get("broker_pid")
        self.ports = {k: int(v) for k, v in ready["ports"].items()}
        self.ca_pem = str(ready["ca_pem"])

    async def act(self, op: str, identity_id: str, timeout: float = 30.0) -> tuple[float, float]:
        """Revoke, quarantine or release ``identity_id``; returns (t0, t1), time.monotonic()
        taken in the gateway just before the call and just after it returned."""
        if op not in ("revoke", "quarantine", "release"):
            raise ValueError(f"unknown operation {op!r}")
        async with self._lock:
            self._send({"op": op, "id": identity_id})
            reply = await self._reply(timeout)
        if reply.get("error"):
            raise ServerError(f"{op} {identity_id}: {reply['error']}")
        return float(reply["t0"]), float(reply["t1"])

    async def metrics(self, timeout: float = 10.0) -> dict[str, Any]:
        async with self._lock:
            self._send({"op": "metrics"})
            return await self._reply(timeout)

    async def stop(self, timeout: float = 30.0) -> None:
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ConnectionError):
            self._send({"op": "stop"})
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            await self.kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def kill(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _send(self, message: dict[str, Any]) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise ConnectionError("the gateway process is not running")
        process.stdin.write(json.dumps(message).encode() + b"\n")

    async def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._replies.get(), timeout)
        except TimeoutError:
            raise ServerError(f"no answer from the gateway within {timeout} s") from None

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        while line := await stdout.readline():
            await self._replies.put(json.loads(line))
        ended = f"the gateway process ended (log: {self.log_path})"
        await self._replies.put({"ev": "exit", "error": ended})


# -- the gateway side --------------------------------------------------------------------------


def _apply_tuning(tuning: dict[str, Any]) -> None:
    """Proposed changes to other modules, applied to this process only, to measure them."""
    size = tuning.get("ssl_buffer_kb")
    if size is not None:
        # asyncio's TLS reads into a buffer of this size per connection (256 KiB by default).
        import asyncio.sslproto

        asyncio.sslproto.SSLProtocol.max_size = int(size) * 1024
    miss_seconds = tuning.get("state_miss_seconds")
    if miss_seconds is not None:
        _remember_unknown_identities(float(miss_seconds))
    if tuning.get("admit_batch"):
        _admit_in_batches()
    if tuning.get("gc_log"):
        _log_full_collections()


def _log_full_collections() -> None:
    """Report every full (generation 2) garbage collection and how long it stopped the
    process, on stderr (the benchmark's gateway log)."""
    import gc

    started: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            seconds = time.perf_counter() - started[0]
            print(
                f"gc: full collection {seconds * 1000:.0f} ms, {info.get('collected')} collected",
                file=sys.stderr,
                flush=True,
            )

    gc.callbacks.append(timed)


def _remember_unknown_identities(seconds: float) -> None:
    """``IdentityStates`` asks the registry on every ACL check about an identity it does not
    know, on the broker's event loop; an enrollee is such an identity for its whole
    enrollment. Remember a miss for ``seconds`` (a state set in this process still wins at
    once: ``set`` fills the known states, which are looked at first)."""
    from gateway import service

    lookup = service.IdentityStates.__call__
    misses: dict[str, float] = {}

    def remembering(self: Any, identity_id: str) -> Any:
        known = self._states.get(identity_id)
        if known is not None:
            return known
        now = time.monotonic()
        if misses.get(identity_id, 0.0) > now:
            return None
        state = lookup(self, identity_id)
        if state is None:
            if len(misses) > 100_000:
                misses.clear()
            misses[identity_id] = now + seconds
        return state

    service.IdentityStates.__call__ = remembering  # type: ignore[method-assign]


def _admit_in_batches() -> None:
    """``Gateway._admit_to_broker`` tells the broker about each certified device on its own: on
    Mosquitto one ``$CONTROL`` message per device, and the dynamic-security plugin rewrites
    its whole JSON file for each message (O(devices) per admission). Admissions that arrive
    while one is being sent wait and go together in the next message."""
    from gateway import service

    waiting: dict[int, list[tuple[str, asyncio.Future[None]]]] = {}
    flushing: dict[int, asyncio.Task[None]] = {}

    async def flush(gateway: Any) -> None:
        key = id(gateway)
        while waiting.get(key):
            batch, waiting[key] = waiting[key], []
            try:
                await gateway.broker.sync(
                    [service.Admitted(i) for i, _ in batch], certified=True
                )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, future in batch:
                if not future.done():
                    future.set_result(None)
        flushing.pop(key, None)

    async def admit(self: Any, identity_id: str) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.setdefault(id(self), []).append((identity_id, future))
        if id(self) not in flushing:
            flushing[id(self)] = asyncio.ensure_future(flush(self))
        await future

    service.Gateway._admit_to_broker = admit  # type: ignore[method-assign]


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, default=str) + "\n")
    sys.stdout.flush()


async def _serve() -> None:
    from gateway.config import load_settings
    from gateway.service import Gateway

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return
    setup = json.loads(first)
    _apply_tuning(setup.get("tuning") or {})
    settings = load_settings(Path(setup["home"]))
    gateway = Gateway(settings, broker_kind=setup["broker"])
    try:
        await gateway.start()
    except Exception as exc:
        _emit({"ev": "error", "error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(Exception):
            await gateway.stop()
        return
    # as `fleetgate run` does; --tuning collector=0 measures without it
    collector = CollectorPolicy()
    if str((setup.get("tuning") or {}).get("collector", "1")) != "0":
        collector.install(loop)
    process = getattr(gateway.broker, "process", None)
    _emit(
        {
            "ev": "ready",
            "pid": os.getpid(),
            "broker_pid": getattr(process, "pid", None),
            "ports": {
                "enrollment": gateway.ports.enrollment,
                "operational": gateway.ports.operational,
                "internal": gateway.ports.internal,
            },
            "ca_pem": gateway.ca_chain_pem().decode(),
        }
    )
    actions: dict[str, Callable[[str], Any]] = {
        "revoke": lambda i: gateway.revoke(i, actor="bench", reason="benchmark"),
        "quarantine": lambda i: gateway.quarantine(i, actor="bench", reason="benchmark"),
        "release": lambda i: gateway.release(i, actor="bench"),
    }
    try:
        while line := await reader.readline():
            message = json.loads(line)
            op = message.get("op")
            if op == "stop":
                break
            if op == "metrics":
                _emit({"ev": "metrics", **_metrics(gateway), "collector": _collector(collector)})
            elif op in actions:
                error = ""
                t0 = time.monotonic()
                try:
                    await actions[op](message["id"])
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                t1 = time.monotonic()
                _emit({"ev": "done", "op": op, "id": message["id"], "t0": t0, "t1": t1,
                       "error": error})
    finally:
        collector.uninstall()
        await gateway.stop()


def _collector(policy: CollectorPolicy) -> dict[str, Any]:
    return {
        **policy.metrics,
        "longest_pause_ms": round(policy.longest_pause_ms, 1),
        "frozen_objects": policy.frozen_objects,
    }


def _metrics(gateway: Any) -> dict[str, Any]:
    transport = gateway.transport
    return {
        "enrollment": dict(gateway.enrollment.metrics),
        "gateway": dict(gateway.metrics),
        "broker": dict(getattr(gateway.broker, "metrics", {}) or {}),
        "transport": {
            "handled": getattr(transport, "handled", 0),
            "handler_errors": getattr(transport, "handler_errors", 0),
            **(getattr(transport, "stats", {}) or {}),
        },
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("amqtt", "transitions", "aiomqtt"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
