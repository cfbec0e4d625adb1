"""CSV export of what the operator sees: the visible columns, in their on-screen order, of the
filtered rows, in the current sort order."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import TextIO

from console.models import COL_EXPIRY, COL_LAST_SEEN, HEADERS, FleetTableModel

# Moving texts ("in 3h 12m") mean nothing once written down: the file gets the times.
_ABSOLUTE = {COL_EXPIRY: "cert_not_after", COL_LAST_SEEN: "last_seen_at"}


def write_csv(stream: TextIO, model: FleetTableModel, columns: Sequence[int]) -> int:
    """Write a header and one line per shown row; returns the number of rows written."""
    if not columns:
        raise ValueError("at least one column must be visible")
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([HEADERS[c] for c in columns])
    count = 0
    for row in model.visible_rows():
        cells = []
        for column in columns:
            attribute = _ABSOLUTE.get(column)
            if attribute is not None:
                moment = getattr(row, attribute)
                cells.append(moment.isoformat(timespec="seconds") if moment else "")
            else:
                cells.append(model.cell_text(row, column))
        writer.writerow(_defuse(cells))
        count += 1
    return count


def _defuse(cells: list[str]) -> list[str]:
    """A cell starting with = + - @ is a formula to a spreadsheet; a device id is chosen by
    whoever built the device, so it is quoted out (OWASP "CSV injection")."""
    return ["'" + c if c[:1] in ("=", "+", "-", "@", "\t", "\r") else c for c in cells]
