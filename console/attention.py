"""The attention panel: everything that waits for a person.

Pending approvals, certificates about to expire, quarantined identities, clone and anomaly
events, and unknown identities the broker refused. Double-clicking an entry that names an
identity selects it in the fleet table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QLabel, QTreeWidget, QTreeWidgetItem, QVBoxLayout, QWidget

from console import theme
from console.bridge import RequestFailure

# (key in the ``attention`` answer, heading, colour of the heading)
SECTIONS = (
    ("pending", "Pending approval", theme.STATE_COLOURS["pending"]),
    ("expiring", "Certificates expiring", theme.WARNING_COLOUR),
    ("quarantined", "Quarantined", theme.STATE_COLOURS["quarantined"]),
    ("events", "Clone and anomaly events", theme.DANGER_COLOUR),
    ("unknown", "Unknown identities (refused connections)", theme.OFFLINE_COLOUR),
)
ID_ROLE = Qt.ItemDataRole.UserRole + 1


def _text(value: object) -> str:
    return "" if value is None else str(value)


def describe(section: str, entry: object) -> tuple[str, str | None]:
    """The line shown for one entry and the identity it names (None when it names none)."""
    if isinstance(entry, str):
        return entry, entry
    if not isinstance(entry, Mapping):
        return _text(entry), None
    if section == "events":
        subject = entry.get("subject")
        data = entry.get("data")
        details = (
            ", ".join(f"{k} {v}" for k, v in data.items()) if isinstance(data, Mapping) else ""
        )
        line = f"{_text(entry.get('kind'))} {_text(subject)} at {_text(entry.get('at'))}"
        return (f"{line} ({details})" if details else line), (
            subject if isinstance(subject, str) and subject else None
        )
    if section == "unknown":
        who = entry.get("client_id") or entry.get("cert_subject") or "anonymous"
        count = entry.get("count", 1)
        line = (
            f"{_text(who)} from {_text(entry.get('remote'))}: {_text(entry.get('reason'))}, "
            f"{count} times (last {_text(entry.get('last_seen'))})"
        )
        issuer = entry.get("cert_issuer")
        return (f"{line}, issuer {issuer}" if issuer else line), None
    identity_id = entry.get("id")
    if isinstance(identity_id, str) and identity_id:
        extra = entry.get("cert_not_after") or entry.get("model") or ""
        return (f"{identity_id}  {extra}" if extra else identity_id), identity_id
    return _text(entry), None


class AttentionPanel(QWidget):
    identity_activated = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        self.status = QLabel("Waiting for the gateway…")
        layout.addWidget(self.status)
        self.tree = QTreeWidget()
        self.tree.setHeaderHidden(True)
        self.tree.itemDoubleClicked.connect(self._activated)
        layout.addWidget(self.tree)
        self.counts: dict[str, int] = {key: 0 for key, _, _ in SECTIONS}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def show_attention(self, data: Mapping[str, Any]) -> None:
        """Show a fresh ``attention`` answer. A section the operator collapsed stays collapsed;
        one that was empty opens when entries arrive (they are news)."""
        expanded = {group.data(0, ID_ROLE) for group in self._groups() if group.isExpanded()}
        self.tree.clear()
        for key, heading, colour in SECTIONS:
            entries = data.get(key)
            entries = entries if isinstance(entries, list) else []
            was_empty = self.counts[key] == 0
            self.counts[key] = len(entries)
            group = QTreeWidgetItem([f"{heading} ({len(entries)})"])
            group.setData(0, ID_ROLE, key)
            group.setForeground(0, QColor(colour if entries else theme.OFFLINE_COLOUR))
            font = group.font(0)
            font.setBold(True)
            group.setFont(0, font)
            for entry in entries:
                line, identity_id = describe(key, entry)
                item = QTreeWidgetItem([line])
                item.setData(0, ID_ROLE, identity_id)
                if identity_id:
                    item.setToolTip(0, "Double-click to select it in the fleet table")
                group.addChild(item)
            self.tree.addTopLevelItem(group)
            group.setExpanded(bool(entries) and (was_empty or key in expanded))
        self.status.setText(
            "Nothing needs attention." if self.total == 0 else f"{self.total} items need attention."
        )

    def show_error(self, failure: RequestFailure) -> None:
        self.status.setText(
            f"<span style='color:{theme.DANGER_COLOUR}'>Could not load: {failure}</span>"
        )

    def _groups(self) -> list[QTreeWidgetItem]:
        groups = (self.tree.topLevelItem(n) for n in range(self.tree.topLevelItemCount()))
        return [g for g in groups if g is not None]

    def section_lines(self, key: str) -> list[str]:
        for group in self._groups():
            if group.data(0, ID_ROLE) == key:
                children = (group.child(c) for c in range(group.childCount()))
                return [child.text(0) for child in children if child is not None]
        return []

    def _activated(self, item: QTreeWidgetItem, _column: int) -> None:
        if item.parent() is None:
            return
        identity_id = item.data(0, ID_ROLE)
        if isinstance(identity_id, str) and identity_id:
            self.identity_activated.emit(identity_id)
