"""The console's main window: fleet table in the middle, device detail on the right, attention
on the left, audit trail below; actions on the selection in the toolbar.

Nothing here waits on the network: every request goes through ``AdminBridge.request`` and its
reply arrives later on the UI thread. Live events are applied in batches by a 250 ms timer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QToolBar,
    QWidget,
)

from console import theme
from console.attention import AttentionPanel
from console.audit_view import AuditView
from console.bridge import AdminBridge, RequestFailure
from console.bulk import BulkAction, DeviceResult
from console.certs import CertSummary
from console.detail import DetailPane
from console.dialogs import ConfirmFn, ResultsDialog, ShortcutsDialog, confirm_action
from console.export import write_csv
from console.fleet_panel import FleetPanel
from console.live import fold_events
from console.models import FleetTableModel
from console.rows import rows_from_wire
from pki.clock import Clock, SystemClock

Result = dict[str, Any] | None
Failure = RequestFailure | None

LIVE_INTERVAL_MS = 250
TICK_INTERVAL_MS = 1000
ATTENTION_REFRESH_MS = 15_000
# A burst of identities the table does not know yet (a fleet powering on) causes one reload,
# not hundreds.
RELOAD_DELAY_MS = 500
DETAIL_DELAY_MS = 150
# The whole fleet in one answer: 100k identities take a few seconds to list (longer right after
# the gateway starts, or on a busy registry), well past the bridge's default for small requests.
FLEET_TIMEOUT = 60.0
SETTINGS_ORGANISATION = "Fleetgate"
SETTINGS_APPLICATION = "console"


@dataclass(frozen=True)
class ActionSpec:
    name: str
    label: str
    shortcut: str
    help: str


ACTIONS = (
    ActionSpec("approve", "Approve", "Ctrl+Shift+A", "Approve the selected pending devices"),
    ActionSpec("quarantine", "Quarantine", "Del", "Quarantine the selection (confirmation)"),
    ActionSpec("release", "Release", "Ctrl+Shift+R", "Release the selection from quarantine"),
    ActionSpec("revoke", "Revoke", "Shift+Del", "Revoke the selection: final, typed confirmation"),
)
OTHER_SHORTCUTS = (
    ("Ctrl+F", "Search the fleet"),
    ("Esc (in search)", "Back to the table"),
    ("Ctrl+A", "Select all shown (filtered) rows"),
    ("↑ ↓ PgUp PgDn", "Move in the table; Shift extends the selection"),
    ("F5", "Reload fleet, attention and audit"),
    ("Ctrl+E", "Export the shown rows and columns to CSV"),
    ("Ctrl+1 / Ctrl+2 / Ctrl+3", "Show detail / attention / audit"),
    ("F1", "This list"),
    ("Ctrl+Q", "Quit"),
)


def user_settings() -> QSettings:
    """Where the layout is remembered: an INI file under the user's configuration folder
    (~/.config/Fleetgate/console.ini). INI explicitly, so that ``QSettings.setPath`` moves it
    (tests do) on every platform alike."""
    return QSettings(
        QSettings.Format.IniFormat,
        QSettings.Scope.UserScope,
        SETTINGS_ORGANISATION,
        SETTINGS_APPLICATION,
    )


def _parse_fleet(result: dict[str, Any]) -> dict[str, Any]:
    """Runs on the client's thread: 100k rows take half a second to parse."""
    rows, skipped = rows_from_wire(result.get("identities", []))
    return {**result, "rows": rows, "skipped": skipped}


def shortcut_list() -> list[tuple[str, str]]:
    return [(a.shortcut, a.help) for a in ACTIONS] + list(OTHER_SHORTCUTS)


class MainWindow(QMainWindow):
    fleet_loaded = Signal(int)  # rows in the registry after a full load
    detail_loaded = Signal(str)
    attention_loaded = Signal()
    audit_loaded = Signal()
    results_ready = Signal(str, object)  # action, list[DeviceResult]

    def __init__(
        self,
        bridge: AdminBridge,
        *,
        clock: Clock | None = None,
        settings: QSettings | None = None,
        ca_chain: Sequence[CertSummary] = (),
        confirm: ConfirmFn = confirm_action,
        title: str = "Fleetgate console",
        remember_layout: bool = True,
    ) -> None:
        """``remember_layout=False`` neither restores nor saves the operator's layout: a
        screenshot shows the default one, at a forced size that must not become theirs."""
        super().__init__()
        self.bridge = bridge
        self.clock = clock or SystemClock()
        self.settings = settings or user_settings()
        self.ca_chain = tuple(ca_chain)
        self.confirm = confirm
        self.remember_layout = remember_layout
        self.setWindowTitle(title)
        self.setObjectName("fleetgate-console")
        self.resize(1600, 900)

        self.model = FleetTableModel(self.clock, self)
        self.fleet = FleetPanel(self.model)
        self.table = self.fleet.table
        self.setCentralWidget(self.fleet)
        self.detail = DetailPane()
        self.attention = AttentionPanel()
        self.audit = AuditView()
        area = Qt.DockWidgetArea
        self.detail_dock = self._dock("Device", "detail", self.detail, area.RightDockWidgetArea)
        self.attention_dock = self._dock(
            "Attention", "attention", self.attention, area.LeftDockWidgetArea
        )
        self.audit_dock = self._dock("Audit trail", "audit", self.audit, area.BottomDockWidgetArea)
        self.default_dock_sizes()

        self.connection_label = QLabel()
        self.operator_label = QLabel()
        self.statusBar().addPermanentWidget(self.operator_label)
        self.statusBar().addPermanentWidget(self.connection_label)
        self._show_connection("connecting")

        self.actions_by_name: dict[str, QAction] = {}
        self._build_actions()
        self.results_dialog: ResultsDialog | None = None
        self.last_results: list[DeviceResult] = []
        self.running: BulkAction | None = None
        self.loaded_once = False
        self._loading_fleet = False
        self._reload_again = False
        self._detail_id: str | None = None

        self._live_timer = self._timer(LIVE_INTERVAL_MS, self.apply_live_events)
        self._tick_timer = self._timer(TICK_INTERVAL_MS, self.model.tick)
        self._attention_timer = self._timer(ATTENTION_REFRESH_MS, self.load_attention)
        self._reload_timer = self._timer(RELOAD_DELAY_MS, self.load_fleet, single=True)
        self._detail_timer = self._timer(DETAIL_DELAY_MS, self.load_detail, single=True)
        self._attention_soon = self._timer(RELOAD_DELAY_MS, self.load_attention, single=True)

        bridge.connection_changed.connect(self._connection_changed)
        bridge.failed.connect(self._client_failed)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.table.selectionModel().currentChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(lambda _index: self._show_dock(self.detail_dock))
        self.attention.identity_activated.connect(self.select_identity)
        self.audit.query_requested.connect(self.load_audit)
        self.fleet.search.returnPressed.connect(self.table.setFocus)
        self.fleet.search.installEventFilter(self)
        if remember_layout:
            self._restore_layout()

    # -- construction -------------------------------------------------------------------------

    def _dock(
        self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea
    ) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(f"dock-{name}")
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _timer(self, interval: int, slot: Any, *, single: bool = False) -> QTimer:
        timer = QTimer(self)
        timer.setInterval(interval)
        timer.setSingleShot(single)
        timer.timeout.connect(slot)
        if not single:
            timer.start()
        return timer

    def _action(self, text: str, shortcut: str | None, slot: Any) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        menu_bar = self.menuBar()
        file_menu = menu_bar.addMenu("&File")
        self.export_action = self._action("Export CSV…", "Ctrl+E", self.export_csv_dialog)
        self.reload_action = self._action("Reload", "F5", self.reload_everything)
        quit_action = self._action("Quit", "Ctrl+Q", self.close)
        for action in (self.export_action, self.reload_action, quit_action):
            file_menu.addAction(action)

        actions_menu = menu_bar.addMenu("&Actions")
        toolbar = QToolBar("Actions")
        toolbar.setObjectName("toolbar-actions")
        toolbar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        self.addToolBar(toolbar)
        for spec in ACTIONS:
            action = self._action(spec.label, spec.shortcut, lambda name=spec.name: self.act(name))
            action.setToolTip(f"{spec.help} ({spec.shortcut})")
            self.actions_by_name[spec.name] = action
            actions_menu.addAction(action)
            toolbar.addAction(action)
        actions_menu.addSeparator()
        self.select_all_action = self._action("Select all shown", "Ctrl+A", self.select_all)
        self.search_action = self._action("Search", "Ctrl+F", self.fleet.focus_search)
        actions_menu.addAction(self.select_all_action)
        actions_menu.addAction(self.search_action)
        toolbar.addSeparator()
        toolbar.addAction(self.reload_action)
        toolbar.addAction(self.export_action)

        view_menu = menu_bar.addMenu("&View")
        for key, dock in (
            ("Ctrl+1", self.detail_dock),
            ("Ctrl+2", self.attention_dock),
            ("Ctrl+3", self.audit_dock),
        ):
            toggle = dock.toggleViewAction()
            toggle.setShortcut(QKeySequence(key))
            view_menu.addAction(toggle)

        help_menu = menu_bar.addMenu("&Help")
        help_menu.addAction(self._action("Keyboard shortcuts", "F1", self.show_shortcuts))
        help_menu.addAction(self._action("About", None, self.show_about))

    # -- layout memory ------------------------------------------------------------------------

    def default_dock_sizes(self) -> None:
        self.resizeDocks([self.detail_dock], [430], Qt.Orientation.Horizontal)
        self.resizeDocks([self.attention_dock], [290], Qt.Orientation.Horizontal)
        self.resizeDocks([self.audit_dock], [210], Qt.Orientation.Vertical)

    def _restore_layout(self) -> None:
        geometry = self.settings.value("window/geometry")
        if isinstance(geometry, QByteArray):
            self.restoreGeometry(geometry)
        state = self.settings.value("window/state")
        if isinstance(state, QByteArray):
            self.restoreState(state)
        header_state = self.settings.value("fleet/header")
        header = self.table.horizontalHeader()
        if isinstance(header_state, QByteArray) and header.restoreState(header_state):
            self.model.sort(header.sortIndicatorSection(), header.sortIndicatorOrder())

    def save_layout(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self.settings.setValue("fleet/header", self.table.horizontalHeader().saveState())
        self.settings.sync()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.remember_layout:
            self.save_layout()
        for timer in (self._live_timer, self._tick_timer, self._attention_timer):
            timer.stop()
        super().closeEvent(event)

    # -- connection ---------------------------------------------------------------------------

    def _show_connection(self, state: str) -> None:
        colour = (
            theme.OK_COLOUR
            if state == "connected"
            else theme.WARNING_COLOUR
            if state == "connecting"
            else theme.DANGER_COLOUR
        )
        self.connection_label.setText(f"<span style='color:{colour}'>●</span> {state}")
        self.connection_label.setToolTip(state)

    def _connection_changed(self, state: str) -> None:
        self._show_connection(state)
        if state == "connected":
            # After a reconnect events may have been missed: the registry is the truth.
            self.reload_everything()
            self.bridge.request("whoami", None, self._whoami_loaded)

    def _client_failed(self, message: str) -> None:
        self.statusBar().showMessage(f"Cannot connect: {message}")

    def _whoami_loaded(self, result: Result, failure: Failure) -> None:
        if result is not None:
            who, role = result.get("operator", "?"), result.get("role", "?")
            self.operator_label.setText(f"{who} ({role})")

    # -- loading ------------------------------------------------------------------------------

    def reload_everything(self) -> None:
        self.load_fleet()
        self.load_attention()
        self.load_audit(self.audit.query())
        if self._detail_id is not None:
            self.load_detail()

    def load_fleet(self) -> None:
        if self._loading_fleet:
            self._reload_again = True
            return
        self._loading_fleet = True
        self.bridge.request(
            "list_identities",
            {},
            self._fleet_loaded,
            timeout=FLEET_TIMEOUT,
            prepare=_parse_fleet,
        )

    def _fleet_loaded(self, result: Result, failure: Failure) -> None:
        self._loading_fleet = False
        if failure is not None or result is None:
            self.statusBar().showMessage(f"Could not load the fleet: {failure}")
        else:
            rows, skipped = result["rows"], result["skipped"]
            if self.loaded_once:
                self.model.replace_all(rows)
            else:
                self.model.set_rows(rows)
                self.loaded_once = True
            self.fleet.update_model_choices()
            if skipped:
                self.statusBar().showMessage(f"{skipped} identities could not be read")
            self.fleet_loaded.emit(self.model.total)
        if self._reload_again:
            self._reload_again = False
            self._reload_timer.start()

    def load_attention(self) -> None:
        self.bridge.request("attention", None, self._attention_loaded)

    def _attention_loaded(self, result: Result, failure: Failure) -> None:
        if failure is not None or result is None:
            self.attention.show_error(failure or RequestFailure("failed"))
            return
        self.attention.show_attention(result)
        total = self.attention.total
        self.attention_dock.setWindowTitle(f"Attention ({total})" if total else "Attention")
        self.attention_loaded.emit()

    def load_audit(self, args: dict[str, Any]) -> None:
        self.bridge.request("audit", args, self._audit_loaded)

    def _audit_loaded(self, result: Result, failure: Failure) -> None:
        if failure is not None or result is None:
            self.audit.show_error(failure or RequestFailure("failed"))
            return
        self.audit.show_records(result)
        self.audit_loaded.emit()

    def load_detail(self) -> None:
        identity_id = self._detail_id
        if identity_id is None:
            self.detail.clear()
            return
        self.detail.show_loading(identity_id)

        def loaded(result: Result, failure: Failure) -> None:
            if identity_id != self._detail_id:
                return  # the operator moved on; an older answer must not overwrite
            if failure is not None or result is None:
                self.detail.show_error(identity_id, failure or RequestFailure("failed"))
                return
            self.detail.show_identity(result, self.ca_chain)
            self.detail_loaded.emit(identity_id)

        self.bridge.request("get_identity", {"id": identity_id}, loaded)

    # -- live updates -------------------------------------------------------------------------

    def apply_live_events(self) -> None:
        events, overflowed = self.bridge.inbox.drain()
        if not events and not overflowed:
            return
        batch = fold_events(events, self.model.get)
        if batch.rows:
            self.model.update_rows(batch.rows.values())
        if (batch.reload_fleet or overflowed) and self.loaded_once:
            self._reload_timer.start()
        if batch.reload_attention or overflowed:
            self._attention_soon.start()
        if self._detail_id is not None and self._detail_id in batch.touched:
            self._detail_timer.start()

    # -- selection ----------------------------------------------------------------------------

    def _selection_changed(self, *_args: object) -> None:
        identity_id = self.table.current_id()
        if identity_id is None and self.table.selected_count() == 1:
            identity_id = self.table.selected_ids()[0]
        if identity_id != self._detail_id:
            self._detail_id = identity_id
            self._detail_timer.start()
        count = self.table.selected_count()
        if count:
            self.statusBar().showMessage(f"{count:,} selected", 3000)

    def select_all(self) -> None:
        self.table.selectAll()
        self.table.setFocus()

    def select_identity(self, identity_id: str) -> None:
        """Show ``identity_id`` in the table (clearing filters that hide it) and select it."""
        if self.model.get(identity_id) is None:
            self.statusBar().showMessage(f"{identity_id} is not in the fleet table", 5000)
            return
        if self.model.position(identity_id) is None:
            self.fleet.clear_filters()
        position = self.model.position(identity_id)
        if position is None:
            return
        self.table.select_ids([identity_id])
        index = self.model.index(position, 0)
        self.table.selectionModel().setCurrentIndex(
            index, self.table.selectionModel().SelectionFlag.NoUpdate
        )
        self.table.scrollTo(index)
        self.table.setFocus()

    # -- actions ------------------------------------------------------------------------------

    def act(self, action: str) -> None:
        """Confirm, then run ``action`` on every selected (shown) row."""
        ids = self.table.selected_ids()
        if not ids:
            self.statusBar().showMessage("Select one or more rows first", 4000)
            return
        if self.running is not None:
            self.statusBar().showMessage("Another action is still running", 4000)
            return
        reason = self.confirm(self, action, ids)
        if reason is None:
            self.statusBar().showMessage(f"{action} cancelled", 3000)
            return
        self.statusBar().showMessage(f"{action}: {len(ids):,} sent…")
        self.running = BulkAction(
            action, ids, reason, self.bridge.request, lambda results: self._acted(action, results)
        )
        self.running.start()

    def _acted(self, action: str, results: list[DeviceResult]) -> None:
        self.running = None
        self.last_results = results
        changed = []
        for result in results:
            row = self.model.get(result.id)
            if result.ok and result.state and row is not None and row.state != result.state:
                changed.append(row.with_changes(state=result.state))
        if changed:
            self.model.update_rows(changed)
        failed = sum(not r.ok for r in results)
        self.statusBar().showMessage(
            f"{action}: {len(results) - failed:,} done, {failed:,} failed", 10_000
        )
        if self.results_dialog is not None:
            self.results_dialog.close()
        self.results_dialog = ResultsDialog(action, results, self)
        self.results_dialog.show()
        self._attention_soon.start()
        if self._detail_id is not None:
            self._detail_timer.start()
        self.results_ready.emit(action, results)

    # -- export and help ----------------------------------------------------------------------

    def export_csv(self, path: Path) -> int:
        with path.open("w", encoding="utf-8", newline="") as stream:
            return write_csv(stream, self.model, self.fleet.visible_columns())

    def export_csv_dialog(self) -> None:
        name, _ = QFileDialog.getSaveFileName(
            self, "Export CSV", "fleet.csv", "CSV files (*.csv)"
        )
        if not name:
            return
        try:
            count = self.export_csv(Path(name))
        except OSError as exc:
            QMessageBox.warning(self, "Export CSV", f"Could not write {name}: {exc}")
            return
        self.statusBar().showMessage(f"{count:,} rows written to {name}", 5000)

    def show_shortcuts(self) -> None:
        ShortcutsDialog(shortcut_list(), self).exec()

    def show_about(self) -> None:
        QMessageBox.about(
            self,
            "Fleetgate console",
            "Operator console of Fleetgate, the edge identity gateway for IoT fleets.",
        )

    def _show_dock(self, dock: QDockWidget) -> None:
        dock.show()
        dock.raise_()

    def eventFilter(self, watched: Any, event: Any) -> bool:
        # Esc in the search box returns to the table, keeping the filter.
        if (
            watched is self.fleet.search
            and event.type() == event.Type.KeyPress
            and event.key() == Qt.Key.Key_Escape
        ):
            self.table.setFocus()
            return True
        return super().eventFilter(watched, event)
