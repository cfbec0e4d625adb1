"""Errors of running several gateways as one fleet, each with a stable reason code."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ClusterError", "ClusterReason"]


class ClusterReason(StrEnum):
    NEEDS_POSTGRESQL = "cluster_needs_postgresql"  # leader election lives in PostgreSQL
    # shared subscriptions: the embedded broker has none
    NEEDS_MOSQUITTO = "cluster_needs_mosquitto"
    NO_SHARED_BROKER = "no_shared_broker"  # <home>/cluster/broker.json is missing
    BAD_SHARED_BROKER = "bad_shared_broker"  # that file does not describe a broker
    RELOAD_FAILED = "broker_reload_failed"  # the shared broker could not be told to reload
    NOT_ENFORCED = "not_enforced_yet"  # recorded, but no leader confirmed enforcing it in time
    NO_LEADER = "no_leader"  # a question only the leader can answer got no answer in time


class ClusterError(Exception):
    """``reason`` is stable (logs, the console, tests); ``detail`` is for people."""

    def __init__(self, reason: ClusterReason, detail: str = "") -> None:
        self.reason = ClusterReason(reason)
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}" if detail else self.reason.value)

    def __repr__(self) -> str:
        return f"ClusterError({self.reason.value!r}, {self.detail!r})"
