"""``fleetgate bench console``: how the console's fleet table copes with a large fleet.

Offscreen, with synthetic rows: the time to load them into the table (model reset, view shown,
events processed until it has painted), a substring filter, a sort, and a live update of one
row while every row is selected. Goals: load <= 2 s, filter and sort <= 100 ms for 100k rows.
Parsing the rows from the admin API's JSON is reported separately (``parse_s``): it happens off
the table, once per full load.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from rich.table import Table

__all__ = ["render_console_bench", "run_console_bench"]

_REPEATS = 5
GOAL_LOAD_S = 2.0
GOAL_FILTER_MS = 100.0
GOAL_SORT_MS = 100.0


def _wire(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "kind": row.kind,
        "state": row.state,
        "model": row.model,
        "manufacturer": row.manufacturer,
        "firmware_version": row.firmware_version,
        "connected": row.connected,
        "last_seen_at": row.last_seen_at.isoformat() if row.last_seen_at else None,
        "cert_not_after": row.cert_not_after.isoformat() if row.cert_not_after else None,
        "role": None,
    }


def run_console_bench(devices: int = 100_000) -> dict[str, Any]:
    """Measure the fleet table with ``devices`` synthetic rows; figures in s and ms."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError("devices must be a positive int")
    # Before PySide6 loads: a benchmark must not need a display.
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import PySide6
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QApplication

    from console.models import COL_EXPIRY, COL_STATE, FleetFilter, FleetTableModel
    from console.rows import rows_from_wire
    from console.synthetic import synthetic_rows
    from console.table_view import FleetTableView
    from console.theme import apply_dark_theme

    existing = QApplication.instance()
    app = existing if isinstance(existing, QApplication) else QApplication(["fleetgate-bench"])
    apply_dark_theme(app)
    now = datetime.now(UTC)
    rows = synthetic_rows(devices, now)
    wire = [_wire(r) for r in rows]

    started = time.perf_counter()
    parsed, skipped = rows_from_wire(wire)
    parse_s = time.perf_counter() - started
    assert not skipped and len(parsed) == devices

    model = FleetTableModel()
    view = FleetTableView()
    view.setModel(model)
    view.resize(1280, 800)
    started = time.perf_counter()
    model.set_rows(parsed)
    view.show()
    app.processEvents()
    load_s = time.perf_counter() - started

    def timed(action: Any) -> float:
        begin = time.perf_counter()
        action()
        app.processEvents()
        return (time.perf_counter() - begin) * 1000

    # One model's rows in a block of ids (2,000 of 100,000; 400 of 2,000): the filter still
    # walks every row.
    needle = rows[len(rows) // 2].id[:-4]
    filter_runs = []
    for _ in range(_REPEATS):
        filter_runs.append(timed(lambda: model.set_filter(FleetFilter(text=needle))))
        shown = model.shown
        model.set_filter(FleetFilter())
        app.processEvents()
    sort_runs = []
    for n in range(_REPEATS):
        order = Qt.SortOrder.DescendingOrder if n % 2 else Qt.SortOrder.AscendingOrder
        sort_runs.append(timed(lambda order=order: model.sort(COL_EXPIRY, order)))
    model.sort(COL_STATE)
    app.processEvents()
    view.selectAll()
    app.processEvents()
    live_runs = []
    for n in range(_REPEATS):
        changed = rows[n].with_changes(connected=not rows[n].connected)
        live_runs.append(timed(lambda changed=changed: model.update_rows([changed])))
    view.close()
    view.deleteLater()
    return {
        "devices": devices,
        "parse_s": round(parse_s, 3),
        "load_s": round(load_s, 3),
        "filter_ms": round(statistics.median(filter_runs), 1),
        "filter_shown": shown,
        "sort_ms": round(statistics.median(sort_runs), 1),
        "live_update_ms": round(statistics.median(live_runs), 1),
        "goals": {"load_s": GOAL_LOAD_S, "filter_ms": GOAL_FILTER_MS, "sort_ms": GOAL_SORT_MS},
        "python": platform.python_version(),
        "pyside6": PySide6.__version__,
        "qt_platform": app.platformName(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
    }


def render_console_bench(result: dict[str, Any]) -> Table:
    table = Table(title="Console fleet table benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("rows", f"{result['devices']:,}"),
        ("parse from JSON", f"{result['parse_s']:.3f} s"),
        (f"load into the table (goal <= {GOAL_LOAD_S:g} s)", f"{result['load_s']:.3f} s"),
        (
            f"substring filter (goal <= {GOAL_FILTER_MS:g} ms)",
            f"{result['filter_ms']:.1f} ms ({result['filter_shown']:,} shown)",
        ),
        (f"sort by expiry (goal <= {GOAL_SORT_MS:g} ms)", f"{result['sort_ms']:.1f} ms"),
        ("live update, all rows selected", f"{result['live_update_ms']:.1f} ms"),
        ("python", str(result["python"])),
        ("PySide6", str(result["pyside6"])),
        ("Qt platform", str(result["qt_platform"])),
        ("machine", str(result["machine"])),
    ]
    for label, value in rows:
        table.add_row(label, value)
    return table
