"""Protocol v1 between devices and the gateway: messages, codec, topics, reason codes, and the
device-side state machine. Pure: no sockets, no MQTT client; see docs/protocol.md."""

from gateway.protocol import topics
from gateway.protocol.codec import decode_request, decode_response, encode
from gateway.protocol.device import (
    AwaitingApproval,
    DeviceClient,
    DeviceState,
    Enrolled,
    Event,
    Rejected,
    Send,
)
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import (
    MAX_PAYLOAD,
    VERSION,
    Challenge,
    Enroll,
    Error,
    Firmware,
    Hello,
    IssuedCertificate,
    Message,
    Pending,
    Renew,
    Request,
    Response,
    TokenEnroll,
)
from gateway.protocol.reasons import Advice, ReasonCode, advice_for
from gateway.protocol.renewal import RENEWAL_DOMAIN, renewal_bytes

__all__ = [
    "MAX_PAYLOAD",
    "RENEWAL_DOMAIN",
    "VERSION",
    "Advice",
    "AwaitingApproval",
    "Challenge",
    "DeviceClient",
    "DeviceState",
    "Enroll",
    "Enrolled",
    "Error",
    "Event",
    "Firmware",
    "Hello",
    "IssuedCertificate",
    "Message",
    "Pending",
    "ProtocolError",
    "ReasonCode",
    "Rejected",
    "Renew",
    "Request",
    "Response",
    "Send",
    "TokenEnroll",
    "advice_for",
    "decode_request",
    "decode_response",
    "encode",
    "renewal_bytes",
    "topics",
]
