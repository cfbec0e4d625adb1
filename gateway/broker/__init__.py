"""The embedded MQTT broker (amqtt) with the gateway's own TLS listeners, authentication and
topic ACLs. See ``gateway.broker.embedded`` for the shape of one connection."""

from __future__ import annotations

import asyncio.sslproto

from gateway.broker.connect import ConnackCode
from gateway.broker.embedded import INTERNAL_USERNAME, LISTENERS, EmbeddedBroker, ListenerConfig
from gateway.broker.refusals import RefusalReason, RefusedConnection
from gateway.broker.tls import TlsMaterial

# asyncio gives every TLS connection a 256 KiB read buffer (~345 kB per client measured here);
# 32 KiB brought it to ~120 kB with no loss for MQTT's small packets. The attribute is
# process-global (it also applies to other asyncio TLS users in this process), so it is set once,
# here, when the broker is imported.
asyncio.sslproto.SSLProtocol.max_size = 32 * 1024

__all__ = [
    "INTERNAL_USERNAME",
    "LISTENERS",
    "ConnackCode",
    "EmbeddedBroker",
    "ListenerConfig",
    "RefusalReason",
    "RefusedConnection",
    "TlsMaterial",
]
