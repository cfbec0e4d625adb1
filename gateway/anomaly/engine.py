"""The anomaly engine: observations in, verdicts out, with the clock injected.

``observe()`` runs on the gateway's event loop for every message the brokers report: it
updates one identity's metrics in O(1), never calls the registry for an identity it already
tracks, and never raises (what it cannot use is counted in ``counters``). ``evaluate()``, called
every few seconds, learns the minutes that closed, checks the identities whose window went over
its alarm level, scans for silence, and turns detections into ``Verdict``s through the policy.

Not thread-safe: call both from one thread (the event loop). Learned state lives in memory;
after a restart the engine learns again, and peers cover new devices within minutes.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.anomaly import detect
from gateway.anomaly.baseline import OwnBaseline, PeerGroup, RateReference, ReferenceSource
from gateway.anomaly.context import ContextLookup, IdentityContext
from gateway.anomaly.detect import Detection, DetectionKind
from gateway.anomaly.metrics import PROTOCOL_PATTERNS, IdentityMetrics, host_of
from gateway.anomaly.policy import Action, Policy
from gateway.anomaly.settings import AnomalySettings
from gateway.observe import (
    CertificateIssued,
    Connected,
    Denied,
    Disconnected,
    Observation,
    Published,
    RequestRefused,
)
from gateway.store import IdentityRecord, IdentityState
from pki.clock import Clock

__all__ = ["AnomalyEngine", "IdentitySnapshot", "Verdict"]

log = logging.getLogger(__name__)

# How long "the registry does not know it" is believed before asking again: an enrollee
# becomes a registered device a moment after its enrollment succeeds.
RECHECK_UNKNOWN_SECONDS = 10.0
RECHECK_UNMONITORED_SECONDS = 300.0
# Gaps needed before their variation is believed (below: assume Poisson, the cautious choice).
MIN_GAPS = 30
MAX_PENDING = 100_000
# The wire reason code of an enrollment refused for firmware off the allow-list.
FIRMWARE_REFUSED = "firmware_not_allowed"
_CONTAINED = frozenset({IdentityState.QUARANTINED, IdentityState.REVOKED})
_NO_FIRMWARE: tuple[str | None, str | None] = (None, None)
Firmware = tuple[str | None, str | None]
GroupKey = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A detection, the action the policy chose for it and the rule that chose it."""

    detection: Detection
    action: Action
    rule: str
    lifetime_seconds: int | None = None  # with SHORTEN_LIFETIME


@dataclass(frozen=True, slots=True)
class IdentitySnapshot:
    """What the engine knows about one identity, for the admin API and the console."""

    identity: str
    messages_last_minute: int
    bytes_last_minute: int
    mean_messages: float | None  # per minute, own baseline (None: not warm yet)
    mean_bytes: float | None
    baseline_minutes: int
    reference: str  # what its window is compared with: own | peers | ceiling | unregistered
    alarm_messages: float
    alarm_bytes: float
    topic_patterns: tuple[str, ...]
    hosts: tuple[str, ...]
    denials_last_window: int
    connects_last_hour: int
    disconnects: int
    renewals: int
    firmware_reported: Firmware | None
    lifetime_cap: int | None
    reattest_required: bool


class _Subject:
    """One tracked identity: its metrics, its baseline (``None`` for identities the registry
    does not hold or whose kind is not monitored), and what was raised about it."""

    __slots__ = (
        "attested",
        "baseline",
        "checked_at",
        "group",
        "group_key",
        "identity",
        "lifetime_cap",
        "metrics",
        "monitored",
        "raised",
        "reattest",
        "reference",
        "silence_after",
    )

    def __init__(
        self,
        identity: str,
        metrics: IdentityMetrics,
        reference: RateReference,
        *,
        baseline: OwnBaseline | None = None,
        group: PeerGroup | None = None,
        group_key: GroupKey | None = None,
        monitored: bool = True,
        checked_at: float = 0.0,
        attested: Firmware = _NO_FIRMWARE,
    ) -> None:
        self.identity = identity
        self.metrics = metrics
        self.reference = reference
        self.baseline = baseline
        self.group = group
        self.group_key = group_key
        self.monitored = monitored
        self.checked_at = checked_at
        self.attested = attested
        self.raised: dict[DetectionKind, tuple[float, int]] = {}
        self.lifetime_cap: int | None = None
        self.reattest = False
        self.silence_after = math.inf  # seconds without a publish that make it silent


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


class AnomalyEngine:
    def __init__(self, clock: Clock, settings: AnomalySettings, context: ContextLookup) -> None:
        if not callable(getattr(clock, "now", None)):
            raise TypeError("clock must be a pki.clock.Clock")
        if not isinstance(settings, AnomalySettings):
            raise TypeError(f"settings must be AnomalySettings, not {type(settings).__name__}")
        if not callable(context):
            raise TypeError("context must be callable")
        self._clock = clock
        self._settings = settings
        self._enabled = settings.enabled
        self._t = settings.thresholds
        self._context = context
        self._policy = Policy(settings.rules)
        self._cooldown = settings.cooldown_minutes * 60.0
        self.counters: Counter[str] = Counter()
        self._subjects: OrderedDict[str, _Subject] = OrderedDict()  # least recently active first
        self._strangers: OrderedDict[str, _Subject] = OrderedDict()
        self._groups: dict[GroupKey, PeerGroup] = {}
        self._stale_groups: set[GroupKey] = set()
        self._quiet: OrderedDict[str, None] = OrderedDict()  # online, least recent publish first
        self._flagged: set[str] = set()  # window over its alarm level: check in evaluate()
        self._rolled: set[str] = set()  # minutes closed: learn in evaluate()
        self._pending: dict[tuple[str, DetectionKind, str], tuple[_Subject, Detection]] = {}
        self._ceiling = RateReference.ceiling(
            self._t.max_messages_per_minute, self._t.max_bytes_per_minute
        )
        self._unregistered = RateReference.ceiling(
            self._t.unregistered_messages_per_minute,
            self._t.max_bytes_per_minute,
            unregistered=True,
        )
        self._handlers: dict[type, Callable[[_Subject, Any, float], None]] = {
            Published: self._on_published,
            Denied: self._on_denied,
            Connected: self._on_connected,
            Disconnected: self._on_disconnected,
            CertificateIssued: self._on_issued,
            RequestRefused: self._on_refused,
        }

    @property
    def settings(self) -> AnomalySettings:
        return self._settings

    def __len__(self) -> int:
        """Identities tracked with a baseline."""
        return len(self._subjects)

    # observations (hot path)

    def observe(self, observation: Observation) -> None:
        """Account one observation, stamped with the engine's clock. Never raises."""
        if not self._enabled:
            return
        try:
            if type(observation) is Published:
                # The one observation that comes with every message: handled inline.
                subject = self._subjects.get(observation.identity)
                if subject is not None:
                    self._subjects.move_to_end(observation.identity)
                    self._on_published(subject, observation, self._clock.now().timestamp())
                    return
            handler = self._handlers.get(type(observation))
            identity: object = getattr(observation, "identity", None)
            if handler is None or type(identity) is not str or not identity:
                self.counters["ignored.malformed"] += 1
                return
            now = self._clock.now().timestamp()
            subject = self._subjects.get(identity)
            if subject is not None:
                self._subjects.move_to_end(identity)
            else:
                # A certificate was issued after its registry row was written: an enrollee
                # taken for a stranger a moment ago is looked up again at once, from the row
                # the issuance wrote when it comes with the observation.
                known = None
                issued = type(observation) is CertificateIssued
                if type(observation) is CertificateIssued and isinstance(
                    observation.registered, IdentityRecord
                ):
                    known = IdentityContext.from_record(observation.registered)
                subject = self._admit(identity, now, recheck=issued, known=known)
            if subject.baseline is None:
                self._on_stranger(subject, observation, now)
            else:
                handler(subject, observation, now)
        except Exception:
            # The observer contract: never raise into the broker. Counted, and logged for
            # whoever debugs the engine.
            self.counters["ignored.error"] += 1
            log.debug("anomaly engine could not use %r", observation, exc_info=True)

    def _on_published(self, subject: _Subject, o: Published, now: float) -> None:
        size = o.size
        topic = o.topic
        if type(size) is not int or size < 0 or type(topic) is not str:
            self.counters["ignored.malformed"] += 1
            return
        metrics = subject.metrics
        identity = subject.identity
        pattern = metrics.topics.get(topic)
        if pattern is None:
            pattern = self._learn_topic(subject, topic, now)
        if pattern in PROTOCOL_PATTERNS:
            self._on_request(subject, now)
            return
        if metrics.published(now, size):
            self._flagged.add(identity)
        if metrics.closed:
            self._rolled.add(identity)
        quiet = self._quiet
        try:
            quiet.move_to_end(identity)
        except KeyError:
            quiet[identity] = None

    def _on_request(self, subject: _Subject, now: float) -> None:
        """An enrollment or renewal request: not volume, but a flood of them is a spike."""
        ceiling = self._t.unregistered_messages_per_minute
        requests = subject.metrics.requested(now)
        if requests > ceiling:
            self._raise(
                subject,
                detect.request_flood(
                    subject.identity, _at(now), requests=requests, ceiling=ceiling
                ),
            )

    def _learn_topic(self, subject: _Subject, topic: str, now: float) -> str:
        """Learn the pattern of a topic not in the identity's cache; returns the pattern."""
        metrics = subject.metrics
        pattern, new, kept = metrics.learn_topic(topic)
        if not new:
            return pattern
        if not kept:
            self.counters["dropped.topics"] += 1
        group = subject.group
        news = self._topic_news(subject, pattern, kept, now)
        if news is None:
            # Usual, or learned while still learning: it now vouches for the pattern among
            # its peers. A pattern that raised a detection vouches for nothing, so a few
            # compromised devices cannot make their new topic look usual for the others.
            if group is not None and kept and not group.used(pattern):
                self.counters["dropped.model_patterns"] += 1
            return pattern
        peers_using, quorum = news
        self._raise(
            subject,
            detect.new_topic(
                subject.identity,
                _at(now),
                pattern=pattern,
                known=sorted(metrics.patterns - {pattern}),
                peers_using=peers_using,
                quorum=quorum,
            ),
            pattern,
        )
        return pattern

    def _topic_news(
        self, subject: _Subject, pattern: str, kept: bool, now: float
    ) -> tuple[int, int] | None:
        """(peers using it, quorum) when a pattern new to ``subject`` is news, else None."""
        metrics = subject.metrics
        if pattern in PROTOCOL_PATTERNS or (kept and len(metrics.patterns) <= 1):
            return None  # one every device uses, or its first
        t = self._t
        group = subject.group
        warmup = t.topic_warmup_minutes * 60
        own_established = now - metrics.created >= warmup
        peers_established = (
            group is not None
            and now - group.created >= warmup
            and len(group.members) >= t.min_peers
        )
        if not (own_established or peers_established):
            return None  # still learning what is usual
        members = len(group.members) if group is not None else 0
        peers_using = group.topic_users.get(pattern, 0) if group is not None else 0
        quorum = max(2, int(t.topic_quorum_fraction * members))
        return None if peers_using >= quorum else (peers_using, quorum)

    def _on_denied(self, subject: _Subject, o: Denied, now: float) -> None:
        action, topic = o.action, o.topic
        if not isinstance(action, str) or type(topic) is not str:
            self.counters["ignored.malformed"] += 1
            return
        window = self._t.probing_window_seconds
        denials = subject.metrics.denied(now, str(action), topic, window)
        if len(denials) >= self._t.probing_denials:
            found = detect.probing(
                subject.identity,
                _at(now),
                denials,
                threshold=self._t.probing_denials,
                window_seconds=window,
            )
            if found is not None:
                self._raise(subject, found)

    def _on_connected(self, subject: _Subject, o: Connected, now: float) -> None:
        remote = o.remote
        if type(remote) is not str:
            self.counters["ignored.malformed"] += 1
            return
        metrics = subject.metrics
        identity = subject.identity
        host = host_of(remote)
        had_hosts = bool(metrics.hosts)
        new_host, evicted = metrics.connected(now, host)
        if evicted:
            self.counters["dropped.hosts"] += 1
        if metrics.closed:
            self._rolled.add(identity)
        self._quiet[identity] = None
        self._quiet.move_to_end(identity)
        t = self._t
        connects = metrics.connects_within(now, t.storm_window_seconds)
        if connects >= t.storm_connects:
            storm = detect.reconnect_storm(
                identity,
                _at(now),
                connects=connects,
                hosts=len({h for h, seen in metrics.hosts.items() if seen >= now - 3600}),
                threshold=t.storm_connects,
                window_seconds=t.storm_window_seconds,
            )
            if storm is not None:
                self._raise(subject, storm)
        if new_host and had_hosts and now - metrics.created >= self._settings.warmup_minutes * 60:
            known = [h for h in metrics.hosts if h != host]
            self._raise(
                subject,
                detect.new_source(identity, _at(now), host=host, remote=remote, known=known),
                host,
            )

    def _on_disconnected(self, subject: _Subject, o: Disconnected, now: float) -> None:
        metrics = subject.metrics
        metrics.disconnected(now)
        if metrics.closed:
            self._rolled.add(subject.identity)
        if metrics.sessions == 0:
            self._quiet.pop(subject.identity, None)

    def _on_issued(self, subject: _Subject, o: CertificateIssued, now: float) -> None:
        reported = (o.firmware_version, o.firmware_digest)
        if not all(value is None or type(value) is str for value in reported):
            self.counters["ignored.malformed"] += 1
            return
        if o.attested is True:
            if reported != _NO_FIRMWARE:
                if subject.attested != _NO_FIRMWARE and _differs(reported, subject.attested):
                    # Measured new firmware may legitimately behave differently: learn again.
                    self._relearn(subject)
                subject.attested = reported
            subject.reattest = False
            return
        subject.metrics.renewals += 1
        if reported == _NO_FIRMWARE:
            return
        subject.metrics.firmware_reported = reported
        if _differs(reported, subject.attested):
            self._raise(
                subject,
                detect.firmware_change(
                    subject.identity, _at(now), reported=reported, attested=subject.attested
                ),
            )

    def _on_refused(self, subject: _Subject, o: RequestRefused, now: float) -> None:
        """A refused enrollment or renewal request. Most refusals are the protocol working
        (and a flood of them shows as a flood of requests); refused firmware is evidence of
        its own, registered device or not."""
        if o.reason != FIRMWARE_REFUSED:
            return
        subject.metrics.firmware_refusals += 1
        self._raise(
            subject,
            detect.firmware_refused(
                subject.identity, _at(now), refusals=subject.metrics.firmware_refusals
            ),
            "refused",
        )

    def _on_stranger(self, subject: _Subject, o: Observation, now: float) -> None:
        """An identity the registry does not hold (or of a kind not monitored): only a flood
        of messages or denials is looked for, against fixed ceilings."""
        if not subject.monitored:
            self.counters["ignored.kind"] += 1
            return
        self.counters["ignored.unknown"] += 1
        metrics = subject.metrics
        if type(o) is Published:
            if type(o.size) is int and o.size >= 0 and metrics.published(now, o.size):
                self._flagged.add(subject.identity)
            metrics.closed.clear()  # no baseline to learn
        elif type(o) is Denied:
            self._on_denied(subject, o, now)
        elif type(o) is RequestRefused:
            self._on_refused(subject, o, now)

    # admission and bookkeeping

    def _lookup(self, identity: str) -> IdentityContext | None:
        try:
            context = self._context(identity)
        except Exception:
            self.counters["context.error"] += 1
            log.debug("context lookup for %r failed", identity, exc_info=True)
            return None
        if context is not None and not isinstance(context, IdentityContext):
            self.counters["context.error"] += 1
            return None
        return context

    def _admit(
        self,
        identity: str,
        now: float,
        *,
        recheck: bool = False,
        known: IdentityContext | None = None,
    ) -> _Subject:
        """The subject of an identity not tracked with a baseline: a new tracked subject if
        the registry holds it with a monitored kind, a stranger otherwise. A stranger is asked
        about again only every few seconds, unless ``recheck``. ``known``: the identity's
        context at hand, instead of the registry's."""
        stranger = self._strangers.get(identity)
        if stranger is not None and not recheck:
            every = RECHECK_UNKNOWN_SECONDS if stranger.monitored else RECHECK_UNMONITORED_SECONDS
            if now - stranger.checked_at < every:
                self._strangers.move_to_end(identity)
                return stranger
        context = known if known is not None else self._lookup(identity)
        if context is None or context.kind not in self._settings.monitored_kinds:
            monitored = context is None
            if stranger is None or stranger.monitored != monitored:
                stranger = self._new_stranger(identity, now, monitored)
            stranger.checked_at = now
            self._strangers.move_to_end(identity)
            return stranger
        if stranger is not None:
            del self._strangers[identity]
        return self._track(identity, context, now)

    def _new_stranger(self, identity: str, now: float, monitored: bool) -> _Subject:
        metrics = self._new_metrics(identity, now, self._unregistered)
        metrics.max_topics = 0  # nothing is learned about strangers' topics
        subject = _Subject(
            identity, metrics, self._unregistered, monitored=monitored, checked_at=now
        )
        self._strangers[identity] = subject
        if len(self._strangers) > self._settings.max_unregistered:
            evicted, _ = self._strangers.popitem(last=False)
            self._drop(evicted)
            self.counters["dropped.unregistered"] += 1
        return subject

    def _new_metrics(self, identity: str, now: float, reference: RateReference) -> IdentityMetrics:
        s = self._settings
        return IdentityMetrics(
            identity,
            now,
            bucket_seconds=s.bucket_seconds,
            max_closed=s.history_minutes,
            max_topics=s.max_topics_per_identity,
            max_hosts=s.max_hosts_per_identity,
            alarm_messages=reference.alarm_messages,
            alarm_bytes=reference.alarm_bytes,
        )

    def _track(self, identity: str, context: IdentityContext, now: float) -> _Subject:
        key = (context.kind.value, context.model)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = PeerGroup(
                context.model, now, self._settings.max_patterns_per_model
            )
        reference = group.reference or self._ceiling
        subject = _Subject(
            identity,
            self._new_metrics(identity, now, reference),
            reference,
            baseline=OwnBaseline(self._settings.history_minutes),
            group=group,
            group_key=key,
            checked_at=now,
            attested=(context.firmware_version, context.firmware_digest),
        )
        group.members.add(identity)
        self._subjects[identity] = subject
        while len(self._subjects) > self._settings.max_identities:
            evicted = next(iter(self._subjects))
            self._drop(evicted)
            self.counters["dropped.evicted"] += 1
        return subject

    def _raise(self, subject: _Subject, detection: Detection, detail: str = "") -> None:
        """Queue a detection found while observing; ``evaluate()`` decides on it."""
        key = (subject.identity, detection.kind, detail)
        if key not in self._pending and len(self._pending) >= MAX_PENDING:
            self.counters["dropped.pending"] += 1
            return
        self._pending[key] = (subject, detection)  # a later, fuller finding replaces it

    def _relearn(self, subject: _Subject) -> None:
        subject.baseline = OwnBaseline(self._settings.history_minutes)
        subject.silence_after = math.inf
        subject.metrics.closed.clear()
        self._set_reference(subject, self._cold_reference(subject))
        if subject.group_key is not None:
            self._stale_groups.add(subject.group_key)

    def _drop(self, identity: str) -> None:
        """Forget every trace of ``identity``."""
        subject = self._subjects.pop(identity, None)
        if subject is not None and subject.group is not None and subject.group_key is not None:
            group, key = subject.group, subject.group_key
            group.members.discard(identity)
            if not group.members:
                self._groups.pop(key, None)
                self._stale_groups.discard(key)
            else:
                self._stale_groups.add(key)
        self._strangers.pop(identity, None)
        self._quiet.pop(identity, None)
        self._flagged.discard(identity)
        self._rolled.discard(identity)
        for pending in [k for k in self._pending if k[0] == identity]:
            del self._pending[pending]

    # operator and gateway calls

    def clone_seen(self, identity: str, first_remote: str, second_remote: str) -> None:
        """The broker saw a second live session of ``identity`` (the embedded broker refused
        it; Mosquitto took the session over). Never raises."""
        if not self._enabled:
            return
        if not all(type(v) is str and v for v in (identity, first_remote, second_remote)):
            self.counters["ignored.malformed"] += 1
            return
        now = self._clock.now().timestamp()
        subject = self._subjects.get(identity) or self._admit(identity, now)
        if not subject.monitored:
            self.counters["ignored.kind"] += 1
            return
        self._raise(
            subject,
            detect.clone(
                identity, _at(now), first_remote=first_remote, second_remote=second_remote
            ),
        )

    def forget(self, identity: str) -> None:
        """Drop every trace of ``identity`` (it was revoked)."""
        self._drop(identity)

    def reset(self, identity: str) -> None:
        """An operator released ``identity``: it is learned again from scratch (its peers hold
        it to their standard meanwhile), and the lifetime cap and re-attestation demand it
        earned are lifted. Keeping the old history would re-raise at once what the operator
        just judged acceptable."""
        self._drop(identity)
        self.counters["reset"] += 1

    def _known(self, identity: str) -> _Subject | None:
        return self._subjects.get(identity) or self._strangers.get(identity)

    def lifetime_cap(self, identity: str) -> int | None:
        """The shortest lifetime a ``shorten_lifetime`` verdict imposed on ``identity`` (until
        it is reset or forgotten), or ``None``."""
        subject = self._known(identity)
        return subject.lifetime_cap if subject is not None else None

    def reattest_required(self, identity: str) -> bool:
        """True after a ``reattest`` verdict, until ``identity`` presents fresh attestation."""
        subject = self._known(identity)
        return subject.reattest if subject is not None else False

    def snapshot(self, identity: str) -> IdentitySnapshot | None:
        """Its current rates, baseline and what it used, or ``None`` if not tracked."""
        subject = self._known(identity)
        if subject is None:
            return None
        now = self._clock.now().timestamp()
        metrics = subject.metrics
        metrics.advance(now)
        baseline = subject.baseline
        if metrics.closed:
            if baseline is not None:
                self._rolled.add(identity)
            else:
                metrics.closed.clear()
        stats = baseline.stats if baseline is not None and self._warm(subject) else None
        return IdentitySnapshot(
            identity=identity,
            messages_last_minute=metrics.window_messages,
            bytes_last_minute=metrics.window_bytes,
            mean_messages=stats.mean_messages if stats else None,
            mean_bytes=stats.mean_bytes if stats else None,
            baseline_minutes=baseline.minutes if baseline is not None else 0,
            reference=subject.reference.source.value,
            alarm_messages=subject.reference.alarm_messages,
            alarm_bytes=subject.reference.alarm_bytes,
            topic_patterns=tuple(sorted(metrics.patterns)),
            hosts=tuple(metrics.hosts),
            denials_last_window=len(metrics.recent_denials(now, self._t.probing_window_seconds)),
            connects_last_hour=metrics.connects_within(now, 3600),
            disconnects=metrics.disconnects,
            renewals=metrics.renewals,
            firmware_reported=metrics.firmware_reported,
            lifetime_cap=subject.lifetime_cap,
            reattest_required=subject.reattest,
        )

    # evaluation

    def evaluate(self) -> list[Verdict]:
        """Decide on everything found since the last call; call every few seconds."""
        if not self._enabled:
            return []
        now = self._clock.now().timestamp()
        found: list[tuple[_Subject, Detection]] = list(self._pending.values())
        self._pending = {}
        rolled, self._rolled = self._rolled, set()
        for identity in rolled:
            subject = self._subjects.get(identity)
            if subject is not None:
                self._learn(subject, now, found)
        self._refresh_groups(now)
        flagged, self._flagged = self._flagged, set()
        for identity in flagged:
            subject = self._known(identity)
            if subject is not None:
                self._check_rate(subject, now, found)
        self._scan_silence(now, found)
        verdicts = []
        for subject, detection in found:
            verdict = self._decide(subject, detection, now)
            if verdict is not None:
                verdicts.append(verdict)
        return verdicts

    def _warm(self, subject: _Subject) -> bool:
        baseline = subject.baseline
        return (
            baseline is not None
            and baseline.stats is not None
            and baseline.minutes >= self._settings.warmup_minutes
            and baseline.stats.messages >= self._settings.warmup_messages
        )

    def _learn(
        self, subject: _Subject, now: float, found: list[tuple[_Subject, Detection]]
    ) -> None:
        """Judge the minutes that closed against the baseline, then add the normal ones to it.

        Anomalous minutes (over the spike levels, or while the drift CUSUM is in alarm) are
        held out, so the reference stays frozen while it is questioned; after
        ``history_minutes`` of them in a row the new level is accepted as normal."""
        baseline = subject.baseline
        if baseline is None:
            return
        metrics = subject.metrics
        closed, metrics.closed = metrics.closed, []
        t = self._t
        stats = baseline.stats if self._warm(subject) else None
        reference = subject.reference
        drift: Detection | None = None
        added = False
        for messages, bytes_ in closed:
            anomalous = False
            if stats is not None:
                anomalous = messages > reference.alarm_messages or bytes_ > reference.alarm_bytes
            if stats is not None and stats.minutes >= t.drift_warmup_minutes:
                # The reference is itself an estimate from ``minutes`` samples: its standard
                # error joins the allowance, so an early, slightly low mean does not
                # accumulate into an alarm.
                k = t.drift_k + 1 / math.sqrt(stats.minutes)
                by_bytes = baseline.drift_bytes.update(
                    stats.drift_z(bytes_), bytes_, k, t.drift_clip
                )
                by_size = baseline.drift_size.value
                if messages and stats.size_minutes >= t.drift_warmup_minutes:
                    size = bytes_ / messages
                    z_size = (size - stats.mean_size) * math.sqrt(messages) / stats.size_spread
                    by_size = baseline.drift_size.update(z_size, size, k, t.drift_clip)
                if max(by_bytes, by_size) > t.drift_h:
                    anomalous = True
                    cusum = baseline.drift_size if by_size > by_bytes else baseline.drift_bytes
                    drift = detect.volume_drift(
                        subject.identity,
                        _at(now),
                        measure="size" if cusum is baseline.drift_size else "bytes",
                        average=cusum.average,
                        minutes=cusum.run,
                        stats=stats,
                        cusum=cusum.value,
                        alarm=t.drift_h,
                    )
            if anomalous:
                if baseline.held_out < self._settings.history_minutes:
                    baseline.held_out += 1
                    continue
                # An hour at the new level: it is the new normal.
                baseline.drift_bytes.reset()
                baseline.drift_size.reset()
                self.counters["accepted.new_level"] += 1
            baseline.held_out = 0
            baseline.add(messages, bytes_)
            added = True
        if drift is not None:
            found.append((subject, drift))
        if not added or not baseline.due(2 * self._settings.warmup_minutes):
            return
        baseline.refresh(metrics.gap_cv if metrics.gap_count >= MIN_GAPS else 1.0)
        subject.silence_after = self._silence_threshold(subject) or math.inf
        if self._warm(subject) and baseline.stats is not None:
            self._set_reference(subject, RateReference.own(baseline.stats, t.spike_z))
            if subject.group_key is not None:
                self._stale_groups.add(subject.group_key)

    def _set_reference(self, subject: _Subject, reference: RateReference) -> None:
        subject.reference = reference
        subject.metrics.alarm_messages = reference.alarm_messages
        subject.metrics.alarm_bytes = reference.alarm_bytes

    def _cold_reference(self, subject: _Subject) -> RateReference:
        group = subject.group
        if group is not None and group.reference is not None:
            return group.reference
        return self._ceiling

    def _refresh_groups(self, now: float) -> None:
        """Recompute the shared reference of models whose members learned, at most once a
        minute each, and hand it to the members without a warm baseline."""
        minute = int(now // 60)
        for key in list(self._stale_groups):
            group = self._groups.get(key)
            if group is None:
                self._stale_groups.discard(key)
                continue
            if group.refreshed_minute == minute:
                continue
            self._stale_groups.discard(key)
            group.refreshed_minute = minute
            members = [self._subjects[m] for m in group.members if m in self._subjects]
            warm = [s.reference for s in members if s.reference.source is ReferenceSource.OWN]
            group.refresh(warm, self._t.min_peers, self._t.peer_quantile)
            cold = group.reference or self._ceiling
            for member in members:
                if member.reference.source is not ReferenceSource.OWN:
                    self._set_reference(member, cold)

    def _check_rate(
        self, subject: _Subject, now: float, found: list[tuple[_Subject, Detection]]
    ) -> None:
        metrics = subject.metrics
        metrics.advance(now)
        if metrics.closed:
            if subject.baseline is not None:
                self._rolled.add(subject.identity)
            else:
                metrics.closed.clear()
        if (
            metrics.window_messages <= metrics.alarm_messages
            and metrics.window_bytes <= metrics.alarm_bytes
        ) or not subject.monitored:
            return
        connected_at = metrics.connected_at
        if (
            subject.baseline is not None
            and connected_at is not None
            and now - connected_at < self._t.grace_after_connect_seconds
        ):
            self._flagged.add(subject.identity)  # look again once the grace is over
            return
        spike = detect.rate_spike(
            subject.identity,
            _at(now),
            metrics.window_messages,
            metrics.window_bytes,
            subject.reference,
        )
        if spike is not None:
            found.append((subject, spike))
            # A continuing spike is looked at again (it may escalate); the cooldown keeps it
            # from repeating.
            self._flagged.add(subject.identity)

    def silence_threshold(self, identity: str) -> float | None:
        """Seconds without a publish after which ``identity`` is silent, or ``None`` while
        its baseline cannot tell (not warm, no messages expected, too few gaps)."""
        subject = self._subjects.get(identity)
        return self._silence_threshold(subject) if subject is not None else None

    def _silence_threshold(self, subject: _Subject) -> float | None:
        metrics = subject.metrics
        if not self._warm(subject) or metrics.gap_count < MIN_GAPS:
            return None
        t = self._t
        # Three guards, the largest wins: a floor; a multiple of its longest recent gap (a
        # device that pauses for calibration every hour); and the tail of its gaps: if gaps
        # longer than the mean exceed it by ``e`` on average, an exponential tail passes
        # mean + 18 e once in ~10^8 gaps (e^-18). For Poisson arrivals e is the mean itself
        # (19 mean gaps); for bursts it is the pause between bursts; for a periodic sender
        # it is near 0 and the floor decides.
        return max(
            float(t.silence_min_seconds),
            t.silence_factor * metrics.longest_gap,
            metrics.gap_mean + t.silence_tail * metrics.long_excess,
        )

    def _scan_silence(self, now: float, found: list[tuple[_Subject, Detection]]) -> None:
        minimum = self._t.silence_min_seconds
        silent_ones: list[tuple[str, Detection | None]] = []
        for identity in self._quiet:
            subject = self._subjects.get(identity)
            last = subject.metrics.last_publish if subject is not None else None
            if subject is None or last is None:
                silent_ones.append((identity, None))
                continue
            silent = now - last
            if silent < minimum:
                break  # everyone after it published more recently
            threshold = subject.silence_after
            if silent < threshold or subject.baseline is None:
                continue
            stats = subject.baseline.stats
            if stats is None:
                continue
            subject.metrics.silenced = True
            silent_ones.append(
                (
                    identity,
                    detect.silence(
                        identity,
                        _at(now),
                        silent_seconds=silent,
                        threshold_seconds=threshold,
                        longest_gap=subject.metrics.longest_gap,
                        stats=stats,
                    ),
                )
            )
        for identity, detection in silent_ones:
            # Out of the scan until it publishes or reconnects: one detection per silence.
            self._quiet.pop(identity, None)
            subject = self._subjects.get(identity)
            if detection is not None and subject is not None:
                found.append((subject, detection))

    def _decide(self, subject: _Subject, detection: Detection, now: float) -> Verdict | None:
        kind = detection.kind
        self.counters[f"detected.{kind.value}"] += 1
        context = self._lookup(subject.identity)
        if context is not None and context.state in _CONTAINED:
            # Its rights are already cut; what it does now is the containment working.
            self.counters[f"skipped.{context.state.value}"] += 1
            return None
        rule = self._policy.decide(detection, context, _at(now))
        if rule is None:
            self.counters["unmatched"] += 1
            return None
        last = subject.raised.get(kind)
        if last is not None and now - last[0] < self._cooldown and rule.action.rank <= last[1]:
            self.counters["suppressed.cooldown"] += 1
            return None
        subject.raised[kind] = (now, rule.action.rank)
        if rule.action is Action.SHORTEN_LIFETIME and rule.lifetime_seconds is not None:
            cap = subject.lifetime_cap
            subject.lifetime_cap = (
                rule.lifetime_seconds if cap is None else min(cap, rule.lifetime_seconds)
            )
        elif rule.action is Action.REATTEST:
            subject.reattest = True
        self.counters[f"verdict.{rule.action.value}"] += 1
        return Verdict(detection, rule.action, rule.name, rule.lifetime_seconds)


def _differs(reported: Firmware, attested: Firmware) -> bool:
    """True when the reported firmware is not the attested one: digests decide when both are
    known, versions otherwise; nothing comparable is no evidence."""
    if reported[1] is not None and attested[1] is not None:
        return reported[1].lower() != attested[1].lower()
    if reported[0] is not None and attested[0] is not None:
        return reported[0] != attested[0]
    return False
