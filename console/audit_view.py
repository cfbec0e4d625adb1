"""The audit view: the hash-chained trail, filtered by actor, subject, action and time, with
the gateway's verdict on whether the chain verifies."""

from __future__ import annotations

import html
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from PySide6.QtCore import QDateTime, QTimeZone, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDateTimeEdit,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from console import theme
from console.bridge import RequestFailure
from console.rows import short_time

COLUMNS = ("Seq", "Time", "Actor", "Action", "Subject", "Outcome", "Reasons")
KNOWN_ACTIONS = (
    "enroll",
    "renew",
    "approve",
    "quarantine",
    "release",
    "revoke",
    "reject",
    "token_create",
    "operator_add",
    "set_role",
    "revoke_operator",
)
DEFAULT_LIMIT = 500


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _iso(edit: QDateTimeEdit) -> str:
    moment = edit.dateTime().toSecsSinceEpoch()
    return datetime.fromtimestamp(moment, UTC).isoformat()


class AuditView(QWidget):
    query_requested = Signal(dict)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        filters = QHBoxLayout()
        self.actor = QLineEdit()
        self.actor.setPlaceholderText("actor, e.g. operator:alice")
        self.subject = QLineEdit()
        self.subject.setPlaceholderText("subject (device id)")
        self.action = QComboBox()
        self.action.setEditable(True)
        self.action.addItems(["", *KNOWN_ACTIONS])
        action_edit = self.action.lineEdit()
        if action_edit is not None:
            action_edit.setPlaceholderText("action")
        now = QDateTime.currentDateTimeUtc()
        self.use_since = QCheckBox("since")
        self.since = QDateTimeEdit(now.addSecs(-24 * 3600))
        self.use_until = QCheckBox("until")
        self.until = QDateTimeEdit(now)
        for edit in (self.since, self.until):
            edit.setCalendarPopup(True)
            edit.setDisplayFormat("yyyy-MM-dd HH:mm")
            edit.setTimeZone(QTimeZone.utc())
        self.limit = QSpinBox()
        self.limit.setRange(1, 10_000)
        self.limit.setValue(DEFAULT_LIMIT)
        self.limit.setPrefix("last ")
        self.apply_button = QPushButton("Apply")
        self.apply_button.clicked.connect(self.request)
        for line in (self.actor, self.subject):
            line.returnPressed.connect(self.request)
        for widget in (
            self.actor,
            self.subject,
            self.action,
            self.use_since,
            self.since,
            self.use_until,
            self.until,
            self.limit,
            self.apply_button,
        ):
            filters.addWidget(widget)
        layout.addLayout(filters)
        self.verification = QLabel("Chain: not checked yet")
        layout.addWidget(self.verification)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setStretchLastSection(True)
        layout.addWidget(self.table)

    def query(self) -> dict[str, Any]:
        """The ``audit`` request's args for the filters as set (empty filters left out)."""
        args: dict[str, Any] = {"limit": self.limit.value()}
        for key, value in (
            ("actor", self.actor.text().strip()),
            ("subject", self.subject.text().strip()),
            ("action", self.action.currentText().strip()),
        ):
            if value:
                args[key] = value
        if self.use_since.isChecked():
            args["since"] = _iso(self.since)
        if self.use_until.isChecked():
            args["until"] = _iso(self.until)
        return args

    def request(self) -> None:
        self.verification.setText("Loading…")
        self.query_requested.emit(self.query())

    def show_records(self, data: Mapping[str, Any]) -> None:
        records = data.get("records")
        if not isinstance(records, list):
            records = []
        records = [r for r in records if isinstance(r, Mapping)]
        self.table.setRowCount(len(records))
        # The gateway answers newest first: what just happened is on top.
        for row, record in enumerate(records):
            entry = record.get("entry")
            entry = entry if isinstance(entry, Mapping) else record
            values = (
                _text(record.get("seq")),
                short_time(entry.get("at")),
                _text(entry.get("actor")),
                _text(entry.get("action")),
                _text(entry.get("subject")),
                _text(entry.get("outcome")),
                _text(entry.get("reasons")),
            )
            for column, text in enumerate(values):
                item = QTableWidgetItem(text)
                if column == 5 and text not in ("ok", ""):
                    item.setForeground(QColor(theme.WARNING_COLOUR))
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        self.show_verification(data.get("verified"), len(records))

    def show_verification(self, verified: object, shown: int) -> None:
        if not isinstance(verified, Mapping):
            self.verification.setText(f"{shown} records; the gateway did not report on the chain")
            return
        checked = verified.get("checked")
        checkpoint = verified.get("last_checkpoint_seq")
        signed = (
            f"last signed checkpoint at seq {checkpoint}"
            if checkpoint is not None
            else "no signed checkpoint yet"
        )
        if verified.get("ok") is True:
            warning = verified.get("warning")
            caution = (
                f"<br><span style='color:{theme.WARNING_COLOUR}'><b>Warning:</b> "
                f"{html.escape(warning)}</span>"
                if isinstance(warning, str) and warning
                else ""
            )
            self.verification.setText(
                f"<span style='color:{theme.OK_COLOUR}'>Chain verifies: ok</span> — "
                f"{checked} records checked, {signed}; {shown} shown{caution}"
            )
        else:
            self.verification.setText(
                f"<span style='color:{theme.DANGER_COLOUR}'><b>Chain problem:</b> "
                f"{html.escape(_text(verified.get('problem')))}</span> — {shown} shown"
            )

    def show_error(self, failure: RequestFailure) -> None:
        self.verification.setText(
            f"<span style='color:{theme.DANGER_COLOUR}'>Could not load the audit trail: "
            f"{failure}</span>"
        )

    def row_texts(self) -> list[list[str]]:
        return [
            [_cell(self.table.item(r, c)) for c in range(len(COLUMNS))]
            for r in range(self.table.rowCount())
        ]


def _cell(item: QTableWidgetItem | None) -> str:
    return item.text() if item is not None else ""
