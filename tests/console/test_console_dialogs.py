"""Confirmation dialogs: every id listed, Cancel the default, revoke unlocked only by typing
the count (or the id); the results dialog shows every device, failures first."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDialog

from console.bulk import DeviceResult
from console.dialogs import ConfirmDialog, ResultsDialog, revoke_confirmation_text

IDS = ["th-200-a-00001", "th-200-a-00002", "th-200-a-00003"]


@pytest.mark.parametrize("action", ["approve", "quarantine", "release", "revoke"])
def test_the_dialog_lists_every_affected_id_and_cancel_is_the_default(qtbot, action) -> None:
    dialog = ConfirmDialog(action, IDS)
    qtbot.addWidget(dialog)
    assert dialog.id_list.toPlainText().splitlines() == IDS
    assert dialog.cancel_button.isDefault()
    assert not dialog.confirm_button.isDefault()
    assert not dialog.confirm_button.autoDefault()
    assert "3 devices" in dialog.windowTitle()


def test_enter_cancels_instead_of_confirming(qtbot) -> None:
    dialog = ConfirmDialog("quarantine", IDS)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.keyClick(dialog.reason_edit, Qt.Key.Key_Return)
    assert dialog.result() == QDialog.DialogCode.Rejected


def test_revoke_stays_locked_until_the_number_of_devices_is_typed(qtbot) -> None:
    dialog = ConfirmDialog("revoke", IDS)
    qtbot.addWidget(dialog)
    dialog.show()
    assert dialog.confirmation_edit is not None
    assert not dialog.confirm_button.isEnabled()
    qtbot.keyClicks(dialog.confirmation_edit, "2")
    assert not dialog.confirm_button.isEnabled()
    dialog.accept()  # the keyboard path is guarded too
    assert dialog.result() != QDialog.DialogCode.Accepted
    dialog.confirmation_edit.clear()
    qtbot.keyClicks(dialog.confirmation_edit, "3")
    assert dialog.confirm_button.isEnabled()
    dialog.reason_edit.setText("stolen in transit")
    qtbot.mouseClick(dialog.confirm_button, Qt.MouseButton.LeftButton)
    assert dialog.result() == QDialog.DialogCode.Accepted
    assert dialog.reason() == "stolen in transit"


def test_revoking_one_device_asks_for_its_id(qtbot) -> None:
    dialog = ConfirmDialog("revoke", IDS[:1])
    qtbot.addWidget(dialog)
    assert revoke_confirmation_text(IDS[:1]) == IDS[0]
    dialog.confirmation_edit.setText("1")
    assert not dialog.confirm_button.isEnabled()
    dialog.confirmation_edit.setText(IDS[0])
    assert dialog.confirm_button.isEnabled()


def test_quarantine_needs_no_typing_and_gets_a_default_reason(qtbot) -> None:
    dialog = ConfirmDialog("quarantine", IDS)
    qtbot.addWidget(dialog)
    assert dialog.confirmation_edit is None
    assert dialog.confirm_button.isEnabled()
    assert dialog.reason() == "quarantine from the console"


@pytest.mark.parametrize(("action", "ids"), [("delete", IDS), ("revoke", [])])
def test_a_confirmation_of_nothing_or_of_an_unknown_action_is_refused(action, ids) -> None:
    with pytest.raises(ValueError):
        ConfirmDialog(action, ids)


def test_results_show_every_device_with_failures_first(qtbot) -> None:
    results = [
        DeviceResult("th-1", True, state="quarantined"),
        DeviceResult("th-2", False, reason="forbidden", detail="needs the operator role"),
        DeviceResult("th-3", True, state="quarantined"),
    ]
    dialog = ResultsDialog("quarantine", results)
    qtbot.addWidget(dialog)
    rows = dialog.row_texts()
    assert rows[0] == ("th-2", "forbidden", "needs the operator role")
    assert sorted(r[0] for r in rows) == ["th-1", "th-2", "th-3"]
    assert "2 done, 1 failed" in dialog.windowTitle()
