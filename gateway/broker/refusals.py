"""Connection attempts the broker turned away, reported to the console's "unknown identities"
view and counted in the broker's metrics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pki.clock import require_aware

__all__ = ["RefusalReason", "RefusedConnection", "peer_address", "remote_host"]

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class RefusalReason(StrEnum):
    """Stable reason codes for a refused connection (TLS, MQTT CONNECT and policy levels)."""

    # TLS handshake (operational listener verifies client certificates)
    NO_CLIENT_CERTIFICATE = "no_client_certificate"
    UNKNOWN_CA = "unknown_ca"
    CERTIFICATE_REVOKED = "certificate_revoked"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    CERTIFICATE_WRONG_PURPOSE = "certificate_wrong_purpose"
    CERTIFICATE_INVALID = "certificate_invalid"
    CRL_UNUSABLE = "crl_unusable"  # missing or expired CRL: every client is refused until fixed
    CLIENT_REJECTED_SERVER = "client_rejected_server"  # the client did not trust our certificate
    TLS_HANDSHAKE_FAILED = "tls_handshake_failed"
    TLS_HANDSHAKE_TIMEOUT = "tls_handshake_timeout"
    CONNECTION_CLOSED = "connection_closed"  # gone before saying anything useful
    # a verified certificate that does not name one of our identities
    NOT_OUR_IDENTITY = "not_our_identity"
    # MQTT CONNECT
    CONNECT_TIMEOUT = "connect_timeout"
    MALFORMED_CONNECT = "malformed_connect"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    BAD_CLIENT_ID = "bad_client_id"
    BAD_CREDENTIALS = "bad_credentials"
    CLIENT_ID_IN_USE = "client_id_in_use"
    WILL_NOT_ALLOWED = "will_not_allowed"
    CLONE_DETECTED = "clone_detected"  # the same device identity is already connected
    # policy (the values of gateway.acl.Refusal)
    NOT_ENROLLED = "not_enrolled"
    DEVICE_PENDING = "device_pending"
    DEVICE_REVOKED = "device_revoked"
    IDENTITY_PENDING = "identity_pending"
    IDENTITY_REVOKED = "identity_revoked"
    CLIENT_ID_MISMATCH = "client_id_mismatch"
    WRONG_LISTENER = "wrong_listener"
    SHUTTING_DOWN = "shutting_down"


def peer_address(host: str, port: int) -> str:
    """A peer as "host:port", an IPv6 host in brackets ("[2001:db8::]:40000") so that its own
    colons cannot be read as the port's (``remote_host`` reads it back)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def remote_host(remote: str) -> str:
    """The host of a peer: "[v6]:port" -> "v6", "v4:port" -> "v4"; a bare address (no port,
    as Mosquitto logs one when a handshake fails at once) is all host. An IPv6 address with
    a port is only told from one without in brackets: unbracketed, it is taken as bare."""
    if remote.startswith("["):
        host, bracket, rest = remote[1:].partition("]")
        if bracket and host and (not rest or (rest[0] == ":" and rest[1:].isdigit())):
            return host
        return remote
    host, sep, port = remote.partition(":")
    if sep and host and port.isdigit():  # one colon only: an IPv4 address or a name
        return host
    return remote


@dataclass(frozen=True)
class RefusedConnection:
    """One refused attempt. Certificate fields describe the client's leaf certificate when it
    presented one, including certificates from CAs we do not trust (that is what the console
    shows as an unknown identity)."""

    listener: str
    remote: str  # "host:port", "[v6 host]:port" (``peer_address``) or the host alone
    reason: str  # a RefusalReason value
    client_id: str | None
    cert_subject: str | None  # RFC 4514
    cert_issuer: str | None  # RFC 4514
    cert_fingerprint: str | None  # sha256 hex of the certificate DER
    at: datetime
    cert_serial: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        for name in ("listener", "remote", "reason"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty str")
        fingerprint = self.cert_fingerprint
        if fingerprint is not None and _FINGERPRINT.fullmatch(fingerprint) is None:
            raise ValueError("cert_fingerprint must be 64 lower-case hex digits")
        object.__setattr__(self, "at", require_aware(self.at, "at"))
