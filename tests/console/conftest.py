"""Console fixtures: settings in a temp folder, a scripted admin client, and a real gateway
running in a background thread with its own asyncio loop (the console's network thread and
the UI thread are the test's; the gateway must not share either)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import tomllib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import tomli_w
from console_support import NOW, PROFILE_PASSPHRASE, Handler, ScriptedClient, wire_row
from PySide6.QtCore import QSettings
from typer.testing import CliRunner

from console.bridge import AdminBridge
from console.live import EventInbox
from console.rows import DeviceRow
from console.synthetic import synthetic_rows
from console.window import MainWindow
from gateway.admin import AdminService, attach_admin
from gateway.cli import operator as operator_cli
from gateway.config import CONFIG_NAME, Settings, load_settings
from gateway.home import init_home
from gateway.service import Gateway
from pki.clock import FakeClock
from simulators.factory import trust_factory
from simulators.fleet import FleetOptions, device_ids, run_fleet

T = TypeVar("T")


@pytest.fixture(autouse=True)
def qt_settings(tmp_path: Path) -> Iterator[Path]:
    """Window layout goes to a temp folder, never to the real ~/.config."""
    folder = tmp_path / "qt-settings"
    folder.mkdir()
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    for settings_format in (QSettings.Format.IniFormat, QSettings.Format.NativeFormat):
        QSettings.setPath(settings_format, QSettings.Scope.UserScope, str(folder))
    yield folder


@pytest.fixture(scope="session")
def fleet_100k() -> list[DeviceRow]:
    return synthetic_rows(100_000, NOW)


@dataclass
class ScriptedConsole:
    window: MainWindow
    client: ScriptedClient
    rows: list[DeviceRow]
    clock: FakeClock


@pytest.fixture
def scripted_console(qtbot: Any) -> Callable[..., ScriptedConsole]:
    """``make(rows, handlers=..., confirm=...)``: a main window over a scripted client, with
    the fleet loaded."""
    made: list[ScriptedConsole] = []

    def make(
        rows: list[DeviceRow] | None = None, handlers: dict[str, Handler] | None = None, **kw: Any
    ) -> ScriptedConsole:
        rows = rows if rows is not None else synthetic_rows(40, NOW)
        defaults: dict[str, Handler] = {
            "whoami": lambda a: {"operator": "alice", "role": "admin"},
            "list_identities": lambda a: {
                "identities": [wire_row(r) for r in rows],
                "total": len(rows),
            },
            "attention": lambda a: {
                "pending": [],
                "expiring": [],
                "quarantined": [],
                "events": [],
                "unknown": [],
            },
            "audit": lambda a: {"records": [], "total": 0, "verified": {"ok": True}},
            "get_identity": lambda a: {**wire_row(next(r for r in rows if r.id == a["id"]))},
        }
        defaults.update(handlers or {})
        holder: dict[str, ScriptedClient] = {}

        def factory(on_event: Any, on_connection: Any) -> ScriptedClient:
            holder["client"] = ScriptedClient(defaults, on_event, on_connection)
            return holder["client"]

        clock = FakeClock(NOW)
        bridge = AdminBridge(factory, EventInbox())
        window = MainWindow(bridge, clock=clock, **kw)
        qtbot.addWidget(window)
        window.show()
        with qtbot.waitSignal(window.fleet_loaded, timeout=5000):
            bridge.start()
        console = ScriptedConsole(window, holder["client"], rows, clock)
        made.append(console)
        return console

    yield make
    for console in made:
        console.window.bridge.stop()
        console.window.close()


# -- a real gateway in a background thread -----------------------------------------------------


def write_home(home: Path, **overrides: Any) -> Settings:
    """A fresh gateway home on free ports, ``overrides`` merged into fleetgate.toml tables."""
    init_home(home)
    path = home / CONFIG_NAME
    data = tomllib.loads(path.read_text())
    data["broker"]["enrollment_port"] = 0
    data["broker"]["operational_port"] = 0
    for table, values in overrides.items():
        data.setdefault(table, {}).update(values)
    path.write_text(tomli_w.dumps(data))
    return load_settings(home)


class GatewayThread:
    """A gateway with the admin API on its own loop in a daemon thread, and simulated fleets
    running on that loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.factory = trust_factory(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        self._fleets: list[asyncio.Future[Any]] = []
        self.gateway: Gateway = self.run(self._start())
        self.admin: AdminService = attach_admin(self.gateway)

    async def _start(self) -> Gateway:
        self._stop = asyncio.Event()
        gateway = Gateway(self.settings)
        attach_admin(gateway)
        await gateway.start()
        return gateway

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_fleet(self, devices: int, batch: str, stop: asyncio.Event | None = None) -> list[str]:
        """Start ``devices`` simulated sensors (telemetry every second); returns their ids."""
        ports = self.gateway.ports
        options = FleetOptions(
            devices=devices,
            host="127.0.0.1",
            enrollment_port=ports.enrollment,
            operational_port=ports.operational,
            ca_pem=self.gateway.ca_chain_pem(),
            telemetry_interval=1.0,
            progress=False,
            batch=batch,
        )
        future = asyncio.run_coroutine_threadsafe(
            run_fleet(options, self.factory, stop or self._stop), self.loop
        )
        self._fleets.append(future)
        return device_ids(batch, devices)

    def new_stop(self) -> asyncio.Event:
        async def make() -> asyncio.Event:
            return asyncio.Event()

        return self.run(make())

    def set_event(self, event: asyncio.Event) -> None:
        self.loop.call_soon_threadsafe(event.set)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        deadline = self.loop.time() + timeout
        while not predicate():
            if self.loop.time() > deadline:
                raise AssertionError(f"not true within {timeout} s: {predicate}")
            threading.Event().wait(0.05)

    def add_operator(self, tmp: Path, name: str, role: str) -> Path:
        """A console profile made by `fleetgate operator add`."""
        passphrase_file = tmp / "profile-passphrase"
        passphrase_file.write_bytes(PROFILE_PASSPHRASE + b"\n")
        out = tmp / f"{name}.profile.json"
        result = CliRunner().invoke(
            operator_cli.app,
            [
                "add",
                name,
                "--role",
                role,
                "--home",
                str(self.settings.home),
                "--out",
                str(out),
                "--passphrase-file",
                str(passphrase_file),
                "--port",
                str(self.gateway.ports.operational),
                "--host",
                "127.0.0.1",
            ],
        )
        assert result.exit_code == 0, result.output
        return out

    def close(self) -> None:
        self.set_event(self._stop)
        for future in self._fleets:
            # A sensor in the middle of a reconnect can take seconds to notice the stop; the
            # test is over, so it is cancelled rather than waited for.
            with contextlib.suppress(Exception):
                future.result(1)
            future.cancel()
        with contextlib.suppress(Exception):
            self.run(self.gateway.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class LiveGateway:
    thread: GatewayThread
    devices: list[str]
    profiles: dict[str, Path]
    passphrase_file: Path


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    """One real gateway per test module: six sensors enrolled and sending telemetry every
    second, and a profile for each role."""
    tmp = tmp_path_factory.mktemp("gateway")
    thread = GatewayThread(write_home(tmp / "home"))
    try:
        devices = thread.start_fleet(6, "fleet")
        profiles = {role: thread.add_operator(tmp, f"op-{role}", role) for role in (
            "viewer", "operator", "admin"
        )}
        broker = thread.gateway.broker
        assert broker is not None

        def operational() -> bool:
            # An enrolling sensor is connected too, as an "enrollee" on the other listener.
            sessions = broker.connected()
            return all(d in sessions and sessions[d].kind == "device" for d in devices)

        thread.wait_until(operational, timeout=30)
        yield LiveGateway(thread, devices, profiles, tmp / "profile-passphrase")
    finally:
        thread.close()
