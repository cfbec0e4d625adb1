"""The one exception the wire codec raises."""

from __future__ import annotations

from gateway.protocol.reasons import ReasonCode


class ProtocolError(Exception):
    """A payload that is not a valid protocol v1 message.

    ``request_id`` is the message's id when it could be read before the problem was found, so
    the error response can echo it; ``None`` otherwise.
    """

    def __init__(self, code: ReasonCode, detail: str = "", request_id: str | None = None) -> None:
        super().__init__(f"{code}: {detail}" if detail else str(code))
        self.code = code
        self.detail = detail
        self.request_id = request_id
