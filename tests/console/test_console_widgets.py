"""Small widgets: the hand-painted telemetry chart, the theme, the header that stays fast with a
huge selection, and the attention panel's wording."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from console_support import NOW
from PySide6.QtCore import QModelIndex, QPersistentModelIndex
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QApplication, QTreeWidgetItem

from console.attention import ID_ROLE, SECTIONS, AttentionPanel, describe
from console.chart import TelemetryChart
from console.models import FleetTableModel
from console.synthetic import synthetic_rows
from console.table_view import FleetTableView
from console.theme import apply_dark_theme


def test_the_chart_keeps_counts_and_paints_them(qtbot) -> None:
    chart = TelemetryChart()
    qtbot.addWidget(chart)
    chart.resize(360, 120)
    chart.set_counts([0, 4, 9.0, -2])
    assert chart.counts == (0, 4, 9, 0)
    image = chart.grab().toImage()
    # Some pixel in the bar area carries the bar colour.
    colours = {image.pixelColor(x, y).name() for x in range(40, 356, 4) for y in range(10, 100, 4)}
    assert "#3d8fd6" in colours


@pytest.mark.parametrize("bad", [[True], ["3"], [None]])
def test_the_chart_refuses_counts_that_are_not_numbers(qtbot, bad: list) -> None:
    chart = TelemetryChart()
    qtbot.addWidget(chart)
    with pytest.raises(TypeError):
        chart.set_counts(bad)


def test_the_dark_theme_is_an_explicit_palette(qapp) -> None:
    apply_dark_theme(qapp)
    window = QApplication.palette().color(QPalette.ColorRole.Window)
    assert window.lightness() < 60
    assert QApplication.style().name().lower() == "fusion"


class CountingModel(FleetTableModel):
    calls = 0

    def rowCount(self, parent: QModelIndex | QPersistentModelIndex = QModelIndex()) -> int:
        CountingModel.calls += 1
        return super().rowCount(parent)


def test_the_header_does_not_walk_a_large_selection(qtbot) -> None:
    """Qt's own header asks the selection model about every column it paints, which walks
    every selected row: seconds for 100k. Ours must not ask at all."""
    model = CountingModel()
    view = FleetTableView()
    qtbot.addWidget(view)
    view.setModel(model)
    model.set_rows(synthetic_rows(20_000, NOW))
    view.resize(1000, 500)
    view.show()
    view.selectAll()
    QApplication.processEvents()
    CountingModel.calls = 0
    view.horizontalHeader().viewport().repaint()
    assert CountingModel.calls < 500


@pytest.mark.skipif(
    sys.version_info >= (3, 12), reason="None is immortal from Python 3.12: its count never falls"
)
def test_repainting_the_table_does_not_use_up_references_to_none(qtbot: Any) -> None:
    """PySide6 6.12.0 on Python 3.11 drops a reference to None on every Qt call that returns
    nothing (QPainter.save, setPen...); the badge delegate and the header make such calls on
    every repaint, so an idle console aborted after minutes ("none_dealloc")."""
    model = FleetTableModel()
    view = FleetTableView()
    qtbot.addWidget(view)
    view.setModel(model)
    model.set_rows(synthetic_rows(200, NOW))
    view.resize(1000, 500)
    view.show()
    QApplication.processEvents()
    view.viewport().repaint()  # anything painted once for good (caches) is in place first
    before = sys.getrefcount(None)
    for _ in range(200):
        view.viewport().repaint()
        view.horizontalHeader().viewport().repaint()
    # 200 repaints of ~20 badges and 8 header sections: a leak would lose thousands; a
    # collection freeing objects that held None during the loop may lose a few.
    assert sys.getrefcount(None) >= before - 100


def test_an_attention_section_opens_when_its_first_entries_arrive(qtbot: Any) -> None:
    panel = AttentionPanel()
    qtbot.addWidget(panel)
    empty: dict[str, list[str]] = {key: [] for key, _, _ in SECTIONS}

    def groups() -> dict[str, QTreeWidgetItem]:
        items = (panel.tree.topLevelItem(n) for n in range(panel.tree.topLevelItemCount()))
        return {item.data(0, ID_ROLE): item for item in items if item is not None}

    def expanded() -> dict[str, bool]:
        return {key: group.isExpanded() for key, group in groups().items()}

    panel.show_attention({**empty, "quarantined": ["th-9"]})
    assert expanded() == {key: key == "quarantined" for key, _, _ in SECTIONS}
    panel.show_attention({**empty, "quarantined": ["th-9"], "pending": ["th-1"]})
    assert expanded()["pending"] and expanded()["quarantined"]
    # Collapsed by the operator: it stays so while it has entries...
    groups()["pending"].setExpanded(False)
    panel.show_attention({**empty, "pending": ["th-1", "th-2"]})
    assert not expanded()["pending"]
    assert panel.section_lines("pending") == ["th-1", "th-2"]
    # ...and opens again once it emptied and has news.
    panel.show_attention(empty)
    panel.show_attention({**empty, "pending": ["th-3"]})
    assert expanded()["pending"]


@pytest.mark.parametrize(
    ("section", "entry", "line", "identity"),
    [
        ("pending", "th-1", "th-1", "th-1"),
        ("expiring", {"id": "th-2", "cert_not_after": "soon"}, "th-2  soon", "th-2"),
        ("events", {"kind": "clone", "subject": "th-3", "at": "t", "data": {}}, "clone th-3 at t",
         "th-3"),
        ("unknown", {"remote": "1.2.3.4:5", "reason": "not_enrolled", "count": 2,
                     "last_seen": "t"}, "anonymous from 1.2.3.4:5: not_enrolled, 2 times (last t)",
         None),
        ("pending", 42, "42", None),
    ],
)
def test_attention_entries_read_as_sentences(
    section: str, entry: Any, line: str, identity: str | None
) -> None:
    assert describe(section, entry) == (line, identity)
