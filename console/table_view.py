"""The fleet table view: selection by id that survives model resets, and the state badge.

A model reset drops the view's selection and, with the rows, its scroll position. Operators
watching a live fleet must not lose either, so the view remembers the selected ids, the current
id and the scroll value just before every reset and restores them right after.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from PySide6.QtCore import (
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QPersistentModelIndex,
    QRect,
    QRectF,
    Qt,
)
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionHeader,
    QStyleOptionViewItem,
    QTableView,
    QWidget,
)

from console import theme
from console.models import COL_STATE, FleetTableModel

_SELECT_ROWS = (
    QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
)


class StateBadgeDelegate(QStyledItemDelegate):
    """Paints the state as a coloured pill: the state column is read at a glance."""

    def paint(
        self,
        painter: QPainter,
        option: QStyleOptionViewItem,
        index: QModelIndex | QPersistentModelIndex,
    ) -> None:
        text = index.data(Qt.ItemDataRole.DisplayRole)
        if not isinstance(text, str):
            super().paint(painter, option, index)
            return
        painter.save()
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        if option.state & QStyle.StateFlag.State_Selected:
            painter.fillRect(option.rect, option.palette.highlight())
        rect = QRectF(option.rect).adjusted(4, 3, -4, -3)
        width = min(rect.width(), option.fontMetrics.horizontalAdvance(text) + 18)
        pill = QRectF(rect.left(), rect.top(), width, rect.height())
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(theme.state_colour(text))
        painter.drawRoundedRect(pill, pill.height() / 2, pill.height() / 2)
        painter.setPen(QColor("#ffffff"))
        painter.drawText(pill, Qt.AlignmentFlag.AlignCenter, text)
        painter.restore()


class FleetHeaderView(QHeaderView):
    """A horizontal header that never asks the selection model about its columns.

    Qt's own ``paintSection`` asks ``isColumnSelected`` for every column it paints, and that
    walks every selected row through the model: with 100k rows selected, one repaint of eight
    header sections took over a second of Python ``rowCount``/``columnCount`` calls. The same
    workaround as Orange's ``HeaderView`` (biolab/orange-widget-base, ``headerview.py``).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(Qt.Orientation.Horizontal, parent)
        self.setHighlightSections(False)
        self.setSectionsClickable(True)

    def paintSection(self, painter: QPainter, rect: QRect, logical_index: int) -> None:
        if not rect.isValid():
            return
        option = QStyleOptionHeader()
        self.initStyleOption(option)
        option.rect = rect
        option.section = logical_index
        option.orientation = Qt.Orientation.Horizontal
        option.textAlignment = self.defaultAlignment()
        option.iconAlignment = Qt.AlignmentFlag.AlignVCenter
        model = self.model()
        if model is not None:
            text = model.headerData(logical_index, Qt.Orientation.Horizontal)
            option.text = text if isinstance(text, str) else ""
        if self.isEnabled():
            option.state |= QStyle.StateFlag.State_Enabled
        if self.isSortIndicatorShown() and self.sortIndicatorSection() == logical_index:
            # Qt draws ascending as a downward arrow (QHeaderView::paintSection does the same).
            option.sortIndicator = (
                QStyleOptionHeader.SortIndicator.SortDown
                if self.sortIndicatorOrder() == Qt.SortOrder.AscendingOrder
                else QStyleOptionHeader.SortIndicator.SortUp
            )
        visual = self.visualIndex(logical_index)
        if self.count() == 1:
            option.position = QStyleOptionHeader.SectionPosition.OnlyOneSection
        elif visual == 0:
            option.position = QStyleOptionHeader.SectionPosition.Beginning
        elif visual == self.count() - 1:
            option.position = QStyleOptionHeader.SectionPosition.End
        else:
            option.position = QStyleOptionHeader.SectionPosition.Middle
        painter.save()
        self.style().drawControl(QStyle.ControlElement.CE_Header, option, painter, self)
        painter.restore()


class FleetTableView(QTableView):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setHorizontalHeader(FleetHeaderView(self))
        self._saved_ids: list[str] = []
        self._saved_current: str | None = None
        self._saved_scroll = (0, 0)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setAlternatingRowColors(True)
        self.setSortingEnabled(True)
        self.setWordWrap(False)
        self.setShowGrid(False)
        self.verticalHeader().setVisible(False)
        # Fixed row height: with 100k rows, per-row size hints would be asked for every row.
        self.verticalHeader().setDefaultSectionSize(24)
        self.verticalHeader().setSectionResizeMode(self.verticalHeader().ResizeMode.Fixed)
        self.horizontalHeader().setStretchLastSection(True)
        self.horizontalHeader().setSectionsMovable(True)
        self.horizontalHeader().setHighlightSections(False)
        self.setItemDelegateForColumn(COL_STATE, StateBadgeDelegate(self))

    def fleet_model(self) -> FleetTableModel:
        model = self.model()
        assert isinstance(model, FleetTableModel)
        return model

    def setModel(self, model: Any) -> None:
        super().setModel(model)
        if isinstance(model, FleetTableModel):
            # Connected after the view's own slots, so these run after Qt's reset handling.
            model.modelAboutToBeReset.connect(self._remember)
            model.modelReset.connect(self._restore)
            self.horizontalHeader().setSortIndicator(model.sort_column, model.sort_order)

    # -- selection by id ----------------------------------------------------------------------

    def _selected_spans(self) -> list[tuple[int, int]]:
        """Selected rows as sorted, non-overlapping (first, last) spans. Read from the
        selection's ranges, not one index per row: select-all over 100k rows is one range."""
        selection = self.selectionModel().selection()
        ranges = (selection.at(n) for n in range(selection.size()))
        spans: list[tuple[int, int]] = []
        for top, bottom in sorted((r.top(), r.bottom()) for r in ranges if r.isValid()):
            if spans and top <= spans[-1][1] + 1:
                spans[-1] = (spans[-1][0], max(spans[-1][1], bottom))
            else:
                spans.append((top, bottom))
        return spans

    def selected_ids(self) -> list[str]:
        """Ids of the selected rows, in view order."""
        model = self.fleet_model()
        ids: list[str] = []
        for first, last in self._selected_spans():
            ids.extend(model.ids_between(first, last))
        return ids

    def selected_count(self) -> int:
        return sum(last - first + 1 for first, last in self._selected_spans())

    def select_ids(self, ids: Iterable[str]) -> None:
        """Select exactly these ids (those currently shown), as few ranges as possible."""
        model = self.fleet_model()
        positions = sorted(p for p in map(model.position, ids) if p is not None)
        selection = QItemSelection()
        last_column = model.columnCount() - 1
        start = previous = None
        for position in [*positions, None]:
            if position is not None and previous is not None and position == previous + 1:
                previous = position
                continue
            if start is not None and previous is not None:
                selection.select(model.index(start, 0), model.index(previous, last_column))
            start = previous = position
        self.selectionModel().select(selection, _SELECT_ROWS)

    def current_id(self) -> str | None:
        index = self.currentIndex()
        if not index.isValid():
            return None
        return self.fleet_model().row_at(index.row()).id

    def _remember(self) -> None:
        self._saved_ids = self.selected_ids()
        self._saved_current = self.current_id()
        self._saved_scroll = (
            self.verticalScrollBar().value(),
            self.horizontalScrollBar().value(),
        )

    def _restore(self) -> None:
        model = self.fleet_model()
        # The scroll bars learn the new row count only when the view lays itself out.
        self.updateGeometries()
        if self._saved_current is not None:
            position = model.position(self._saved_current)
            if position is not None:
                self.selectionModel().setCurrentIndex(
                    model.index(position, 0), QItemSelectionModel.SelectionFlag.NoUpdate
                )
        if self._saved_ids:
            self.select_ids(self._saved_ids)
        vertical, horizontal = self._saved_scroll
        self.verticalScrollBar().setValue(vertical)
        self.horizontalScrollBar().setValue(horizontal)
