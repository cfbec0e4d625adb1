"""Running ``mosquitto -c <conf>`` as a child process: start and wait for its listeners,
restart it with backoff if it dies, reload on SIGHUP (the CRL), stop with SIGTERM then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.mosquitto.errors import MosquittoError, MosquittoReason

__all__ = [
    "MosquittoProcess",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
]

log = logging.getLogger(__name__)

PLUGIN_NAME = "mosquitto_dynamic_security.so"
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
_BINARY_FALLBACKS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
_PLUGIN_GLOBS = (
    "/usr/lib/*/" + PLUGIN_NAME,  # Debian multiarch: /usr/lib/x86_64-linux-gnu/...
    "/usr/lib/" + PLUGIN_NAME,
    "/usr/lib64/" + PLUGIN_NAME,
    "/usr/local/lib/" + PLUGIN_NAME,
    "/usr/lib/mosquitto/" + PLUGIN_NAME,
)
# Logged once every listener is bound, just before the main loop starts.
_RUNNING = re.compile(r"mosquitto version \S+ running")
# A broker that ran at least this long before dying restarts at once; quicker deaths back off.
_STABLE_SECONDS = 10.0


def find_mosquitto(explicit: str | Path | None = None) -> Path:
    """The broker binary: ``explicit``, else ``mosquitto`` on PATH, else Debian's /usr/sbin."""
    candidates: list[str] = []
    if explicit is not None:
        candidates.append(str(explicit))
    else:
        found = shutil.which("mosquitto")
        if found:
            candidates.append(found)
        candidates.extend(_BINARY_FALLBACKS)
    for candidate in candidates:
        path = Path(candidate)
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise MosquittoError(
        MosquittoReason.MOSQUITTO_MISSING,
        f"no executable mosquitto at {', '.join(candidates)} (Debian: apt-get install mosquitto)",
    )


def _from_dpkg() -> list[Path]:
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "mosquitto"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [Path(line) for line in listing.splitlines() if line.endswith("/" + PLUGIN_NAME)]


def find_dynsec_plugin(explicit: str | Path | None = None) -> Path:
    """The dynamic-security plugin: ``explicit``, else where the mosquitto package put it
    (``dpkg -L``; the directory depends on the architecture), else the usual library dirs."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = _from_dpkg()
        for pattern in _PLUGIN_GLOBS:
            candidates.extend(sorted(Path("/").glob(pattern.lstrip("/"))))
    for path in candidates:
        if path.is_file():
            return path
    raise MosquittoError(
        MosquittoReason.PLUGIN_MISSING,
        f"{PLUGIN_NAME} not found (looked at {', '.join(map(str, candidates)) or 'nothing'})",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Another process may take it before Mosquitto binds
    it; ``MosquittoBroker`` then picks again."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> str:
    """What was appended to ``path`` after ``offset`` (all of it if the file was replaced)."""
    try:
        with path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) < offset:
                offset = 0
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def _connect_host(host: str) -> str:
    # A listener bound to every address is reached on loopback.
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class MosquittoProcess:
    """One supervised broker process. ``on_restart`` runs after each automatic restart (the
    sessions it had are gone)."""

    def __init__(
        self,
        config_path: Path,
        *,
        listeners: Sequence[tuple[str, int]],
        binary: Path | None = None,
        output_path: Path | None = None,
        log_path: Path | None = None,
        on_restart: Callable[[], None] | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        max_backoff: float = 10.0,
    ) -> None:
        if not listeners:
            raise ValueError("at least one listener to wait for is needed")
        self._config_path = config_path
        self._listeners = [(_connect_host(host), int(port)) for host, port in listeners]
        self._binary = binary
        self._output_path = output_path
        self._log_path = log_path
        self._on_restart = on_restart
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._max_backoff = max_backoff
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        """Start the broker and return once every listener accepts connections."""
        if self._supervisor is not None:
            raise RuntimeError("already started")
        self._stopping = False
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="mosquitto-supervisor")

    async def _spawn(self) -> None:
        binary = self._binary or find_mosquitto()
        log_offset = _size(self._log_path)
        output = (
            open(self._output_path, "ab")  # noqa: SIM115  handed to the child, closed below
            if self._output_path is not None
            else subprocess.DEVNULL
        )
        try:
            process = await asyncio.create_subprocess_exec(
                str(binary),
                "-c",
                str(self._config_path),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                # its own session: a Ctrl-C meant for the gateway does not kill the broker
                # before the gateway has stopped using it
                start_new_session=True,
            )
        finally:
            if not isinstance(output, int):
                output.close()
        self._process = process
        try:
            await self._wait_running(process, log_offset)
            await self._wait_listening(process)
        except BaseException:
            await self._terminate(process)
            raise

    def _check_alive(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            raise MosquittoError(
                MosquittoReason.START_FAILED,
                f"mosquitto exited with {process.returncode}:\n"
                f"{_tail(self._output_path)}\n{_tail(self._log_path)}".rstrip(),
            )

    async def _wait_running(self, process: asyncio.subprocess.Process, offset: int) -> None:
        """Wait for the broker's "mosquitto version ... running" line, which it logs once every
        listener is bound. An open port alone proves nothing: when a listener's port is held
        by another process, connecting to it succeeds while this broker exits with "Address
        already in use"."""
        if self._log_path is None:
            return
        deadline = time.monotonic() + self._start_timeout
        while True:
            self._check_alive(process)
            if _RUNNING.search(_read_from(self._log_path, offset)) is not None:
                return
            if time.monotonic() > deadline:
                raise MosquittoError(
                    MosquittoReason.START_FAILED,
                    f"mosquitto did not report running within {self._start_timeout} s:\n"
                    f"{_tail(self._log_path)}".rstrip(),
                )
            await asyncio.sleep(0.02)

    async def _wait_listening(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self._start_timeout
        waiting = list(self._listeners)
        while waiting:
            self._check_alive(process)
            host, port = waiting[0]
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            except (TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise MosquittoError(
                        MosquittoReason.START_FAILED,
                        f"port {host}:{port} did not open within {self._start_timeout} s",
                    ) from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            waiting.pop(0)

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            process = self._process
            if process is None:
                return
            started = time.monotonic()
            code = await process.wait()
            if self._stopping:
                return
            if time.monotonic() - started >= _STABLE_SECONDS:
                backoff = 0.5
            log.warning("mosquitto (pid %s) exited with %s; restarting in %.1f s",
                        process.pid, code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
            if self._stopping:
                return
            try:
                await self._spawn()
            except MosquittoError as exc:
                log.error("mosquitto restart failed: %s", exc)
                continue
            self.restarts += 1
            if self._on_restart is not None:
                try:
                    self._on_restart()
                except Exception:
                    log.exception("mosquitto restart callback failed")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its certificates and CRL (new handshakes only)."""
        process = self._process
        if process is None or process.returncode is not None:
            raise MosquittoError(MosquittoReason.NOT_RUNNING, "mosquitto is not running")
        process.send_signal(signal.SIGHUP)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), self._stop_timeout)
        except TimeoutError:
            log.warning("mosquitto (pid %s) ignored SIGTERM; killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``stop_timeout``; no restart afterwards."""
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        if self._process is not None:
            await self._terminate(self._process)
