"""The device detail pane: attestation facts, telemetry rate, certificate chain, history."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QFont
from PySide6.QtWidgets import (
    QFormLayout,
    QGroupBox,
    QLabel,
    QScrollArea,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from console import theme
from console.bridge import RequestFailure
from console.certs import CertSummary, summary_from_wire
from console.chart import TelemetryChart
from console.rows import short_time

ATTESTATION_FIELDS = (
    ("manufacturer", "Manufacturer"),
    ("model", "Model"),
    ("firmware_version", "Firmware"),
    ("firmware_digest", "Firmware digest"),
    ("birth_fingerprint", "Birth certificate"),
)
CERT_COLUMNS = ("Subject", "SAN", "Serial", "Valid from", "Valid until", "Status")
HISTORY_COLUMNS = ("Time", "Actor", "Action", "Outcome", "Reasons")


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


_DIGESTS = frozenset({"firmware_digest", "birth_fingerprint"})


def _shorten(digest: str) -> str:
    """64 hex digits do not fit a side pane; the ends identify it, the tooltip has it all."""
    return f"{digest[:16]}…{digest[-8:]}" if len(digest) > 32 else digest


def _badge_style(state: str) -> str:
    colour = theme.STATE_COLOURS.get(state, theme.UNKNOWN_STATE_COLOUR)
    return (
        f"background:{colour}; color:white; border-radius:9px; padding:2px 10px; "
        "font-weight:bold;"
    )


class DetailPane(QScrollArea):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWidgetResizable(True)
        # Long values are shortened or scroll inside their own table, never the whole pane.
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.identity_id: str | None = None
        body = QWidget()
        layout = QVBoxLayout(body)

        header = QWidget()
        header_layout = QVBoxLayout(header)
        header_layout.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel("No device selected")
        title_font = QFont(self.title.font())
        title_font.setPointSizeF(title_font.pointSizeF() * 1.3)
        title_font.setBold(True)
        self.title.setFont(title_font)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.badge = QLabel()
        self.badge.setVisible(False)
        self.status = QLabel("Select a row to see its certificates, history and telemetry.")
        self.status.setWordWrap(True)
        header_layout.addWidget(self.title)
        header_layout.addWidget(self.badge, alignment=Qt.AlignmentFlag.AlignLeft)
        header_layout.addWidget(self.status)
        layout.addWidget(header)

        attestation_box = QGroupBox("Attestation")
        self.attestation_form = QFormLayout(attestation_box)
        self.attestation_labels: dict[str, QLabel] = {}
        for key, label in ATTESTATION_FIELDS:
            value = QLabel("—")
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            value.setWordWrap(True)
            if key in ("firmware_digest", "birth_fingerprint"):
                value.setFont(QFont("monospace"))
            self.attestation_labels[key] = value
            self.attestation_form.addRow(label, value)
        layout.addWidget(attestation_box)

        telemetry_box = QGroupBox("Telemetry, messages per minute")
        telemetry_layout = QVBoxLayout(telemetry_box)
        self.chart = TelemetryChart()
        self.telemetry_total = QLabel("")
        telemetry_layout.addWidget(self.chart)
        telemetry_layout.addWidget(self.telemetry_total)
        layout.addWidget(telemetry_box)

        chain_box = QGroupBox("Certificate chain")
        chain_layout = QVBoxLayout(chain_box)
        self.certificates = QTreeWidget()
        self.certificates.setHeaderLabels(list(CERT_COLUMNS))
        self.certificates.setRootIsDecorated(False)
        self.certificates.setMinimumHeight(110)
        chain_layout.addWidget(self.certificates)
        layout.addWidget(chain_box)

        history_box = QGroupBox("History")
        history_layout = QVBoxLayout(history_box)
        self.history = QTreeWidget()
        self.history.setHeaderLabels(list(HISTORY_COLUMNS))
        self.history.setRootIsDecorated(False)
        self.history.setMinimumHeight(140)
        history_layout.addWidget(self.history)
        layout.addWidget(history_box)
        layout.addStretch(1)
        self.setWidget(body)

    def clear(self) -> None:
        self.identity_id = None
        self.title.setText("No device selected")
        self.badge.setVisible(False)
        self.status.setText("Select a row to see its certificates, history and telemetry.")
        for label in self.attestation_labels.values():
            label.setText("—")
        self.chart.set_counts(())
        self.telemetry_total.setText("")
        self.certificates.clear()
        self.history.clear()

    def show_loading(self, identity_id: str) -> None:
        if identity_id != self.identity_id:
            self.clear()
        self.identity_id = identity_id
        self.title.setText(identity_id)
        self.status.setText("Loading…")

    def show_error(self, identity_id: str, failure: RequestFailure) -> None:
        self.identity_id = identity_id
        self.title.setText(identity_id)
        self.status.setText(
            f"<span style='color:{theme.DANGER_COLOUR}'>Could not load: {failure}</span>"
        )

    def show_identity(self, data: Mapping[str, Any], ca_chain: Sequence[CertSummary] = ()) -> None:
        """Fill the pane from a ``get_identity`` answer; ``ca_chain`` (issuing CA, root) comes
        from the operator's profile and completes the chain under the identity's certificates."""
        identity = data.get("identity")
        identity = identity if isinstance(identity, Mapping) else data
        identity_id = _text(identity.get("id"))
        self.identity_id = identity_id
        self.title.setText(identity_id)
        state = _text(identity.get("state"))
        self.badge.setText(state)
        self.badge.setStyleSheet(_badge_style(state))
        self.badge.setVisible(bool(state))
        facts = [f"kind {_text(identity.get('kind'))}"]
        if identity.get("role"):
            facts.append(f"role {_text(identity.get('role'))}")
        if identity.get("connected") is True:
            facts.append("online")
        elif identity.get("last_seen_at"):
            facts.append(f"last seen {_text(identity.get('last_seen_at'))}")
        self.status.setText(" · ".join(facts))

        attestation = data.get("attestation")
        attestation = attestation if isinstance(attestation, Mapping) else identity
        for key, label in self.attestation_labels.items():
            value = _text(attestation.get(key))
            label.setText((_shorten(value) if key in _DIGESTS else value) or "—")
            label.setToolTip(value)

        telemetry = data.get("telemetry")
        telemetry = telemetry if isinstance(telemetry, Mapping) else {}
        per_minute = telemetry.get("per_minute")
        counts = (
            [int(v) for v in per_minute if isinstance(v, int | float) and not isinstance(v, bool)]
            if isinstance(per_minute, list)
            else []
        )
        self.chart.set_counts(counts)
        total = telemetry.get("total")
        self.telemetry_total.setText(
            f"{sum(counts)} in the last {len(counts)} min, {total} since the gateway started"
            if counts and total is not None
            else ""
        )

        self.certificates.clear()
        certificates = data.get("certificates")
        own = [
            summary_from_wire(c) for c in (certificates if isinstance(certificates, list) else [])
            if isinstance(c, Mapping)
        ]
        # Newest first: the one in force on top, directly above the CA that issued it.
        own.sort(key=lambda c: c.not_before, reverse=True)
        for summary in [*own, *ca_chain]:
            item = QTreeWidgetItem(
                [
                    summary.subject,
                    summary.san,
                    summary.serial,
                    summary.not_before,
                    summary.not_after,
                    summary.status,
                ]
            )
            item.setToolTip(1, summary.san)
            self.certificates.addTopLevelItem(item)
        for column in range(len(CERT_COLUMNS)):
            self.certificates.resizeColumnToContents(column)

        self.history.clear()
        history = data.get("history")
        for record in history if isinstance(history, list) else []:
            if not isinstance(record, Mapping):
                continue
            entry = record.get("entry")
            entry = entry if isinstance(entry, Mapping) else record
            self.history.addTopLevelItem(
                QTreeWidgetItem(
                    [
                        short_time(entry.get("at")),
                        _text(entry.get("actor")),
                        _text(entry.get("action")),
                        _text(entry.get("outcome")),
                        _text(entry.get("reasons")),
                    ]
                )
            )
        for column in range(len(HISTORY_COLUMNS)):
            self.history.resizeColumnToContents(column)

    def certificate_rows(self) -> list[list[str]]:
        return _tree_rows(self.certificates, len(CERT_COLUMNS))

    def history_rows(self) -> list[list[str]]:
        return _tree_rows(self.history, len(HISTORY_COLUMNS))


def _tree_rows(tree: QTreeWidget, columns: int) -> list[list[str]]:
    items = (tree.topLevelItem(n) for n in range(tree.topLevelItemCount()))
    return [[item.text(c) for c in range(columns)] for item in items if item is not None]
