"""Entry point of the console: profile, passphrase, admin client, main window.

``run_console`` is what ``fleetgate console`` calls. With ``screenshot`` it opens the window,
waits until the fleet, the attention list and one device's detail are loaded, saves the window
as a PNG and returns: that works offscreen (``QT_QPA_PLATFORM=offscreen``), with no display.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from console.bridge import AdminBridge, ConnectionCallback, EventCallback
from console.certs import ca_chain
from console.dialogs import ask_passphrase
from console.errors import ConsoleError, ConsoleReason
from console.live import EventInbox
from console.theme import apply_dark_theme
from console.window import SETTINGS_APPLICATION, SETTINGS_ORGANISATION, MainWindow
from gateway.admin.client import AdminClient
from gateway.admin.profile import Profile, ProfileError, load_profile
from pki.clock import Clock
from pki.errors import PkiError
from pki.keys import decrypt_private_key

PROFILE_ENV = "FLEETGATE_PROFILE"
PROFILE_FILE_NAME = "console.json"
PASSPHRASE_ATTEMPTS = 3
SCREENSHOT_TIMEOUT_S = 60.0
# After the fleet is in, the detail of one device and the attention list make the picture; if
# they do not come within this, the screenshot is taken without them.
SCREENSHOT_SETTLE_MS = 4000
SCREENSHOT_WIDTH = 1600
SCREENSHOT_HEIGHT = 900


def default_profile_path() -> Path:
    """``$FLEETGATE_PROFILE``, else ``$XDG_CONFIG_HOME/fleetgate/console.json``
    (``~/.config/fleetgate/console.json``)."""
    explicit = os.environ.get(PROFILE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "fleetgate" / PROFILE_FILE_NAME


def read_passphrase_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConsoleError(
            ConsoleReason.PASSPHRASE_MISSING, f"{path}: {exc.strerror or exc}"
        ) from None
    passphrase = data.rstrip(b"\r\n")
    if not passphrase:
        raise ConsoleError(ConsoleReason.PASSPHRASE_MISSING, f"{path} is empty")
    return passphrase


def passphrase_opens(profile: Profile, passphrase: bytes) -> bool:
    try:
        decrypt_private_key(profile.encrypted_key_pem, passphrase)
    except (PkiError, TypeError, ValueError):
        return False
    return True


def client_factory(profile: Profile, passphrase: bytes) -> Callable[..., Any]:
    def build(on_event: EventCallback, on_connection: ConnectionCallback) -> AdminClient:
        return AdminClient(profile, passphrase, on_event=on_event, on_connection=on_connection)

    return build


class Screenshot:
    """Saves the window once it shows a loaded fleet, then ends the event loop."""

    def __init__(self, window: MainWindow, path: Path, app: QApplication, timeout_s: float):
        self.window = window
        self.path = path
        self.app = app
        self.saved = False
        self.error: str | None = None
        self._waiting = {"detail", "attention"}
        window.fleet_loaded.connect(self._fleet_loaded)
        window.detail_loaded.connect(lambda _id: self._arrived("detail"))
        window.attention_loaded.connect(lambda: self._arrived("attention"))
        self._settle = QTimer(window)
        self._settle.setSingleShot(True)
        self._settle.setInterval(SCREENSHOT_SETTLE_MS)
        self._settle.timeout.connect(self._take)
        self._deadline = QTimer(window)
        self._deadline.setSingleShot(True)
        self._deadline.setInterval(int(timeout_s * 1000))
        self._deadline.timeout.connect(self._give_up)
        self._deadline.start()
        self._fleet_in = False

    def _fleet_loaded(self, total: int) -> None:
        if self._fleet_in:
            return
        self._fleet_in = True
        # A window larger than the screen is shrunk when shown (the offscreen screen is 800 px
        # wide); resized once shown, it keeps the size, and a picture has the same size always.
        self.window.resize(SCREENSHOT_WIDTH, SCREENSHOT_HEIGHT)
        self.window.default_dock_sizes()
        model = self.window.model
        # A live device (not an operator) in the detail pane shows what the console is for.
        devices = sorted(
            (r for r in model.visible_rows() if r.kind == "device"),
            key=lambda r: (not r.connected, r.state != "active"),
        )
        if devices:
            self.window.select_identity(devices[0].id)
        else:
            self._waiting.discard("detail")
        self._settle.start()
        self._arrived("")

    def _arrived(self, what: str) -> None:
        self._waiting.discard(what)
        if self._fleet_in and not self._waiting:
            # One more turn of the loop so the last answer is painted.
            QTimer.singleShot(100, self._take)

    def _take(self) -> None:
        if self.saved:
            return
        self.saved = True
        self._settle.stop()
        self._deadline.stop()
        self.window.model.tick()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.window.grab().save(str(self.path), "PNG"):
            self.error = f"could not write {self.path}"
        self.app.exit(0 if self.error is None else 1)

    def _give_up(self) -> None:
        if self.saved:
            return
        self.error = ConsoleError(
            ConsoleReason.SCREENSHOT_TIMEOUT, "the fleet did not load in time"
        ).detail
        self.app.exit(1)


def run_console(
    profile_path: Path | None = None,
    *,
    passphrase_file: Path | None = None,
    screenshot: Path | None = None,
    clock: Clock | None = None,
    settings: QSettings | None = None,
    screenshot_timeout: float = SCREENSHOT_TIMEOUT_S,
    report: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> int:
    """Run the console until its window closes; returns the process exit code."""
    path = profile_path or default_profile_path()
    try:
        profile = load_profile(path)
    except ProfileError as exc:
        report(f"cannot use the profile {path}: {exc.reason}: {exc.detail}")
        return 2
    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(sys.argv[:1])
    app.setOrganizationName(SETTINGS_ORGANISATION)
    app.setApplicationName(SETTINGS_APPLICATION)
    apply_dark_theme(app)

    passphrase = _passphrase(profile, passphrase_file, report)
    if passphrase is None:
        return 2
    bridge = AdminBridge(client_factory(profile, passphrase), EventInbox())
    window = MainWindow(
        bridge,
        clock=clock,
        settings=settings,
        ca_chain=ca_chain(profile.ca_pem),
        title=f"Fleetgate console — {profile.name} @ {profile.host}:{profile.port}",
        # A screenshot is taken at a forced size in the default layout; the operator's own
        # layout is neither used for it nor overwritten by it.
        remember_layout=screenshot is None,
    )
    shooter = (
        Screenshot(window, screenshot, app, screenshot_timeout) if screenshot is not None else None
    )
    if shooter is None:
        bridge.failed.connect(
            lambda message: QMessageBox.warning(window, "Fleetgate console", message)
        )
    window.show()
    bridge.start()
    try:
        code = app.exec()
    finally:
        bridge.stop()
        window.close()
        window.deleteLater()
    if shooter is not None:
        if shooter.error is not None:
            report(f"screenshot failed: {shooter.error}")
            return 1
        report(f"screenshot saved to {screenshot}")
    return code


def _passphrase(
    profile: Profile, passphrase_file: Path | None, report: Callable[[str], None]
) -> bytes | None:
    if passphrase_file is not None:
        try:
            passphrase = read_passphrase_file(passphrase_file)
        except ConsoleError as exc:
            report(f"cannot read the passphrase: {exc.detail}")
            return None
        if not passphrase_opens(profile, passphrase):
            report("wrong passphrase for this profile")
            return None
        return passphrase
    for _ in range(PASSPHRASE_ATTEMPTS):
        asked = ask_passphrase(None, profile.name)
        if asked is None:
            return None
        if passphrase_opens(profile, asked):
            return asked
        QMessageBox.warning(None, "Fleetgate console", "Wrong passphrase for this profile.")
    report("wrong passphrase for this profile")
    return None


__all__ = ["default_profile_path", "run_console"]
