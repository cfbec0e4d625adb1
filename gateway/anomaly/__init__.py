"""Behaviour baselines and anomaly detection: a pure core (no sockets, no database, no
asyncio, clock injected) fed by ``gateway.observe`` observations. docs/anomaly.md explains what
is measured, each statistic and detection, and the policy table of fleetgate.toml."""

from gateway.anomaly.baseline import RateReference, RateStats, ReferenceSource
from gateway.anomaly.context import ContextLookup, IdentityContext
from gateway.anomaly.detect import Detection, DetectionKind, EvidenceValue
from gateway.anomaly.engine import AnomalyEngine, IdentitySnapshot, Verdict
from gateway.anomaly.metrics import host_of, normalise_topic
from gateway.anomaly.policy import DEFAULT_RULES, MIN_LIFETIME_SECONDS, Action, Match, Policy, Rule
from gateway.anomaly.settings import AnomalySettings, AnomalySettingsError, Thresholds

__all__ = [
    "DEFAULT_RULES",
    "MIN_LIFETIME_SECONDS",
    "Action",
    "AnomalyEngine",
    "AnomalySettings",
    "AnomalySettingsError",
    "ContextLookup",
    "Detection",
    "DetectionKind",
    "EvidenceValue",
    "IdentityContext",
    "IdentitySnapshot",
    "Match",
    "Policy",
    "RateReference",
    "RateStats",
    "ReferenceSource",
    "Rule",
    "Thresholds",
    "Verdict",
    "host_of",
    "normalise_topic",
]
