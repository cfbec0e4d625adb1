"""Mosquitto 2 with the dynamic-security plugin as the gateway's production broker.

``MosquittoBroker`` implements ``gateway.broker_control.BrokerControl``: per-identity dynsec
roles derived from ``gateway.acl``, quarantine in place, revocation by a deny-all role and a
kick plus a CRL file reloaded with SIGHUP, and enrollment on a second, bridged instance with
per-client-id ACL patterns. ``config``, ``enrollment`` and ``dynsec`` are pure builders;
``commit`` groups concurrent dynsec changes into few messages, urgent ones first; ``process``
runs and supervises each broker; ``sessions`` reads who is connected from their notices and
``handshakes`` which connections the operational listener refused; ``observe`` says what else
Mosquitto can tell about an identity's activity; ``crl`` checks a CRL before it is installed.
"""

from gateway.mosquitto.broker import (
    IdentityLike,
    ListenerPorts,
    Listeners,
    MosquittoBroker,
    ServerTls,
    ServerTlsMaterial,
)
from gateway.mosquitto.commit import GroupCommit
from gateway.mosquitto.config import MosquittoConfig, render_config
from gateway.mosquitto.crl import check_crl, needs_refresh
from gateway.mosquitto.enrollment import (
    EnrollmentConfig,
    render_enrollment_acl,
    render_enrollment_config,
    render_monitor_acl,
    render_password_file,
)
from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from gateway.mosquitto.handshakes import HandshakeRefused, HandshakeWatch
from gateway.mosquitto.observe import DEVICE_PUBLISH_FILTERS, published
from gateway.mosquitto.process import (
    MosquittoProcess,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
)
from gateway.mosquitto.sessions import Connected, Disconnected, Session, SessionTracker

__all__ = [
    "DEVICE_PUBLISH_FILTERS",
    "Connected",
    "Disconnected",
    "EnrollmentConfig",
    "GroupCommit",
    "HandshakeRefused",
    "HandshakeWatch",
    "IdentityLike",
    "ListenerPorts",
    "Listeners",
    "MosquittoBroker",
    "MosquittoConfig",
    "MosquittoError",
    "MosquittoProcess",
    "MosquittoReason",
    "ServerTls",
    "ServerTlsMaterial",
    "Session",
    "SessionTracker",
    "check_crl",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
    "needs_refresh",
    "published",
    "render_config",
    "render_enrollment_acl",
    "render_enrollment_config",
    "render_monitor_acl",
    "render_password_file",
]
