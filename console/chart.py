"""A small bar chart of telemetry messages per minute, painted by hand.

QtCharts ships only in PySide6-Addons (59 MB more); thirty bars do not need it.
"""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QRectF, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from console import theme

_MARGIN_LEFT = 34
_MARGIN_BOTTOM = 16
_MARGIN_TOP = 6


class TelemetryChart(QWidget):
    """Bars oldest to newest (left to right); the scale is the largest bar."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._counts: tuple[int, ...] = ()
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(110)

    def sizeHint(self) -> QSize:
        return QSize(360, 120)

    @property
    def counts(self) -> tuple[int, ...]:
        return self._counts

    def set_counts(self, counts: Sequence[int]) -> None:
        cleaned = []
        for value in counts:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"counts must be numbers, not {type(value).__name__}")
            cleaned.append(max(0, int(value)))
        self._counts = tuple(cleaned)
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        area = QRectF(self.rect()).adjusted(_MARGIN_LEFT, _MARGIN_TOP, -4, -_MARGIN_BOTTOM)
        text_colour = self.palette().color(self.foregroundRole())
        axis = QColor(text_colour)
        axis.setAlpha(90)
        painter.setPen(QPen(axis, 1))
        painter.drawLine(area.bottomLeft(), area.bottomRight())
        painter.setPen(text_colour)
        if not self._counts:
            painter.drawText(area, Qt.AlignmentFlag.AlignCenter, "no telemetry yet")
            return
        peak = max(self._counts) or 1
        small = painter.font()
        small.setPointSizeF(max(6.0, small.pointSizeF() * 0.8))
        painter.setFont(small)
        painter.drawText(
            QRectF(0, area.top() - 4, _MARGIN_LEFT - 4, 14),
            Qt.AlignmentFlag.AlignRight,
            str(peak),
        )
        painter.drawText(
            QRectF(0, area.bottom() - 12, _MARGIN_LEFT - 4, 14), Qt.AlignmentFlag.AlignRight, "0"
        )
        minutes = len(self._counts)
        painter.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), 14),
            Qt.AlignmentFlag.AlignLeft,
            f"-{minutes} min",
        )
        painter.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), 14),
            Qt.AlignmentFlag.AlignRight,
            "now",
        )
        slot = area.width() / minutes
        gap = min(2.0, slot * 0.2)
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QColor(theme.BAR_COLOUR))
        for n, value in enumerate(self._counts):
            height = area.height() * value / peak
            painter.drawRect(
                QRectF(area.left() + n * slot + gap / 2, area.bottom() - height, slot - gap, height)
            )
