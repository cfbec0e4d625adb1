"""Each hostile behaviour is detected soon after it starts, with a reason an operator can read;
its normal counterpart is not."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from anomaly_rig import Rig, first, kinds, warm_fleet

from gateway.acl import Action as AclAction
from gateway.anomaly import Action, DetectionKind
from gateway.observe import (
    CertificateIssued,
    Connected,
    Denied,
    Disconnected,
    Published,
    RequestRefused,
)


@pytest.fixture
def warm(rig: Rig) -> Rig:
    warm_fleet(rig, 5)
    return rig


def test_a_flood_is_a_rate_spike_within_seconds_and_strong_enough_to_quarantine(
    warm: Rig,
) -> None:
    warm.senders["th-sensor-0"].interval = 0.05  # 20 msg/s instead of one per 5 s
    found = warm.run(20)
    spike = first(found, DetectionKind.RATE_SPIKE)
    assert spike.detection.identity == "th-sensor-0"
    assert (spike.detection.at - warm.clock.now()) < timedelta(seconds=20)
    assert "msg/min" in spike.detection.reason and "its own median of 12" in spike.detection.reason
    # It keeps flooding: the verdict escalates to quarantine once the evidence is strong.
    found += warm.run(20)
    assert any(
        v.action is Action.QUARANTINE and v.detection.kind is DetectionKind.RATE_SPIKE
        for v in found
    )
    assert {v.detection.identity for v in found} == {"th-sensor-0"}


def test_a_modest_rise_is_an_alert_not_a_quarantine(warm: Rig) -> None:
    warm.senders["th-sensor-1"].interval = 2.5  # twice its rate
    found = warm.run(60)
    spike = first(found, DetectionKind.RATE_SPIKE)
    assert spike.action is Action.ALERT
    assert 0.5 <= spike.detection.score < 0.9
    # Found as soon as the window crosses the alarm level, before it fills with the new rate.
    assert re.fullmatch(
        r"publishes \d+ msg/min, 1\.\dx its own median of 12 \(MAD \d\)", spike.detection.reason
    )


def test_bigger_messages_at_the_usual_rate_are_a_byte_spike(warm: Rig) -> None:
    warm.senders["th-sensor-2"].size = 2000
    spike = first(warm.run(30), DetectionKind.RATE_SPIKE)
    assert spike.detection.reason.startswith("sends ")
    assert "kB/min" in spike.detection.reason
    assert spike.detection.evidence["reference"] == "own"


def test_one_extra_message_from_a_steady_device_is_not_a_spike(warm: Rig) -> None:
    for extra in range(2):
        warm.observe(Published("th-sensor-3", "fg/v1/dev/th-sensor-3/telemetry", 82))
        assert warm.run(30) == [], extra


def test_exfiltration_by_growing_messages_is_a_volume_drift_within_minutes(warm: Rig) -> None:
    # Twice the usual size after 10 minutes, and growing: too slow for a spike at first.
    started = warm.elapsed
    warm.senders["th-sensor-4"].size = lambda t: int(82 * (1 + (t - started) / 600))
    found = warm.run(300)
    drift = first(found, DetectionKind.VOLUME_DRIFT)
    assert drift.detection.identity == "th-sensor-4"
    assert (drift.detection.at - warm.clock.now()) + timedelta(seconds=300) <= timedelta(minutes=5)
    assert drift.detection.reason.startswith("its messages have been growing")
    assert drift.action is Action.REATTEST
    assert warm.engine.reattest_required("th-sensor-4")
    # Fresh attestation lifts the demand.
    warm.observe(CertificateIssued("th-sensor-4", True, "1.4.2", "a" * 64))
    assert not warm.engine.reattest_required("th-sensor-4")


def test_exfiltration_by_more_messages_is_detected_too(warm: Rig) -> None:
    started = warm.elapsed
    sender = warm.senders["th-sensor-0"]
    found = []
    for _ in range(30):  # rate up by 10% of the usual each minute
        sender.interval = 5.0 / (1 + (warm.elapsed - started) / 600)
        found += warm.run(20)
        if found:
            break
    assert found and found[0].detection.kind in (
        DetectionKind.VOLUME_DRIFT,
        DetectionKind.RATE_SPIKE,
    )
    assert warm.elapsed - started <= 8 * 60


def test_a_connected_device_that_stops_publishing_is_silent_within_a_minute(warm: Rig) -> None:
    warm.senders["th-sensor-1"].active = False
    found = warm.run(60)
    silence = first(found, DetectionKind.SILENCE)
    assert silence.detection.identity == "th-sensor-1"
    assert silence.action is Action.ALERT
    assert (
        "silent for" in silence.detection.reason and "while connected" in silence.detection.reason
    )
    assert warm.run(120) == []  # one detection per silence


def test_a_device_that_disconnects_is_offline_not_silent(warm: Rig) -> None:
    warm.senders["th-sensor-1"].active = False
    warm.observe(Disconnected("th-sensor-1"))
    assert warm.run(300) == []


def test_a_returning_device_is_not_judged_on_its_silent_minutes(warm: Rig) -> None:
    sender = warm.senders["th-sensor-2"]
    sender.active = False
    assert kinds(warm.run(40 * 60)) == [DetectionKind.SILENCE]
    sender.active = True
    sender.due = warm.elapsed + 1
    assert warm.run(10 * 60) == []


def test_a_topic_pattern_new_to_the_device_and_its_peers_is_news(rig: Rig) -> None:
    warm_fleet(rig, 5, minutes=70)  # past the topic warm-up
    rig.observe(Published("th-sensor-0", "fg/v1/dev/th-sensor-0/state", 120))
    news = first(rig.run(5), DetectionKind.NEW_TOPIC)
    assert "fg/v1/dev/{id}/state" in news.detection.reason
    assert "fg/v1/dev/{id}/telemetry" in news.detection.reason
    assert news.action is Action.ALERT


def test_a_topic_its_peers_use_is_not_news(rig: Rig) -> None:
    warm_fleet(rig, 5, minutes=70)
    for index in range(1, 5):  # the others used it all along
        rig.engine.reset(f"th-sensor-{index}")
    for index in range(1, 5):
        rig.observe(Published(f"th-sensor-{index}", f"fg/v1/dev/th-sensor-{index}/state", 99))
    rig.observe(Published("th-sensor-0", "fg/v1/dev/th-sensor-0/state", 99))
    assert DetectionKind.NEW_TOPIC not in kinds(rig.run(5))


def test_renewal_and_enrollment_requests_are_never_news(rig: Rig) -> None:
    warm_fleet(rig, 3, minutes=70)
    rig.observe(Published("th-sensor-0", "fg/v1/dev/th-sensor-0/renew/req", 900))
    rig.observe(Published("th-sensor-0", "fg/v1/enroll/th-sensor-0/req", 1400))
    assert rig.run(5) == []


def test_denied_attempts_on_other_devices_topics_are_probing(warm: Rig) -> None:
    for topic in ("fg/v1/dev/th-sensor-1/cmd/#", "fg/v1/#", "#"):
        warm.observe(Denied("th-sensor-0", AclAction.SUBSCRIBE, topic))
    warm.observe(Denied("th-sensor-0", AclAction.PUBLISH, "fg/v1/dev/th-sensor-1/cmd/reboot"))
    probing = first(warm.run(5), DetectionKind.PROBING)
    assert probing.action is Action.QUARANTINE
    reason = probing.detection.reason
    assert reason.startswith("4 denied attempts on 4 topics")
    assert "publish 1, subscribe 3" in reason
    assert probing.detection.evidence["denied_subscribe"] == 3


def test_a_single_denial_is_not_probing(warm: Rig) -> None:
    warm.observe(Denied("th-sensor-0", AclAction.PUBLISH, "fg/v1/dev/th-sensor-0/cmd/x"))
    warm.observe(Denied("th-sensor-0", AclAction.PUBLISH, "fg/v1/dev/th-sensor-0/cmd/x"))
    assert warm.run(5) == []


def test_reconnecting_every_ten_seconds_is_a_storm_within_a_minute(warm: Rig) -> None:
    found = []
    for port in range(40001, 40010):
        warm.observe(Disconnected("th-sensor-3"))
        warm.observe(Connected("th-sensor-3", f"10.0.1.4:{port}"))
        found += warm.run(10)
        if found:
            break
    storm = first(found, DetectionKind.RECONNECT_STORM)
    assert storm.action is Action.SHORTEN_LIFETIME and storm.lifetime_seconds == 900
    assert warm.engine.lifetime_cap("th-sensor-3") == 900
    assert storm.detection.reason == "connected 6 times in 300 s from 1 host (alarm at 6)"
    assert port - 40000 <= 6


def test_a_reconnect_from_a_new_host_is_a_new_source(warm: Rig) -> None:
    warm.observe(Disconnected("th-sensor-2"))
    warm.observe(Connected("th-sensor-2", "198.51.100.9:51000"))
    source = first(warm.run(5), DetectionKind.NEW_SOURCE)
    assert source.detection.reason == (
        "connected from 198.51.100.9, an address it never used before (known: 10.0.1.3)"
    )
    assert source.action is Action.ALERT


def test_a_new_source_port_on_a_known_host_is_not_news(warm: Rig) -> None:
    warm.observe(Disconnected("th-sensor-2"))
    warm.observe(Connected("th-sensor-2", "10.0.1.3:59999"))
    assert warm.run(5) == []


def test_firmware_changed_at_renewal_without_attestation(warm: Rig) -> None:
    warm.observe(CertificateIssued("th-sensor-1", False, "1.4.2", "a" * 64))  # same: fine
    assert warm.run(5) == []
    warm.observe(CertificateIssued("th-sensor-1", False, "1.5.0", "c" * 64))
    change = first(warm.run(5), DetectionKind.FIRMWARE_CHANGE)
    assert change.action is Action.QUARANTINE
    assert change.detection.score == 1.0
    assert "1.5.0" in change.detection.reason and "1.4.2" in change.detection.reason
    assert "without re-attesting" in change.detection.reason


def test_firmware_changed_with_attestation_is_not_an_alert(warm: Rig) -> None:
    warm.observe(CertificateIssued("th-sensor-1", True, "1.5.0", "c" * 64))
    assert warm.run(5) == []
    # ... and the measured firmware is the reference from now on.
    warm.observe(CertificateIssued("th-sensor-1", False, "1.5.0", "c" * 64))
    assert warm.run(5) == []
    warm.observe(CertificateIssued("th-sensor-1", False, "1.4.2", "a" * 64))
    assert kinds(warm.run(5)) == [DetectionKind.FIRMWARE_CHANGE]


def test_a_clone_is_quarantined_at_the_next_evaluation(warm: Rig) -> None:
    warm.engine.clone_seen("th-sensor-0", "10.0.1.1:40000", "203.0.113.7:41000")
    verdicts = warm.engine.evaluate()
    assert kinds(verdicts) == [DetectionKind.CLONE]
    assert verdicts[0].action is Action.QUARANTINE
    assert verdicts[0].detection.reason == (
        "two sessions with one identity: 10.0.1.1:40000 was live when 203.0.113.7:41000 connected"
    )


def test_a_new_device_is_held_to_its_peers_before_it_has_a_history(warm: Rig) -> None:
    warm.register("newcomer")
    warm.device("newcomer", remote="10.0.2.1:40000", interval=0.5)  # 10x its peers
    spike = first(warm.run(30), DetectionKind.RATE_SPIKE)
    assert spike.detection.identity == "newcomer"
    assert spike.detection.evidence["reference"] == "peers"
    assert "no history of its own yet" in spike.detection.reason
    assert "the 5 warm peers of model th-sensor" in spike.detection.reason


def test_a_new_device_behaving_like_its_peers_is_not_flagged(warm: Rig) -> None:
    warm.register("newcomer")
    warm.device("newcomer", remote="10.0.2.1:40000")
    assert warm.run(30 * 60) == []
    assert warm.engine.snapshot("newcomer").reference == "own"  # type: ignore[union-attr]


def test_firmware_refused_at_enrollment_is_detected_even_for_an_unregistered_device(
    warm: Rig,
) -> None:
    warm.observe(RequestRefused("tampered-1", "firmware_not_allowed"))
    found = first(warm.run(5), DetectionKind.FIRMWARE_CHANGE)
    assert found.detection.identity == "tampered-1"
    assert "allow-list" in found.detection.reason
    # not in the registry: nothing to quarantine, the operators are told
    assert found.action is Action.ALERT


def test_other_refusals_are_the_protocol_working_not_detections(warm: Rig) -> None:
    for reason in ("rate_limited", "nonce_expired", "malformed", "not_enrolled"):
        warm.observe(RequestRefused("th-sensor-1", reason))
    assert warm.run(5) == []


def test_a_device_enrolling_right_after_its_hellos_is_tracked_at_once(warm: Rig) -> None:
    # its hellos came before it was registered: a stranger for a moment
    warm.observe(Published("th-fresh", "fg/v1/enroll/th-fresh/req", 900))
    warm.register("th-fresh", enrolled_ago=timedelta(0))
    warm.observe(CertificateIssued("th-fresh", True, "1.4.2", "a" * 64))
    # a renewal with other firmware a second later is judged against the attested one
    warm.clock.advance(timedelta(seconds=1))
    warm.observe(CertificateIssued("th-fresh", False, "1.5.0", "c" * 64))
    change = first(warm.run(5), DetectionKind.FIRMWARE_CHANGE)
    assert change.detection.identity == "th-fresh"
    assert change.action is Action.QUARANTINE
