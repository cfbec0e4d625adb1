"""The fleet panel: search box, filters, "N shown of M" and the table.

Filtering runs in Python over every row (a few ms for 100k) a moment after the operator stops
typing, so a fast typist does not pay for each keystroke.
"""

from __future__ import annotations

from PySide6.QtCore import QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QVBoxLayout,
    QWidget,
)

from console.models import HEADERS, FleetFilter, FleetTableModel
from console.rows import STATES
from console.table_view import FleetTableView

KINDS = ("device", "operator", "service")
# Widths a first run starts from (pixels); the operator's own layout is remembered after that.
DEFAULT_WIDTHS = (175, 75, 105, 80, 75, 70, 105, 100)
FILTER_DELAY_MS = 120
_ANY = ""


class FleetPanel(QWidget):
    filter_changed = Signal()

    def __init__(self, model: FleetTableModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        bar = QHBoxLayout()
        self.search = QLineEdit()
        self.search.setObjectName("search")
        self.search.setPlaceholderText("Search id, model, firmware, state…  (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.setMinimumWidth(240)
        self.state_filter = self._combo("All states", STATES)
        self.kind_filter = self._combo("All kinds", KINDS)
        self.model_filter = self._combo("All models", ())
        self.count_label = QLabel("0 shown of 0")
        self.count_label.setObjectName("count")
        bar.addWidget(self.search, 3)
        bar.addWidget(self.state_filter)
        bar.addWidget(self.kind_filter)
        bar.addWidget(self.model_filter)
        bar.addWidget(self.count_label)
        layout.addLayout(bar)

        self.table = FleetTableView()
        self.table.setModel(model)
        header = self.table.horizontalHeader()
        header.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        header.customContextMenuRequested.connect(self._column_menu)
        for column, width in enumerate(DEFAULT_WIDTHS):
            header.resizeSection(column, width)
        layout.addWidget(self.table)

        self._filter_timer = QTimer(self)
        self._filter_timer.setSingleShot(True)
        self._filter_timer.setInterval(FILTER_DELAY_MS)
        self._filter_timer.timeout.connect(self.apply_filter)
        self.search.textChanged.connect(lambda _text: self._filter_timer.start())
        for combo in (self.state_filter, self.kind_filter, self.model_filter):
            combo.currentIndexChanged.connect(lambda _index: self.apply_filter())
        model.counts_changed.connect(self._show_counts)

    @staticmethod
    def _combo(everything: str, values: tuple[str, ...]) -> QComboBox:
        combo = QComboBox()
        combo.addItem(everything, _ANY)
        for value in values:
            combo.addItem(value, value)
        return combo

    def current_filter(self) -> FleetFilter:
        def chosen(combo: QComboBox) -> frozenset[str]:
            value = combo.currentData()
            return frozenset({value}) if value else frozenset()

        return FleetFilter(
            text=self.search.text(),
            states=chosen(self.state_filter),
            kinds=chosen(self.kind_filter),
            models=chosen(self.model_filter),
        )

    def apply_filter(self) -> None:
        self._filter_timer.stop()
        self.model.set_filter(self.current_filter())
        self.filter_changed.emit()

    def clear_filters(self) -> None:
        for combo in (self.state_filter, self.kind_filter, self.model_filter):
            combo.blockSignals(True)
            combo.setCurrentIndex(0)
            combo.blockSignals(False)
        self.search.blockSignals(True)
        self.search.clear()
        self.search.blockSignals(False)
        self.apply_filter()

    def update_model_choices(self) -> None:
        """The model filter offers the models present in the fleet."""
        current = self.model_filter.currentData()
        models = self.model.distinct("model")
        if [self.model_filter.itemData(i) for i in range(1, self.model_filter.count())] == models:
            return
        self.model_filter.blockSignals(True)
        self.model_filter.clear()
        self.model_filter.addItem("All models", _ANY)
        for name in models:
            self.model_filter.addItem(name, name)
        index = self.model_filter.findData(current)
        self.model_filter.setCurrentIndex(max(0, index))
        self.model_filter.blockSignals(False)

    def focus_search(self) -> None:
        self.search.setFocus(Qt.FocusReason.ShortcutFocusReason)
        self.search.selectAll()

    def visible_columns(self) -> list[int]:
        """Logical columns shown, in their on-screen order."""
        header = self.table.horizontalHeader()
        ordered = sorted(range(header.count()), key=header.visualIndex)
        return [c for c in ordered if not header.isSectionHidden(c)]

    def _show_counts(self, shown: int, total: int) -> None:
        self.count_label.setText(f"{shown:,} shown of {total:,}")

    def _column_menu(self, position: QPoint) -> None:
        header = self.table.horizontalHeader()
        menu = QMenu(self)
        for column, title in enumerate(HEADERS):
            action = QAction(title, menu)
            action.setCheckable(True)
            action.setChecked(not header.isSectionHidden(column))
            # The id column stays: rows without it cannot be told apart.
            action.setEnabled(column != 0)
            action.toggled.connect(
                lambda shown, c=column: header.setSectionHidden(c, not shown)
            )
            menu.addAction(action)
        menu.exec(header.mapToGlobal(position))
