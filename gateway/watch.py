"""The behaviour watch: the anomaly engine (``gateway.anomaly``) wired into a running gateway.

In: what the brokers saw (``gateway.observe``), the requests that reached the enrollment core,
the certificates it issued and the requests it refused. Out: every verdict the engine reaches
is written to the audit trail with its evidence, emitted as an ``anomaly`` event on the admin
stream (the console's attention panel), and carried out:

- ``alert``: nothing more;
- ``shorten_lifetime``: the device's next certificates last at most the rule's seconds (the
  enrollment core asks ``lifetime_cap``);
- ``reattest``: the registry's ``reattest_required`` flag, so its next renewal is refused with
  ``reattestation_required`` and it enrolls again from hello with fresh evidence;
- ``quarantine``: ``Gateway.quarantine`` (registry, audit, broker at once), as an operator's.

An operator undoes it: a release re-learns the device from scratch and lifts its lifetime cap
(``AnomalyEngine.reset``); a revocation forgets it. The engine is not thread-safe: observations
from other threads (the enrollment worker) are handed to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from gateway import operations
from gateway.anomaly import Action, AnomalyEngine, AnomalySettings, IdentityContext, Verdict
from gateway.observe import Observation, Published
from gateway.protocol.topics import parse_request_topic
from gateway.store import AuditEntry, IdentityState

if TYPE_CHECKING:
    from gateway.service import Gateway, GatewayEvent

__all__ = ["ACTOR", "EVALUATE_SECONDS", "BehaviourWatch", "verdict_audit_entry"]

log = logging.getLogger(__name__)

ACTOR = "gateway:anomaly"
EVALUATE_SECONDS = 5.0
MAX_EVIDENCE_TEXT = 200


class BehaviourWatch:
    """Feeds the engine and carries out its verdicts for one ``Gateway`` (see the module
    docstring). ``observe`` is the ``gateway.observe.Observer`` the brokers and the enrollment
    core are given."""

    def __init__(
        self,
        gateway: Gateway,
        settings: AnomalySettings,
        *,
        leading: Callable[[], bool] = lambda: True,
    ) -> None:
        """``leading``: whether this gateway leads its cluster. The fleet's telemetry reaches
        every gateway of a cluster, its connections, state and quarantine messages only the
        leader (``Gateway._take_lead``); the leader's watch alone learns and acts (a new
        leader learns afresh, as after a restart), so the work is done once, not once per
        gateway."""
        self._gateway = gateway
        self._leading = leading
        self.engine = AnomalyEngine(gateway.clock, settings, self._context)
        self.metrics: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        gateway.listeners.append(self._on_event)

    @property
    def enabled(self) -> bool:
        return self.engine.settings.enabled

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the engine lives on (the gateway's); call from that loop."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # -- in ----------------------------------------------------------------------------------

    def observe(self, observation: Observation) -> None:
        """The observer for brokers and the enrollment core, from any thread."""
        if not self._leading():
            return
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self.engine.observe(observation)
            return
        try:
            loop.call_soon_threadsafe(self.engine.observe, observation)
        except RuntimeError:  # the loop closed: the gateway is stopping
            self.metrics["dropped.stopped"] += 1

    def request_seen(self, topic: str, size: int) -> None:
        """A request that reached the enrollment core, as a publish of its device: an enrollee
        is no certificate identity, so no broker reports it, and a flood of hellos from one
        device id shows only here."""
        where = parse_request_topic(topic)
        if where is not None:
            self.observe(Published(where.device_id, topic, size))

    def clone_seen(self, identity: str, first: str, second: str) -> None:
        self.engine.clone_seen(identity, first, second)

    def lifetime_cap(self, identity: str) -> int | None:
        """For the enrollment core (its worker thread): a read of one attribute, no lock."""
        return self.engine.lifetime_cap(identity)

    def _context(self, identity: str) -> IdentityContext | None:
        """The registry's view of ``identity``; the engine asks once per new identity (and
        again for a verdict), not per message. An identity the registry does not hold is
        answered by the gateway's identity-state table, which remembers such misses for a
        moment (the broker's ACL asked it already about an enrollee's first message): no
        registry read on the event loop per enrolling device."""
        try:
            if self._gateway.states(identity) is None:
                return None
            record = self._gateway.store.get_identity(identity)
        except Exception:
            self.metrics["context.unavailable"] += 1
            log.warning("registry unavailable for the context of %s", identity, exc_info=True)
            return None
        return IdentityContext.from_record(record) if record is not None else None

    def _on_event(self, event: GatewayEvent) -> None:
        if event.kind != "state_changed" or event.subject is None:
            return
        state = event.data.get("state")
        if state == IdentityState.ACTIVE.value:
            # A release (or an approval): whatever it did was judged acceptable; learn it again.
            self.engine.reset(event.subject)
        elif state == IdentityState.REVOKED.value:
            self.engine.forget(event.subject)

    # -- out ---------------------------------------------------------------------------------

    async def evaluate(self) -> None:
        """Decide on what the engine found and carry each verdict out; every few seconds.
        A gateway that lost the lead acts on nothing it found before."""
        verdicts = self.engine.evaluate()
        if not self._leading():
            self.metrics["verdicts.not_leading"] += len(verdicts)
            return
        for verdict in verdicts:
            try:
                await self.carry_out(verdict)
            except Exception:
                self.metrics["errors.action"] += 1
                log.exception("could not carry out %s", verdict)

    async def carry_out(self, verdict: Verdict) -> None:
        detection, action = verdict.detection, verdict.action
        identity = detection.identity
        self.metrics[f"verdict.{action.value}"] += 1
        log.warning(
            "anomaly %s of %s (score %.2f): %s -> %s",
            detection.kind.value, identity, detection.score, detection.reason, action.value,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        entry = verdict_audit_entry(verdict)
        if action is Action.REATTEST:
            done = await loop.run_in_executor(None, self._require_reattestation, identity, entry)
        else:
            await loop.run_in_executor(None, self._gateway.store.append_audit, [entry])
            done = action is not Action.QUARANTINE or await self._quarantine(verdict)
        self._gateway.emit(
            "anomaly",
            identity,
            detection=detection.kind.value,
            score=f"{detection.score:.2f}",
            reason=detection.reason,
            action=action.value,
            rule=verdict.rule,
            carried_out="yes" if done else "no",
        )

    async def _quarantine(self, verdict: Verdict) -> bool:
        detection = verdict.detection
        reason = f"anomaly {detection.kind.value}: {detection.reason}"[:MAX_EVIDENCE_TEXT]
        try:
            await self._gateway.quarantine(detection.identity, actor=ACTOR, reason=reason)
        except operations.OperationError as exc:
            # Not registered (an enrollment flood), already contained, or revoked meanwhile.
            self.metrics[f"quarantine.{exc.reason.value}"] += 1
            log.info("anomaly of %s not quarantined: %s", detection.identity, exc)
            return False
        return True

    def _require_reattestation(self, identity: str, entry: AuditEntry) -> bool:
        """Set the registry's flag with the verdict's audit record, in one write."""
        store = self._gateway.store
        record = store.get_identity(identity)
        if record is None or record.state is IdentityState.REVOKED:
            store.append_audit([entry])
            return False
        store.put_identity(
            replace(record, reattest_required=True, updated_at=self._gateway.clock.now()),
            audit=[entry],
        )
        return True


def verdict_audit_entry(verdict: Verdict) -> AuditEntry:
    """The audit record of one verdict: the detection, its score, reason and evidence, and
    what was done (``outcome``); ``fleetgate device show`` lists these as detections."""
    detection = verdict.detection
    detail = {
        "detection": detection.kind.value,
        "score": f"{detection.score:.2f}",
        "action": verdict.action.value,
        "rule": verdict.rule,
        **{
            f"evidence.{key}": str(value)[:MAX_EVIDENCE_TEXT]
            for key, value in detection.evidence.items()
        },
    }
    if verdict.lifetime_seconds is not None:
        detail["lifetime_seconds"] = str(verdict.lifetime_seconds)
    return AuditEntry(
        actor=ACTOR,
        action="anomaly",
        subject=detection.identity,
        outcome=verdict.action.value,
        at=detection.at,
        reasons=(detection.kind.value, detection.reason[:MAX_EVIDENCE_TEXT]),
        detail=detail,
    )
