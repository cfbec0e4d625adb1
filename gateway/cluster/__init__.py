"""Several gateways, one fleet: one PostgreSQL registry, one Mosquitto, N gateway processes.

- Requests: every gateway's message client subscribes the enrollment and renewal topics as
  ``$share/fleetgate/...`` (MQTT 5 shared subscriptions), so the broker hands each request to
  exactly one gateway; a request lost with a dying gateway is answered by another when the
  device retries (the protocol's request ids and the registry make retries safe).
- Control: one leader, elected by a PostgreSQL advisory lock held on a dedicated connection
  (``election``), enforces registry changes on the broker, publishes CRLs, renews the broker's
  server certificate and reacts to clones, once per change. Each gateway still admits the
  devices it certifies (an idempotent dynsec ``sync``) before their certificate leaves.
- Broker: run by a keeper process of its own (``keeper``, ``fleetgate broker``), so it
  outlives any gateway; ``<home>/cluster/broker.json`` tells the gateways where it is
  (``shared_broker``).

docs/scale-out.md explains the choices and what a failure looks like.
"""

from gateway.cluster.election import (
    LEADER_LOCK_KEY,
    LeaderLock,
    Leadership,
    MemoryLeaderLock,
    MemoryLocks,
    PostgresLeaderLock,
)
from gateway.cluster.enforced import (
    ENFORCED_TOPIC,
    EnforcementWatch,
    announcement,
    parse_announcement,
)
from gateway.cluster.errors import ClusterError, ClusterReason
from gateway.cluster.member import SHARE_GROUP, ClusterMember, default_node_name
from gateway.cluster.shared_broker import (
    SharedBroker,
    SharedBrokerControl,
    descriptor_path,
    load_shared_broker,
    save_shared_broker,
)

__all__ = [
    "ENFORCED_TOPIC",
    "LEADER_LOCK_KEY",
    "SHARE_GROUP",
    "ClusterError",
    "ClusterMember",
    "ClusterReason",
    "EnforcementWatch",
    "LeaderLock",
    "Leadership",
    "MemoryLeaderLock",
    "MemoryLocks",
    "PostgresLeaderLock",
    "SharedBroker",
    "SharedBrokerControl",
    "announcement",
    "default_node_name",
    "descriptor_path",
    "load_shared_broker",
    "parse_announcement",
    "save_shared_broker",
]
