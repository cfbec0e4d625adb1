"""Errors of the enrollment core; each carries a stable reason code."""

from __future__ import annotations

from gateway.protocol.reasons import ReasonCode


class EnrollmentRejected(Exception):
    """A request refused for ``code``; becomes an ``error`` response and a ``reject`` audit
    event at the service boundary."""

    def __init__(self, code: ReasonCode, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = code
        self.detail = detail
