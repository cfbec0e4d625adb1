"""Mosquitto 2 with the dynamic-security plugin as the gateway's production broker.

``MosquittoBroker`` implements ``gateway.broker_control.BrokerControl``: per-identity dynsec
roles derived from ``gateway.acl``, quarantine in place, revocation by ``deleteClient`` plus a
CRL file reloaded with SIGHUP, and enrollment on a second, bridged instance with per-client-id
ACL patterns. ``config``, ``enrollment`` and ``dynsec`` are pure builders; ``process`` runs and
supervises each broker; ``sessions`` reads who is connected from their notices; ``crl`` keeps
the CRL from expiring.
"""

from gateway.mosquitto.broker import (
    IdentityLike,
    ListenerPorts,
    Listeners,
    MosquittoBroker,
    ServerTls,
    ServerTlsMaterial,
)
from gateway.mosquitto.config import MosquittoConfig, render_config
from gateway.mosquitto.crl import CrlKeeper, check_crl, needs_refresh
from gateway.mosquitto.enrollment import (
    EnrollmentConfig,
    render_enrollment_acl,
    render_enrollment_config,
    render_monitor_acl,
    render_password_file,
)
from gateway.mosquitto.errors import MosquittoError, MosquittoReason
from gateway.mosquitto.process import (
    MosquittoProcess,
    find_dynsec_plugin,
    find_mosquitto,
    free_port,
)
from gateway.mosquitto.sessions import Connected, Disconnected, Session, SessionTracker

__all__ = [
    "Connected",
    "CrlKeeper",
    "Disconnected",
    "EnrollmentConfig",
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
    "render_config",
    "render_enrollment_acl",
    "render_enrollment_config",
    "render_monitor_acl",
    "render_password_file",
]
