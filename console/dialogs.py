"""Confirmation, results, passphrase and help dialogs.

Every destructive action is confirmed by a dialog that lists every affected id, with Cancel as
the default button (Enter never confirms). Revoke is final, so it asks for more: the number of
devices typed out (or the id itself when there is only one) before its button unlocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QDialogButtonBox,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from console import theme
from console.bulk import DeviceResult

_EXPLANATIONS = {
    "approve": "Pending devices will receive their certificate and may connect.",
    "quarantine": (
        "Quarantined devices stay connected but may publish only under their quarantine "
        "topic and get no renewal. Release undoes it."
    ),
    "release": "Released devices become active again.",
    "revoke": (
        "Revocation is final: certificates go on the CRL, sessions are cut and the devices "
        "can never connect again with these identities."
    ),
}
_VERBS = {
    "approve": "Approve",
    "quarantine": "Quarantine",
    "release": "Release",
    "revoke": "Revoke",
}


def _count(n: int) -> str:
    return f"{n} device" if n == 1 else f"{n} devices"


def revoke_confirmation_text(ids: Sequence[str]) -> str:
    """What the operator must type to revoke ``ids``: the id for one, the count for more."""
    return ids[0] if len(ids) == 1 else str(len(ids))


class ConfirmDialog(QDialog):
    """Lists every affected id; asks for a reason; Cancel is the default button."""

    def __init__(self, action: str, ids: Sequence[str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        if action not in _VERBS:
            raise ValueError(f"unknown action {action!r}")
        if not ids:
            raise ValueError("nothing to confirm: no ids")
        self.action = action
        self.ids = tuple(ids)
        verb = _VERBS[action]
        self.setWindowTitle(f"{verb} {_count(len(ids))}")
        layout = QVBoxLayout(self)
        title = QLabel(f"<b>{verb} {_count(len(ids))}?</b>")
        layout.addWidget(title)
        explanation = QLabel(_EXPLANATIONS[action])
        explanation.setWordWrap(True)
        layout.addWidget(explanation)

        self.id_list = QPlainTextEdit("\n".join(self.ids))
        self.id_list.setReadOnly(True)
        self.id_list.setFont(QFont("monospace"))
        self.id_list.setMaximumHeight(180)
        layout.addWidget(self.id_list)

        self.reason_edit = QLineEdit()
        self.reason_edit.setPlaceholderText("Reason (goes into the audit trail)")
        layout.addWidget(self.reason_edit)

        self.confirmation_edit: QLineEdit | None = None
        self.expected_confirmation = ""
        if action == "revoke":
            self.expected_confirmation = revoke_confirmation_text(self.ids)
            what = "the device id" if len(self.ids) == 1 else "the number of devices"
            prompt = QLabel(
                f"Type {what}, <b>{self.expected_confirmation}</b>, to confirm the revocation:"
            )
            layout.addWidget(prompt)
            self.confirmation_edit = QLineEdit()
            self.confirmation_edit.setObjectName("revoke-confirmation")
            self.confirmation_edit.textChanged.connect(self._update_confirm_button)
            layout.addWidget(self.confirmation_edit)

        buttons = QDialogButtonBox()
        self.confirm_button = QPushButton(f"{verb} {_count(len(ids))}")
        self.cancel_button = QPushButton("Cancel")
        buttons.addButton(self.confirm_button, QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.addButton(self.cancel_button, QDialogButtonBox.ButtonRole.RejectRole)
        # Enter in any field presses the default button: it must be Cancel.
        for button, default in ((self.confirm_button, False), (self.cancel_button, True)):
            button.setAutoDefault(default)
            button.setDefault(default)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)
        if self.confirmation_edit is not None:
            self.confirm_button.setEnabled(False)
            self.confirmation_edit.setFocus()
        else:
            self.cancel_button.setFocus()

    def _update_confirm_button(self, text: str) -> None:
        self.confirm_button.setEnabled(self.confirmation_matches(text))

    def confirmation_matches(self, text: str) -> bool:
        return self.confirmation_edit is None or text.strip() == self.expected_confirmation

    def accept(self) -> None:
        # The button is disabled until the text matches; this guards the keyboard path too.
        if self.confirmation_edit is not None and not self.confirmation_matches(
            self.confirmation_edit.text()
        ):
            return
        super().accept()

    def reason(self) -> str:
        return self.reason_edit.text().strip() or f"{self.action} from the console"


ConfirmFn = Callable[[QWidget, str, Sequence[str]], str | None]


def confirm_action(parent: QWidget, action: str, ids: Sequence[str]) -> str | None:
    """Ask; the reason to record when confirmed, None when cancelled."""
    dialog = ConfirmDialog(action, ids, parent)
    if dialog.exec() == QDialog.DialogCode.Accepted:
        return dialog.reason()
    return None


class ResultsDialog(QDialog):
    """One line per device: done, or the reason it was refused. Not modal: an operator keeps
    working while reading a long list."""

    def __init__(
        self, action: str, results: Sequence[DeviceResult], parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.results = tuple(results)
        succeeded = sum(r.ok for r in results)
        failed = len(results) - succeeded
        self.setWindowTitle(f"{_VERBS.get(action, action)}: {succeeded} done, {failed} failed")
        self.resize(640, 420)
        layout = QVBoxLayout(self)
        self.summary = QLabel(
            f"<b>{_VERBS.get(action, action)}</b>: {succeeded} done, {failed} failed"
        )
        layout.addWidget(self.summary)
        self.table = QTableWidget(len(results), 3)
        self.table.setHorizontalHeaderLabels(["ID", "Result", "Detail"])
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        # Failures first: they are what needs reading.
        ordered = sorted(results, key=lambda r: r.ok)
        for row, result in enumerate(ordered):
            outcome = (result.state or "done") if result.ok else result.reason
            colour = theme.OK_COLOUR if result.ok else theme.DANGER_COLOUR
            for column, text in enumerate((result.id, outcome, result.detail)):
                item = QTableWidgetItem(text)
                if column == 1:
                    item.setForeground(QColor(colour))
                self.table.setItem(row, column, item)
        self.table.resizeColumnsToContents()
        layout.addWidget(self.table)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        layout.addWidget(close)

    def row_texts(self) -> list[tuple[str, str, str]]:
        rows = []
        for row in range(self.table.rowCount()):
            cells = [self.table.item(row, c) for c in range(3)]
            rows.append(tuple(c.text() if c is not None else "" for c in cells))
        return rows  # type: ignore[return-value]


def ask_passphrase(parent: QWidget | None, profile: str) -> bytes | None:
    text, ok = QInputDialog.getText(
        parent,
        "Fleetgate console",
        f"Passphrase of the operator profile {profile}:",
        QLineEdit.EchoMode.Password,
    )
    if not ok or not text:
        return None
    return text.encode("utf-8")


def shortcuts_html(shortcuts: Sequence[tuple[str, str]]) -> str:
    rows = "".join(
        f"<tr><td style='padding-right:16px'><b>{keys}</b></td><td>{what}</td></tr>"
        for keys, what in shortcuts
    )
    return f"<table>{rows}</table>"


class ShortcutsDialog(QDialog):
    def __init__(self, shortcuts: Sequence[tuple[str, str]], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Keyboard shortcuts")
        layout = QVBoxLayout(self)
        label = QLabel(shortcuts_html(shortcuts))
        label.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(label)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        layout.addWidget(close)
