"""The embedded MQTT broker (amqtt) with the gateway's own TLS listeners, authentication and
topic ACLs. See ``gateway.broker.embedded`` for the shape of one connection."""

from __future__ import annotations

from gateway.broker.connect import ConnackCode
from gateway.broker.embedded import INTERNAL_USERNAME, LISTENERS, EmbeddedBroker, ListenerConfig
from gateway.broker.ingress import IngressLimit
from gateway.broker.refusals import RefusalReason, RefusedConnection
from gateway.broker.tls import TlsMaterial

__all__ = [
    "INTERNAL_USERNAME",
    "LISTENERS",
    "ConnackCode",
    "EmbeddedBroker",
    "IngressLimit",
    "ListenerConfig",
    "RefusalReason",
    "RefusedConnection",
    "TlsMaterial",
]
