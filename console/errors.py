"""Errors the console raises itself, each with a stable reason code.

Errors from the gateway arrive as ``gateway.admin.client.AdminError`` and are shown as they
come (their reason codes are the admin API's); these cover what the console checks on its own.
"""

from __future__ import annotations

from enum import StrEnum


class ConsoleReason(StrEnum):
    INVALID_ROW = "invalid_row"
    INVALID_FILTER = "invalid_filter"
    PROFILE_MISSING = "profile_missing"
    PASSPHRASE_MISSING = "passphrase_missing"
    SCREENSHOT_TIMEOUT = "screenshot_timeout"


class ConsoleError(Exception):
    """Something the console refused or could not do; ``reason`` is stable, ``detail`` human."""

    def __init__(self, reason: ConsoleReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
