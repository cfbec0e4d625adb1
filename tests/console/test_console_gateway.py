"""The console against a real gateway: embedded broker, TLS on loopback, SQLite registry, six
simulated sensors sending telemetry every second, and operator profiles made by
`fleetgate operator add`. The console talks through the real AdminClient."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import typer
from console_support import PROFILE_PASSPHRASE
from PySide6.QtCore import QByteArray
from PySide6.QtGui import QImage
from PySide6.QtWidgets import QDialog, QWidget
from typer.testing import CliRunner

from console.app import client_factory
from console.bridge import AdminBridge
from console.certs import ca_chain
from console.dialogs import ConfirmDialog, revoke_confirmation_text
from console.live import EventInbox
from console.window import MainWindow, user_settings
from gateway.admin.profile import load_profile
from gateway.cli.console_app import console_command
from gateway.store import IdentityState

pytestmark = pytest.mark.broker


def confirm_reason(reason: str | None) -> Callable[[QWidget, str, Sequence[str]], str | None]:
    return lambda parent, action, ids: reason


def type_the_confirmation(parent: QWidget, action: str, ids: Sequence[str]) -> str | None:
    """What an operator does in the revoke dialog: the button is locked until the count (or
    the id) is typed; then it is clicked."""
    dialog = ConfirmDialog(action, ids, parent)
    assert dialog.cancel_button.isDefault()
    assert dialog.confirmation_edit is not None and not dialog.confirm_button.isEnabled()
    dialog.confirmation_edit.setText(revoke_confirmation_text(ids))
    assert dialog.confirm_button.isEnabled()
    dialog.reason_edit.setText("lost in the field")
    dialog.confirm_button.click()
    accepted = dialog.result() == QDialog.DialogCode.Accepted
    dialog.deleteLater()
    return dialog.reason() if accepted else None


@pytest.fixture
def open_console(qtbot: Any, live_gateway: Any) -> Iterator[Callable[..., MainWindow]]:
    windows: list[MainWindow] = []

    def open_as(role: str, **kw: Any) -> MainWindow:
        profile = load_profile(live_gateway.profiles[role])
        bridge = AdminBridge(client_factory(profile, PROFILE_PASSPHRASE), EventInbox())
        window = MainWindow(bridge, ca_chain=ca_chain(profile.ca_pem), **kw)
        qtbot.addWidget(window)
        windows.append(window)
        window.show()
        with qtbot.waitSignal(window.fleet_loaded, timeout=15_000):
            bridge.start()
        return window

    yield open_as
    for window in windows:
        window.bridge.stop()
        window.close()


def test_the_table_fills_with_the_fleet_and_the_operators(qtbot, live_gateway, open_console):
    window = open_console("viewer")
    for device_id in live_gateway.devices:
        row = window.model.get(device_id)
        assert row is not None and row.kind == "device" and row.state == "active"
        assert row.connected and row.model == "TH-200" and row.cert_not_after is not None
    assert window.model.get("op-admin").kind == "operator"
    qtbot.waitUntil(lambda: "op-viewer (viewer)" in window.operator_label.text(), timeout=5000)
    assert "connected" in window.connection_label.text()


def test_a_quarantine_from_the_console_reaches_the_broker(qtbot, live_gateway, open_console):
    gateway = live_gateway.thread.gateway
    telemetry = live_gateway.thread.admin.telemetry
    target, witness = live_gateway.devices[0], live_gateway.devices[5]
    window = open_console("operator", confirm=confirm_reason("suspicious traffic"))
    window.select_identity(target)
    with qtbot.waitSignal(window.results_ready, timeout=15_000) as done:
        window.actions_by_name["quarantine"].trigger()
    [result] = done.args[1]
    assert result.ok and result.state == "quarantined"
    assert gateway.states(target) is IdentityState.QUARANTINED
    assert window.model.get(target).state == "quarantined"
    # The sensor keeps publishing telemetry; the broker drops it before the gateway sees it.
    time.sleep(0.3)
    quarantined_before = telemetry.rate(target).total
    witness_before = telemetry.rate(witness).total
    live_gateway.thread.wait_until(
        lambda: telemetry.rate(witness).total >= witness_before + 2, timeout=10
    )
    assert telemetry.rate(target).total == quarantined_before
    # The attention panel lists it, from the gateway's own answer.
    qtbot.waitUntil(
        lambda: target in window.attention.section_lines("quarantined"), timeout=10_000
    )


def test_revoke_needs_the_typed_confirmation_and_cuts_the_device(
    qtbot, live_gateway, open_console
):
    gateway = live_gateway.thread.gateway
    target = live_gateway.devices[1]
    window = open_console("admin", confirm=confirm_reason(None))
    window.select_identity(target)
    window.actions_by_name["revoke"].trigger()  # cancelled in the dialog
    qtbot.wait(300)
    assert gateway.states(target) is IdentityState.ACTIVE
    assert target in gateway.broker.connected()

    window.confirm = type_the_confirmation
    with qtbot.waitSignal(window.results_ready, timeout=15_000) as done:
        window.actions_by_name["revoke"].trigger()
    [result] = done.args[1]
    assert result.ok and result.state == "revoked"
    assert gateway.states(target) is IdentityState.REVOKED
    live_gateway.thread.wait_until(
        lambda: gateway.broker.connected().get(target) is None, timeout=10
    )
    qtbot.waitUntil(lambda: not window.model.get(target).connected, timeout=10_000)
    assert window.model.get(target).state == "revoked"


def test_a_viewers_revoke_is_refused_for_each_device_visibly_and_audited(
    qtbot, live_gateway, open_console
):
    gateway = live_gateway.thread.gateway
    targets = live_gateway.devices[2:4]
    window = open_console("viewer", confirm=type_the_confirmation)
    window.table.select_ids(targets)
    with qtbot.waitSignal(window.results_ready, timeout=15_000):
        window.act("revoke")
    rows = window.results_dialog.row_texts()
    assert sorted(r[0] for r in rows) == sorted(targets)
    assert {r[1] for r in rows} == {"forbidden"}
    assert window.results_dialog.isVisible()
    assert all(gateway.states(t) is IdentityState.ACTIVE for t in targets)
    # The refusal is in the audit trail, which a viewer may read.
    window.audit.actor.setText("operator:op-viewer")
    window.audit.action.setCurrentText("revoke")
    with qtbot.waitSignal(window.audit_loaded, timeout=10_000):
        window.audit.apply_button.click()
    records = window.audit.row_texts()
    assert records and records[0][2:4] == ["operator:op-viewer", "revoke"]
    assert records[0][5] == "rejected"
    assert "Chain verifies: ok" in window.audit.verification.text()


def test_a_device_connecting_and_leaving_updates_its_row_live(qtbot, live_gateway, open_console):
    window = open_console("viewer")
    stop = live_gateway.thread.new_stop()
    [newcomer] = live_gateway.thread.start_fleet(1, "live", stop)
    qtbot.waitUntil(
        lambda: (row := window.model.get(newcomer)) is not None and row.connected, timeout=20_000
    )
    assert window.model.get(newcomer).state == "active"
    live_gateway.thread.set_event(stop)
    qtbot.waitUntil(lambda: not window.model.get(newcomer).connected, timeout=20_000)


def test_a_new_certificate_is_announced_with_its_expiry_and_serial(live_gateway) -> None:
    """What lets a console update a renewed row in place rather than reload the fleet."""
    thread = live_gateway.thread
    issued: list[Any] = []

    def listen(event: Any) -> None:
        if event.kind == "certificate_issued":
            issued.append(event)

    thread.gateway.listeners.append(listen)
    stop = thread.new_stop()
    try:
        [newcomer] = thread.start_fleet(1, "issued", stop)
        thread.wait_until(lambda: any(e.subject == newcomer for e in issued), timeout=20)
    finally:
        thread.set_event(stop)
        thread.gateway.listeners.remove(listen)
    event = next(e for e in issued if e.subject == newcomer)
    [certificate] = [
        c for c in thread.gateway.store.certificates_for(newcomer) if c.status == "active"
    ]
    assert event.data == {
        "not_after": certificate.not_after.isoformat(),
        "serial": f"{certificate.serial:x}",
    }


def test_the_detail_pane_shows_chain_history_attestation_and_telemetry(
    qtbot, live_gateway, open_console
):
    target = live_gateway.devices[4]
    window = open_console("viewer")
    with qtbot.waitSignal(window.detail_loaded, timeout=10_000):
        window.select_identity(target)
    pane = window.detail
    chain = pane.certificate_rows()
    assert chain[0][0] == f"CN={target}" or target in chain[0][0]
    assert any(f"/device/{target}" in cell for cell in chain[0])
    assert [row[5] for row in chain[-2:]] == ["CA", "CA"]
    assert pane.attestation_labels["model"].text() == "TH-200"
    assert len(pane.attestation_labels["firmware_digest"].toolTip()) == 64
    assert any(row[2] == "enroll" for row in pane.history_rows())
    assert sum(pane.chart.counts) > 0


def test_fleetgate_console_screenshot_writes_a_png(tmp_path: Path, qapp, live_gateway) -> None:
    app = typer.Typer()
    app.command()(console_command)
    target = tmp_path / "shots" / "console.png"
    # The operator's own layout, which a screenshot (forced to 1600 x 900) must not replace.
    mine = user_settings()
    mine.setValue("window/geometry", QByteArray(b"the operator's geometry"))
    mine.sync()
    result = CliRunner().invoke(
        app,
        [
            "--profile",
            str(live_gateway.profiles["viewer"]),
            "--passphrase-file",
            str(live_gateway.passphrase_file),
            "--screenshot",
            str(target),
        ],
    )
    assert result.exit_code == 0, result.output
    image = QImage(str(target))
    assert not image.isNull()
    assert image.width() >= 800 and image.height() >= 500
    settings = user_settings()
    assert settings.value("window/geometry") == QByteArray(b"the operator's geometry")
    assert settings.value("window/state") is None
