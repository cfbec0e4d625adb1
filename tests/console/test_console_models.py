"""The fleet table over 100k synthetic rows: filter, sort, counts, select-all, live updates that
keep the selection, CSV export."""

from __future__ import annotations

import csv
import io
import math
from datetime import timedelta
from typing import Any

import pytest
from console_support import NOW
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication

from console.errors import ConsoleError, ConsoleReason
from console.export import write_csv
from console.fleet_panel import FleetPanel
from console.models import (
    COL_CONNECTED,
    COL_EXPIRY,
    COL_FIRMWARE,
    COL_ID,
    COL_LAST_SEEN,
    COL_MODEL,
    COL_STATE,
    HEADERS,
    FleetFilter,
    FleetTableModel,
)
from console.rows import DeviceRow
from pki.clock import FakeClock


def make_panel(qtbot: Any, rows: list[DeviceRow], clock: FakeClock | None = None) -> FleetPanel:
    model = FleetTableModel(clock or FakeClock(NOW))
    panel = FleetPanel(model)
    qtbot.addWidget(panel)
    panel.resize(1200, 700)
    model.set_rows(rows)
    panel.show()
    QApplication.processEvents()
    return panel


def test_counts_show_n_of_m_for_a_loaded_and_a_filtered_fleet(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    assert panel.model.total == panel.model.shown == 100_000
    assert panel.count_label.text() == "100,000 shown of 100,000"
    panel.state_filter.setCurrentIndex(panel.state_filter.findData("quarantined"))
    expected = sum(r.state == "quarantined" for r in fleet_100k)
    assert 0 < expected < 100_000
    assert panel.model.shown == expected
    assert panel.count_label.text() == f"{expected:,} shown of 100,000"


def test_search_is_a_case_insensitive_substring_not_a_prefix(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    # "200-0123" sits in the middle of ids like "th-200-012345".
    panel.search.setText("200-0123")
    panel.apply_filter()
    shown = panel.model.visible_rows()
    assert shown and all("200-0123" in r.id for r in shown)
    assert len(shown) == sum("200-0123" in r.id for r in fleet_100k)
    panel.search.setText("ACME SENSORS")
    panel.apply_filter()
    assert panel.model.shown == 100_000


def test_filters_combine_state_kind_and_model(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    panel.update_model_choices()
    panel.state_filter.setCurrentIndex(panel.state_filter.findData("active"))
    panel.kind_filter.setCurrentIndex(panel.kind_filter.findData("device"))
    panel.model_filter.setCurrentIndex(panel.model_filter.findData("GW-10"))
    expected = [r.id for r in fleet_100k if r.state == "active" and r.model == "GW-10"]
    assert [r.id for r in panel.model.visible_rows()] == sorted(expected)
    panel.kind_filter.setCurrentIndex(panel.kind_filter.findData("operator"))
    assert panel.model.shown == 0
    panel.clear_filters()
    assert panel.model.shown == 100_000


def test_sort_by_expiry_puts_soonest_first_and_rows_without_certificate_last(
    qtbot, fleet_100k
) -> None:
    panel = make_panel(qtbot, fleet_100k)
    panel.table.sortByColumn(COL_EXPIRY, Qt.SortOrder.AscendingOrder)
    keys = [r.expiry_key for r in panel.model.visible_rows()]
    assert keys == sorted(keys)
    assert math.isinf(keys[-1])  # pending devices have no certificate
    first = panel.model.row_at(0)
    assert first.cert_not_after == min(r.cert_not_after for r in fleet_100k if r.cert_not_after)
    panel.table.sortByColumn(COL_EXPIRY, Qt.SortOrder.DescendingOrder)
    assert panel.model.row_at(0).cert_not_after is None


def test_sort_by_state_puts_pending_first_with_ties_in_id_order(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    # An earlier sort must not leave its order behind for the ties of the next one.
    panel.table.sortByColumn(COL_EXPIRY, Qt.SortOrder.DescendingOrder)
    panel.table.sortByColumn(COL_STATE, Qt.SortOrder.AscendingOrder)
    rows = panel.model.visible_rows()
    pending = [r for r in rows if r.state == "pending"]
    assert list(rows[: len(pending)]) == pending
    active = [r.id for r in rows if r.state == "active"]
    assert active == sorted(active)
    assert rows[-1].state == "revoked"


def test_select_all_selects_exactly_the_filtered_rows(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    panel.search.setText("gw-10")
    panel.apply_filter()
    panel.table.selectAll()
    selected = panel.table.selected_ids()
    assert len(selected) == panel.model.shown == sum("gw-10" in r.id for r in fleet_100k)
    assert selected == [r.id for r in panel.model.visible_rows()]


def test_a_live_update_in_place_keeps_selection_and_scroll(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    table, model = panel.table, panel.model
    table.selectAll()
    table.verticalScrollBar().setValue(40_000)
    changed = fleet_100k[40_010].with_changes(connected=not fleet_100k[40_010].connected)
    resets: list[bool] = []
    model.modelReset.connect(lambda: resets.append(True))
    assert model.update_rows([changed]) is False
    assert resets == []
    assert len(table.selected_ids()) == 100_000
    assert table.verticalScrollBar().value() == 40_000
    assert model.get(changed.id) == changed


def test_rows_appearing_reset_the_model_but_selection_and_scroll_survive(
    qtbot, fleet_100k
) -> None:
    panel = make_panel(qtbot, fleet_100k)
    table, model = panel.table, panel.model
    chosen = [fleet_100k[n].id for n in (30_000, 30_001, 30_005, 61_000)]
    table.select_ids(chosen)
    table.selectionModel().setCurrentIndex(
        model.index(model.position(chosen[0]), 0), table.selectionModel().SelectionFlag.NoUpdate
    )
    table.verticalScrollBar().setValue(30_000)
    newcomer = DeviceRow(id="aaa-new-device", kind="device", state="pending")
    assert model.update_rows([newcomer]) is True
    assert model.total == 100_001
    assert sorted(table.selected_ids()) == sorted(chosen)
    assert table.current_id() == chosen[0]
    assert table.verticalScrollBar().value() == 30_000


def test_a_state_change_that_moves_a_sorted_row_keeps_the_selection(qtbot, fleet_100k) -> None:
    panel = make_panel(qtbot, fleet_100k)
    table, model = panel.table, panel.model
    table.sortByColumn(COL_STATE, Qt.SortOrder.AscendingOrder)
    active = next(r for r in fleet_100k if r.state == "active")
    table.select_ids([active.id])
    before = model.position(active.id)
    assert model.update_rows([active.with_changes(state="quarantined")]) is True
    assert model.position(active.id) != before
    assert table.selected_ids() == [active.id]


def test_the_expiry_countdown_moves_with_the_clock(qtbot) -> None:
    clock = FakeClock(NOW)
    row = DeviceRow(
        id="th-1",
        kind="device",
        state="active",
        cert_not_after=NOW + timedelta(minutes=10),
        last_seen_at=NOW - timedelta(seconds=5),
    )
    panel = make_panel(qtbot, [row], clock)
    index = panel.model.index(0, COL_EXPIRY)
    assert index.data() == "in 10m 00s"
    changed: list[Any] = []
    panel.model.dataChanged.connect(lambda *args: changed.append(args))
    clock.advance(1)
    panel.model.tick()
    assert index.data() == "in 9m 59s"
    assert panel.model.index(0, COL_LAST_SEEN).data() == "6s ago"
    assert changed, "the view is told to repaint the countdown"
    clock.advance(timedelta(minutes=12))
    panel.model.tick()
    assert index.data() == "expired 2m 01s ago"


def test_csv_export_writes_visible_columns_of_filtered_rows_in_view_order(
    qtbot, fleet_100k
) -> None:
    panel = make_panel(qtbot, fleet_100k)
    panel.table.horizontalHeader().setSectionHidden(COL_FIRMWARE, True)
    panel.table.horizontalHeader().moveSection(COL_MODEL, 1)  # model shown second
    panel.state_filter.setCurrentIndex(panel.state_filter.findData("revoked"))
    panel.table.sortByColumn(COL_EXPIRY, Qt.SortOrder.AscendingOrder)
    stream = io.StringIO()
    columns = panel.visible_columns()
    count = write_csv(stream, panel.model, columns)
    lines = list(csv.reader(io.StringIO(stream.getvalue())))
    assert lines[0] == ["ID", "Model", "Kind", "State", "Connected", "Cert expires", "Last seen"]
    assert "Firmware" not in lines[0]
    revoked = [r for r in fleet_100k if r.state == "revoked"]
    assert count == len(revoked) == len(lines) - 1
    assert [line[0] for line in lines[1:]] == [r.id for r in panel.model.visible_rows()]
    first = panel.model.row_at(0)
    assert lines[1][1] == first.model
    # Times are written as times, not as the moving countdown.
    assert lines[1][5] == first.cert_not_after.isoformat(timespec="seconds")


def test_csv_export_defuses_spreadsheet_formulas_in_ids(qtbot) -> None:
    row = DeviceRow(id="=HYPERLINK(1)", kind="device", state="active", model="@x")
    panel = make_panel(qtbot, [row])
    stream = io.StringIO()
    write_csv(stream, panel.model, [COL_ID, COL_MODEL])
    assert list(csv.reader(io.StringIO(stream.getvalue())))[1] == ["'=HYPERLINK(1)", "'@x"]


def test_csv_export_refuses_no_columns(qtbot) -> None:
    panel = make_panel(qtbot, [])
    with pytest.raises(ValueError):
        write_csv(io.StringIO(), panel.model, [])


def test_headers_and_cells_read_as_an_operator_expects(qtbot) -> None:
    row = DeviceRow(
        id="th-1", kind="device", state="active", connected=True, model="TH-200",
        firmware_version="1.4.2",
    )
    panel = make_panel(qtbot, [row])
    model = panel.model
    assert [model.headerData(c, Qt.Orientation.Horizontal) for c in range(len(HEADERS))] == list(
        HEADERS
    )
    assert model.index(0, COL_CONNECTED).data() == "online"
    assert model.index(0, COL_LAST_SEEN).data() == "online now"
    assert model.index(0, COL_EXPIRY).data() == "—"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"text": 3}, ConsoleReason.INVALID_FILTER),
        ({"states": {"active"}}, ConsoleReason.INVALID_FILTER),
        ({"models": frozenset({1})}, ConsoleReason.INVALID_FILTER),
    ],
)
def test_a_malformed_filter_is_refused_with_its_reason(bad: dict, error: ConsoleReason) -> None:
    with pytest.raises(ConsoleError) as caught:
        FleetFilter(**bad)
    assert caught.value.reason is error
