"""The main window over a scripted admin client: what an operator sees and does."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from console_support import NOW, ScriptedError, wire_row
from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import QApplication

from console.bridge import DEFAULT_TIMEOUT
from console.models import COL_FIRMWARE
from console.rows import DeviceRow
from console.window import (
    ACTIONS,
    RELOAD_DELAY_MS,
    MainWindow,
    shortcut_list,
    user_settings,
)

# A window size of the operator's own, unlike the default 1600 x 900.
OPERATOR_SIZE = QSize(900, 560)


def has_operator_size(window: MainWindow) -> bool:
    """Restored, not the default: the offscreen screen is 800 px wide, and Qt narrows a
    restored window to fit it, though not below the window's minimum width (872 px)."""
    return (
        window.height() == OPERATOR_SIZE.height()
        and window.minimumSizeHint().width() <= window.width() <= OPERATOR_SIZE.width()
    )


def confirm_with(reason: str | None, seen: list[tuple[str, list[str]]]):
    def confirm(parent: Any, action: str, ids: Sequence[str]) -> str | None:
        seen.append((action, list(ids)))
        return reason

    return confirm


def quarantine_all(args: dict) -> dict:
    return {"results": [{"id": i, "ok": True, "state": "quarantined"} for i in args["ids"]]}


def test_the_table_fills_and_the_status_bar_shows_the_connection(scripted_console) -> None:
    console = scripted_console()
    window = console.window
    assert window.model.total == 40
    assert window.fleet.count_label.text() == "40 shown of 40"
    assert "connected" in window.connection_label.text()
    assert [op for op, _ in console.client.requests][:1] == ["list_identities"]


def test_the_fleet_is_given_longer_than_small_requests_to_arrive(scripted_console) -> None:
    """100k identities take seconds to list; the bridge's default would fail the first load."""
    console = scripted_console()
    assert console.client.timeouts["list_identities"] > DEFAULT_TIMEOUT
    assert console.client.timeouts["whoami"] == DEFAULT_TIMEOUT


def test_an_action_confirms_every_selected_id_then_shows_each_result(
    qtbot, scripted_console
) -> None:
    seen: list[tuple[str, list[str]]] = []
    console = scripted_console(
        handlers={"quarantine": quarantine_all}, confirm=confirm_with("maintenance", seen)
    )
    window = console.window
    window.fleet.search.setText("th-200")
    window.fleet.apply_filter()
    window.select_all()
    shown = [r.id for r in window.model.visible_rows()]
    with qtbot.waitSignal(window.results_ready, timeout=5000):
        window.actions_by_name["quarantine"].trigger()
    assert seen == [("quarantine", shown)]
    assert ("quarantine", {"ids": shown, "reason": "maintenance"}) in console.client.requests
    assert window.results_dialog is not None and window.results_dialog.isVisible()
    assert {r[0] for r in window.results_dialog.row_texts()} == set(shown)
    # The table shows the new state at once, before any event arrives.
    assert {window.model.get(i).state for i in shown} == {"quarantined"}


def test_cancel_sends_nothing(qtbot, scripted_console) -> None:
    seen: list[tuple[str, list[str]]] = []
    console = scripted_console(
        handlers={"revoke": quarantine_all}, confirm=confirm_with(None, seen)
    )
    window = console.window
    window.table.select_ids([console.rows[0].id])
    window.actions_by_name["revoke"].trigger()
    qtbot.wait(50)
    assert seen and not any(op == "revoke" for op, _ in console.client.requests)


def test_a_refused_request_shows_the_error_for_every_device(qtbot, scripted_console) -> None:
    def forbidden(args: dict) -> dict:
        raise ScriptedError("forbidden", "revoke needs the admin role; op-viewer is viewer")

    console = scripted_console(handlers={"revoke": forbidden}, confirm=confirm_with("x", []))
    window = console.window
    ids = [r.id for r in console.rows[:3]]
    window.table.select_ids(ids)
    with qtbot.waitSignal(window.results_ready, timeout=5000):
        window.act("revoke")
    rows = window.results_dialog.row_texts()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {r[1] for r in rows} == {"forbidden"}
    assert "needs the admin role" in rows[0][2]


def test_an_action_without_selection_asks_for_one(scripted_console) -> None:
    seen: list = []
    console = scripted_console(confirm=confirm_with("x", seen))
    console.window.table.clearSelection()
    console.window.act("quarantine")
    assert seen == []
    assert "Select" in console.window.statusBar().currentMessage()


def test_keyboard_ctrl_f_focuses_search_and_delete_asks_to_quarantine(
    qtbot, scripted_console
) -> None:
    seen: list[tuple[str, list[str]]] = []
    console = scripted_console(confirm=confirm_with(None, seen))
    window = console.window
    window.activateWindow()
    window.table.setFocus()
    qtbot.keyClick(window.table, Qt.Key.Key_F, Qt.KeyboardModifier.ControlModifier)
    assert QApplication.focusWidget() is window.fleet.search
    qtbot.keyClick(window.fleet.search, Qt.Key.Key_Escape)
    assert QApplication.focusWidget() is window.table
    window.table.select_ids([console.rows[5].id])
    qtbot.keyClick(window.table, Qt.Key.Key_Delete)
    qtbot.keyClick(window.table, Qt.Key.Key_Delete, Qt.KeyboardModifier.ShiftModifier)
    assert [action for action, _ in seen] == ["quarantine", "revoke"]


def test_every_action_shortcut_is_listed_in_help() -> None:
    listed = dict(shortcut_list())
    for spec in ACTIONS:
        assert spec.shortcut in listed
    assert "Ctrl+F" in listed and "Ctrl+A" in listed


def test_live_events_update_rows_in_place_without_losing_selection(
    qtbot, scripted_console
) -> None:
    console = scripted_console()
    window = console.window
    chosen = [r.id for r in console.rows[:3]]
    window.table.select_ids(chosen)
    offline = next(r for r in console.rows if not r.connected and r.state == "active")
    console.client.emit(
        {
            "kind": "connected",
            "subject": offline.id,
            "at": NOW.isoformat(),
            "data": {"kind": "device", "listener": "operational"},
        }
    )
    qtbot.waitUntil(lambda: window.model.get(offline.id).connected, timeout=3000)
    assert window.table.selected_ids() == sorted(chosen, key=window.model.position)


def test_an_unknown_identity_connecting_reloads_the_fleet(qtbot, scripted_console) -> None:
    rows = [DeviceRow(id="th-1", kind="device", state="active")]
    console = scripted_console(rows=rows)
    rows.append(DeviceRow(id="th-2", kind="device", state="active", connected=True))
    console.client.emit({"kind": "certificate_issued", "subject": "th-2", "at": NOW.isoformat()})
    qtbot.waitUntil(lambda: console.window.model.get("th-2") is not None, timeout=3000)
    assert console.window.model.total == 2


def test_a_renewal_moves_the_expiry_without_reloading_the_fleet(qtbot, scripted_console) -> None:
    console = scripted_console()
    window = console.window
    target = next(r for r in console.rows if r.cert_not_after is not None)
    renewed = target.cert_not_after + timedelta(days=30)
    console.client.emit(
        {
            "kind": "certificate_issued",
            "subject": target.id,
            "at": NOW.isoformat(),
            "data": {"not_after": renewed.isoformat(), "serial": "1f"},
        }
    )
    qtbot.waitUntil(lambda: window.model.get(target.id).cert_not_after == renewed, timeout=3000)
    qtbot.wait(RELOAD_DELAY_MS + 200)
    assert [op for op, _ in console.client.requests].count("list_identities") == 1


def test_selecting_a_row_loads_its_detail(qtbot, scripted_console) -> None:
    def detail(args: dict) -> dict:
        return {
            **wire_row(DeviceRow(id=args["id"], kind="device", state="active")),
            "attestation": {
                "manufacturer": "Acme Sensors",
                "model": "TH-200",
                "firmware_version": "1.4.2",
                "firmware_digest": "ab" * 32,
                "birth_fingerprint": "cd" * 32,
            },
            "certificates": [
                {
                    "serial": "1f",
                    "status": "active",
                    "subject": "CN=th-1",
                    "san": ["URI:spiffe://fleet.example/device/th-1"],
                    "not_before": "2026-03-01T11:00:00+00:00",
                    "not_after": "2026-03-01T13:00:00+00:00",
                }
            ],
            "history": [
                {"seq": 4, "at": NOW.isoformat(), "actor": "device:th-1", "action": "enroll",
                 "subject": args["id"], "outcome": "ok", "reasons": []},
            ],
            "telemetry": {"per_minute": [0, 3, 6, 12], "total": 40},
        }

    console = scripted_console(handlers={"get_identity": detail})
    window = console.window
    target = console.rows[7].id
    with qtbot.waitSignal(window.detail_loaded, timeout=5000) as loaded:
        window.select_identity(target)
    assert loaded.args == [target]
    pane = window.detail
    assert pane.title.text() == target
    digest = pane.attestation_labels["firmware_digest"]
    assert digest.toolTip() == "ab" * 32
    assert digest.text() == "abababababababab…abababab"
    assert pane.certificate_rows()[0][:3] == [
        "CN=th-1", "URI:spiffe://fleet.example/device/th-1", "1f"
    ]
    assert pane.history_rows()[0][1:3] == ["device:th-1", "enroll"]
    assert pane.chart.counts == (0, 3, 6, 12)


def test_a_detail_that_fails_to_load_says_why(qtbot, scripted_console) -> None:
    def missing(args: dict) -> dict:
        raise ScriptedError("not_found", f"no identity {args['id']!r}")

    console = scripted_console(handlers={"get_identity": missing})
    target = console.rows[2].id
    console.window.select_identity(target)
    qtbot.waitUntil(lambda: "not_found" in console.window.detail.status.text(), timeout=3000)


def test_attention_lists_what_waits_and_double_click_selects_it(qtbot, scripted_console) -> None:
    rows = [DeviceRow(id=f"th-{n}", kind="device", state="active") for n in range(5)]

    def attention(args: dict) -> dict:
        return {
            "pending": ["th-3"],
            "expiring": ["th-1"],
            "quarantined": [],
            "events": [{"kind": "clone", "subject": "th-2", "at": NOW.isoformat(),
                        "data": {"first": "10.0.0.1:5000", "second": "10.0.0.9:6000"}}],
            "unknown": [{"client_id": "rogue-7", "remote": "10.0.0.66:4000",
                         "reason": "not_enrolled", "count": 12,
                         "last_seen": NOW.isoformat(), "cert_issuer": "CN=Rogue"}],
        }

    console = scripted_console(rows=rows, handlers={"attention": attention})
    panel = console.window.attention
    qtbot.waitUntil(lambda: panel.total == 4, timeout=3000)
    assert panel.section_lines("pending") == ["th-3"]
    assert "clone th-2" in panel.section_lines("events")[0]
    unknown = panel.section_lines("unknown")[0]
    assert "rogue-7 from 10.0.0.66:4000: not_enrolled, 12 times" in unknown
    console.window.fleet.search.setText("th-1")
    console.window.fleet.apply_filter()
    panel.identity_activated.emit("th-3")  # hidden by the search: the filter gives way
    assert console.window.table.selected_ids() == ["th-3"]
    assert console.window.fleet.search.text() == ""


def test_the_audit_view_filters_and_shows_whether_the_chain_verifies(
    qtbot, scripted_console
) -> None:
    record = {"seq": 9, "at": NOW.isoformat(), "actor": "operator:alice", "action": "quarantine",
              "subject": "th-1", "outcome": "ok", "reasons": []}

    def audit(args: dict) -> dict:
        if args.get("actor") == "operator:mallory":
            return {"records": [], "verified": {"ok": False, "problem": "record 7 was altered",
                                                "checked": 9, "last_checkpoint_seq": 5}}
        if args.get("actor") == "operator:trudy":
            return {"records": [], "verified": {
                "ok": True, "problem": "", "checked": 120, "last_checkpoint_seq": None,
                "warning": "no checkpoint, yet the trail holds 120 records <deleted?>"}}
        return {"records": [record], "verified": {"ok": True, "problem": None, "checked": 9,
                                                  "last_checkpoint_seq": 5}}

    console = scripted_console(handlers={"audit": audit})
    view = console.window.audit
    qtbot.waitUntil(lambda: view.table.rowCount() == 1, timeout=3000)
    assert view.row_texts()[0][:5] == [
        "9", "2026-03-01 12:00:00", "operator:alice", "quarantine", "th-1"
    ]
    assert "Chain verifies: ok" in view.verification.text()
    view.actor.setText("operator:mallory")
    view.use_since.setChecked(True)
    with qtbot.waitSignal(console.window.audit_loaded, timeout=3000):
        view.apply_button.click()
    op, args = console.client.requests[-1]
    assert op == "audit" and args["actor"] == "operator:mallory" and "since" in args
    assert "record 7 was altered" in view.verification.text()
    # a trail that verifies but may have lost its checkpoints says so, as text, not markup
    view.actor.setText("operator:trudy")
    with qtbot.waitSignal(console.window.audit_loaded, timeout=3000):
        view.apply_button.click()
    shown = view.verification.text()
    assert "Chain verifies: ok" in shown and "Warning:" in shown
    assert "120 records &lt;deleted?&gt;" in shown


def test_layout_and_columns_are_remembered_between_runs(
    qtbot, scripted_console, qt_settings
) -> None:
    console = scripted_console()
    header = console.window.table.horizontalHeader()
    header.setSectionHidden(COL_FIRMWARE, True)
    header.resizeSection(0, 333)
    console.window.resize(OPERATOR_SIZE)
    console.window.close()  # saves the layout
    settings = user_settings()
    assert Path(settings.fileName()).is_relative_to(qt_settings)
    assert settings.value("fleet/header") is not None
    again = scripted_console().window
    header = again.table.horizontalHeader()
    assert header.isSectionHidden(COL_FIRMWARE)
    assert header.sectionSize(0) == 333
    assert has_operator_size(again)


def test_a_window_that_does_not_remember_leaves_the_saved_layout_alone(
    qtbot, scripted_console
) -> None:
    """What a screenshot uses: the default layout at a forced size, never saved as the
    operator's."""
    mine = scripted_console().window
    mine.table.horizontalHeader().setSectionHidden(COL_FIRMWARE, True)
    mine.resize(OPERATOR_SIZE)
    mine.close()
    settings = user_settings()
    saved = {key: settings.value(key) for key in settings.allKeys()}
    assert saved

    shot = scripted_console(remember_layout=False).window
    assert not shot.table.horizontalHeader().isSectionHidden(COL_FIRMWARE)
    assert not has_operator_size(shot)
    shot.resize(1600, 900)
    shot.close()
    settings = user_settings()
    assert {key: settings.value(key) for key in settings.allKeys()} == saved
    assert has_operator_size(scripted_console().window)


def test_csv_export_from_the_window_writes_the_filtered_rows(
    tmp_path, scripted_console
) -> None:
    console = scripted_console()
    window = console.window
    window.fleet.state_filter.setCurrentIndex(window.fleet.state_filter.findData("active"))
    count = window.export_csv(tmp_path / "fleet.csv")
    lines = (tmp_path / "fleet.csv").read_text().splitlines()
    assert count == window.model.shown == len(lines) - 1
    assert count == sum(r.state == "active" for r in console.rows)


def test_a_client_that_cannot_start_is_reported(qtbot) -> None:
    from console.bridge import AdminBridge
    from console.live import EventInbox

    def broken(on_event: Any, on_connection: Any) -> Any:
        raise ScriptedError("wrong_passphrase", "wrong passphrase, or the key file is damaged")

    bridge = AdminBridge(broken, EventInbox())
    window = MainWindow(bridge)
    qtbot.addWidget(window)
    with qtbot.waitSignal(bridge.failed, timeout=3000) as failed:
        bridge.start()
    assert "wrong_passphrase" in failed.args[0]
    qtbot.waitUntil(lambda: "disconnected" in window.connection_label.text(), timeout=3000)
    replies: list = []
    bridge.request("whoami", None, lambda result, failure: replies.append(failure))
    qtbot.waitUntil(lambda: bool(replies), timeout=3000)
    assert replies[0].reason == "not_connected"


@pytest.mark.parametrize("shortcut", [spec.shortcut for spec in ACTIONS])
def test_each_action_has_its_shortcut_on_the_window(scripted_console, shortcut) -> None:
    window = scripted_console().window
    assert shortcut in [a.shortcut().toString() for a in window.actions()]


def test_a_reconnect_shows_in_the_status_bar_and_reloads_the_fleet(
    qtbot, scripted_console
) -> None:
    console = scripted_console()
    window = console.window
    console.client.on_connection("disconnected: connection lost")
    qtbot.waitUntil(lambda: "disconnected" in window.connection_label.text(), timeout=3000)
    loads = sum(op == "list_identities" for op, _ in console.client.requests)
    with qtbot.waitSignal(window.fleet_loaded, timeout=3000):
        console.client.on_connection("connected")
    assert "connected" in window.connection_label.text()
    assert sum(op == "list_identities" for op, _ in console.client.requests) == loads + 1
