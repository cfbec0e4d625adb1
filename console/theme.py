"""The dark theme and the colours that carry meaning (state badges, connection, expiry).

An explicit Fusion palette: ``styleHints().setColorScheme(Dark)`` does nothing offscreen and
differs between platforms, while a palette looks the same everywhere, screenshots included.
"""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

STATE_COLOURS: dict[str, str] = {
    "pending": "#c9a227",
    "active": "#2e9d5b",
    "quarantined": "#d9822b",
    "revoked": "#c0392b",
}
UNKNOWN_STATE_COLOUR = "#6b7280"
ONLINE_COLOUR = "#4cc38a"
OFFLINE_COLOUR = "#7b8494"
WARNING_COLOUR = "#e5a50a"
DANGER_COLOUR = "#ef5350"
OK_COLOUR = "#4cc38a"
BAR_COLOUR = "#3d8fd6"

_WINDOW = "#1e2127"
_BASE = "#16181d"
_ALTERNATE = "#1b1e24"
_TEXT = "#e6e6e6"
_DISABLED_TEXT = "#6b7280"
_BUTTON = "#2a2e36"
_HIGHLIGHT = "#2f6fb3"
_LINK = "#6cb4ff"


def state_colour(state: str) -> QColor:
    return QColor(STATE_COLOURS.get(state, UNKNOWN_STATE_COLOUR))


def dark_palette() -> QPalette:
    palette = QPalette()
    role = QPalette.ColorRole
    for colour_role, colour in (
        (role.Window, _WINDOW),
        (role.WindowText, _TEXT),
        (role.Base, _BASE),
        (role.AlternateBase, _ALTERNATE),
        (role.ToolTipBase, _BUTTON),
        (role.ToolTipText, _TEXT),
        (role.PlaceholderText, _DISABLED_TEXT),
        (role.Text, _TEXT),
        (role.Button, _BUTTON),
        (role.ButtonText, _TEXT),
        (role.BrightText, "#ffffff"),
        (role.Highlight, _HIGHLIGHT),
        (role.HighlightedText, "#ffffff"),
        (role.Link, _LINK),
        (role.Light, "#3a3f4a"),
        (role.Midlight, "#30343d"),
        (role.Mid, "#262a31"),
        (role.Dark, "#111317"),
        (role.Shadow, "#000000"),
    ):
        palette.setColor(colour_role, QColor(colour))
    disabled = QPalette.ColorGroup.Disabled
    for colour_role in (role.Text, role.WindowText, role.ButtonText):
        palette.setColor(disabled, colour_role, QColor(_DISABLED_TEXT))
    return palette


def apply_dark_theme(app: QApplication) -> None:
    app.setStyle("Fusion")
    app.setPalette(dark_palette())
