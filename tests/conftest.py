"""Shared fixtures: a gateway home in a temp folder, and a running gateway on free ports."""

from __future__ import annotations

import os

# Qt must not look for a display: set before any test imports PySide6.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
