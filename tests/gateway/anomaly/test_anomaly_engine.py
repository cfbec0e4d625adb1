"""The engine's bookkeeping: warm-up, identities it does not know, memory caps, cooldown and
escalation, what an operator's release or a revocation does, and bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest
from anomaly_rig import Rig, first, kinds, warm_fleet

from gateway.acl import Action as AclAction
from gateway.anomaly import (
    Action,
    AnomalyEngine,
    AnomalySettings,
    DetectionKind,
    IdentityContext,
    Match,
    Rule,
)
from gateway.observe import CertificateIssued, Connected, Denied, Disconnected, Published
from gateway.store import IdentityRecord, IdentityState
from pki.clock import FakeClock
from pki.profile import IdentityKind


def test_during_warm_up_without_peers_only_the_ceiling_applies(rig: Rig) -> None:
    rig.device("first-of-its-kind", interval=0.5)  # 120 msg/min from the start
    assert rig.run(7 * 60) == []  # learned as it is: no own history, no peers yet
    assert rig.engine.snapshot("first-of-its-kind").reference == "own"  # type: ignore[union-attr]
    rig.device("flooder", interval=0.05)  # 1,200 msg/min: over the 600 msg/min ceiling
    spike = first(rig.run(45), DetectionKind.RATE_SPIKE)
    assert spike.detection.identity == "flooder"
    assert spike.detection.evidence["reference"] == "ceiling"
    assert "no baseline yet" in spike.detection.reason


def test_the_own_baseline_takes_over_after_the_warm_up(rig: Rig) -> None:
    rig.device("dev-1")
    rig.run(3 * 60)
    assert rig.engine.snapshot("dev-1").reference == "ceiling"  # type: ignore[union-attr]
    rig.run(5 * 60)
    snapshot = rig.engine.snapshot("dev-1")
    assert snapshot is not None and snapshot.reference == "own"
    assert snapshot.mean_messages == pytest.approx(12, abs=0.5)


def test_a_slow_device_needs_enough_messages_before_its_baseline_counts(rig: Rig) -> None:
    rig.device("slow", interval=120)  # one message every two minutes
    rig.run(20 * 60)
    assert rig.engine.snapshot("slow").reference == "ceiling"  # type: ignore[union-attr]


def test_unregistered_identities_are_counted_and_an_enrollment_flood_is_caught(rig: Rig) -> None:
    for _ in range(5):
        rig.observe(Published("stranger", "fg/v1/enroll/stranger/req", 1400))
    assert rig.run(5) == []
    assert rig.engine.counters["ignored.unknown"] == 5
    assert len(rig.engine) == 0  # no baseline kept for it
    for _ in range(40):
        rig.observe(Published("stranger", "fg/v1/enroll/stranger/req", 1400))
    spike = first(rig.run(5), DetectionKind.RATE_SPIKE)
    assert spike.action is Action.ALERT  # no registry context: only the catch-all rule fits
    assert spike.detection.evidence["reference"] == "unregistered"
    assert spike.detection.reason.startswith("an identity the registry does not hold publishes")


def test_a_registered_device_flooding_renewal_requests_is_a_spike(rig: Rig) -> None:
    warm_fleet(rig, 3)
    for _ in range(31):
        rig.observe(Published("th-sensor-0", "fg/v1/dev/th-sensor-0/renew/req", 1100))
    spike = first(rig.run(5), DetectionKind.RATE_SPIKE)
    assert spike.detection.reason == (
        "sent 31 enrollment or renewal requests in the last minute (ceiling 30)"
    )


def test_one_renewal_request_is_not_volume(rig: Rig) -> None:
    warm_fleet(rig, 3)
    rig.observe(Published("th-sensor-0", "fg/v1/dev/th-sensor-0/renew/req", 5000))
    assert rig.run(120) == []


def test_an_identity_enrolled_meanwhile_is_tracked_after_the_recheck(rig: Rig) -> None:
    rig.observe(Published("late", "fg/v1/enroll/late/req", 1400))
    rig.register("late")
    rig.observe(Connected("late", "10.0.0.9:40000"))
    assert len(rig.engine) == 0
    rig.run(11)
    rig.observe(Connected("late", "10.0.0.9:40000"))
    assert len(rig.engine) == 1


def test_kinds_not_monitored_are_ignored(rig: Rig) -> None:
    rig.register("alice", kind=IdentityKind.OPERATOR)
    rig.observe(Published("alice", "fg/v1/admin/alice/req", 300))
    rig.engine.clone_seen("alice", "10.0.0.1:1", "10.0.0.2:2")
    assert rig.run(5) == []
    assert rig.engine.counters["ignored.kind"] == 2


def test_memory_is_bounded_by_forgetting_the_longest_silent_identity() -> None:
    rig = Rig(settings=AnomalySettings(max_identities=3, max_unregistered=2))
    for name in ("a", "b", "c"):
        rig.device(name)
    rig.run(10)
    rig.device("d")  # "a" .. "c" all published; the longest silent goes
    assert len(rig.engine) == 3
    assert rig.engine.counters["dropped.evicted"] == 1
    for name in ("x", "y", "z"):
        rig.observe(Published(name, f"fg/v1/enroll/{name}/req", 10))
    assert rig.engine.counters["dropped.unregistered"] == 1
    assert rig.engine.snapshot("x") is None and rig.engine.snapshot("z") is not None


def test_topics_and_hosts_kept_per_identity_are_capped() -> None:
    rig = Rig(settings=AnomalySettings(max_topics_per_identity=2, max_hosts_per_identity=2))
    rig.device("dev-1", remote="10.0.0.1:1")
    for index in range(5):
        rig.observe(Published("dev-1", f"fg/v1/dev/dev-1/quarantine/t{index}", 10))
        rig.observe(Connected("dev-1", f"10.0.0.{index + 2}:1"))
    snapshot = rig.engine.snapshot("dev-1")
    assert snapshot is not None
    assert len(snapshot.topic_patterns) == 2 and len(snapshot.hosts) == 2
    assert rig.engine.counters["dropped.topics"] == 3
    assert rig.engine.counters["dropped.hosts"] == 4


def test_cooldown_holds_back_a_repeat_but_not_an_escalation(rig: Rig) -> None:
    warm_fleet(rig, 3)
    sender = rig.senders["th-sensor-0"]

    def spikes(seconds: float) -> list[Action]:
        return [v.action for v in rig.run(seconds) if v.detection.kind is DetectionKind.RATE_SPIKE]

    sender.interval = 2.5
    assert spikes(60) == [Action.ALERT]
    assert spikes(60) == []  # still high: held back by the cooldown
    assert rig.engine.counters["suppressed.cooldown"] > 0
    sender.interval = 0.1
    assert spikes(30) == [Action.QUARANTINE]


def test_a_contained_identity_raises_nothing(rig: Rig) -> None:
    warm_fleet(rig, 3)
    rig.contexts["th-sensor-1"] = replace(
        rig.contexts["th-sensor-1"], state=IdentityState.QUARANTINED
    )
    for topic in ("a", "b", "c"):
        rig.observe(Denied("th-sensor-1", AclAction.PUBLISH, f"fg/v1/dev/th-sensor-1/{topic}"))
    assert rig.run(5) == []
    assert rig.engine.counters["skipped.quarantined"] == 1


def test_reset_learns_again_and_lifts_what_the_verdicts_imposed(rig: Rig) -> None:
    warm_fleet(rig, 4)
    for port in range(6):
        rig.observe(Connected("th-sensor-0", f"10.0.1.1:{port + 1}"))
    assert kinds(rig.run(5)) == [DetectionKind.RECONNECT_STORM]
    assert rig.engine.lifetime_cap("th-sensor-0") == 900
    rig.engine.reset("th-sensor-0")
    assert rig.engine.lifetime_cap("th-sensor-0") is None
    rig.observe(Connected("th-sensor-0", "10.9.9.9:1"))  # learned afresh: not a new source
    assert rig.run(5) == []
    assert rig.engine.snapshot("th-sensor-0").reference == "peers"  # type: ignore[union-attr]


def test_forget_drops_everything_including_pending_findings(rig: Rig) -> None:
    warm_fleet(rig, 3)
    rig.engine.clone_seen("th-sensor-2", "10.0.1.3:1", "10.0.9.9:2")
    rig.engine.forget("th-sensor-2")
    assert rig.engine.evaluate() == []
    assert rig.engine.snapshot("th-sensor-2") is None
    assert len(rig.engine) == 2


def test_rules_see_the_registry_context(rig: Rig) -> None:
    settings = AnomalySettings(
        rules=(
            Rule(
                "young probers",
                Action.QUARANTINE,
                Match(kinds=frozenset({DetectionKind.PROBING}), enrolled_less_than=3600),
            ),
            Rule("rest", Action.ALERT),
        )
    )
    rig = Rig(settings=settings)
    from datetime import timedelta

    rig.register("young", enrolled_ago=timedelta(minutes=10))
    rig.register("old", enrolled_ago=timedelta(days=10))
    for identity in ("young", "old"):
        for topic in ("a", "b", "c"):
            rig.observe(Denied(identity, AclAction.SUBSCRIBE, f"fg/v1/dev/x/{topic}"))
    verdicts = {v.detection.identity: (v.action, v.rule) for v in rig.run(5)}
    assert verdicts == {
        "young": (Action.QUARANTINE, "young probers"),
        "old": (Action.ALERT, "rest"),
    }


def test_a_disabled_engine_does_nothing(rig: Rig) -> None:
    rig = Rig(settings=AnomalySettings(enabled=False))
    rig.device("dev-1", interval=0.01)
    rig.engine.clone_seen("dev-1", "a:1", "b:2")
    assert rig.run(30) == []
    assert len(rig.engine) == 0


def test_bad_observations_are_counted_never_raised(rig: Rig) -> None:
    rig.device("dev-1")
    engine = rig.engine
    engine.observe("not an observation")  # type: ignore[arg-type]
    engine.observe(Published("dev-1", "fg/v1/dev/dev-1/telemetry", -5))
    engine.observe(Published("dev-1", b"bytes topic", 5))  # type: ignore[arg-type]
    engine.observe(Published(None, "t", 5))  # type: ignore[arg-type]
    engine.observe(Connected("dev-1", 42))  # type: ignore[arg-type]
    engine.observe(CertificateIssued("dev-1", False, 1, None))  # type: ignore[arg-type]
    engine.clone_seen("dev-1", "", "b:1")
    assert engine.counters["ignored.malformed"] == 7
    assert engine.counters["ignored.error"] == 0


def test_a_failing_context_lookup_is_counted_and_treated_as_unknown() -> None:
    def broken(identity: str) -> IdentityContext | None:
        raise RuntimeError("registry down")

    engine = AnomalyEngine(FakeClock(), AnomalySettings(), broken)
    engine.observe(Connected("dev-1", "10.0.0.1:1"))
    engine.observe(Disconnected("dev-1"))
    assert engine.counters["context.error"] == 1  # asked once, then believed for a while
    assert engine.counters["ignored.unknown"] == 2
    assert engine.evaluate() == []


def test_an_enrollment_reported_with_its_registry_row_is_tracked_without_a_lookup() -> None:
    asked: list[str] = []

    def lookup(identity: str) -> IdentityContext | None:
        asked.append(identity)
        return None

    clock = FakeClock()
    engine = AnomalyEngine(clock, AnomalySettings(), lookup)
    engine.observe(Published("dev-1", "fg/v1/enroll/dev-1/req", 900))  # the enrollee's hello
    assert asked == ["dev-1"]  # not registered yet: a stranger
    row = IdentityRecord(
        id="dev-1",
        kind=IdentityKind.DEVICE,
        state=IdentityState.ACTIVE,
        created_at=clock.now(),
        updated_at=clock.now(),
        model="th-sensor",
        firmware_version="1.4.2",
        firmware_digest="a" * 64,
    )
    engine.observe(CertificateIssued("dev-1", True, "1.4.2", "a" * 64, registered=row))
    engine.observe(Connected("dev-1", "10.0.0.5:40000"))
    assert asked == ["dev-1"]  # the row came with the observation
    snapshot = engine.snapshot("dev-1")
    assert snapshot is not None and snapshot.reference != "unregistered"  # tracked
    # without the row the engine asks the registry, as before
    engine.observe(CertificateIssued("dev-2", True, "1.4.2", "a" * 64))
    assert asked == ["dev-1", "dev-2"]


def test_constructor_refuses_what_is_not_an_engine_part() -> None:
    with pytest.raises(TypeError):
        AnomalyEngine(object(), AnomalySettings(), lambda _: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AnomalyEngine(FakeClock(), {}, lambda _: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AnomalyEngine(FakeClock(), AnomalySettings(), None)  # type: ignore[arg-type]
