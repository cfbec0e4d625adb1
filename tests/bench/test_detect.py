"""The detection benchmark's figures from alerts and labels, the event stream's reading, the
offline replay hook and the detection switch (no gateway here)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gateway.bench import detect
from gateway.bench.detect import (
    Alert,
    DetectBenchError,
    DetectBenchOptions,
    DetectReason,
    EventLog,
    OfflineOutcome,
    Quarantine,
    configure_detection,
    load_offline_replay,
    render_detect,
    run_detect_bench,
    run_offline,
    score_fleet,
    score_scenario,
    short_options,
    summarize,
    with_table_keys,
)
from gateway.bench.home import make_bench_home
from gateway.config import CONFIG_NAME, load_settings
from simulators.scenarios import ScenarioLabels

P = "th-200-abc123-"  # the scenario's own devices
FLEET = frozenset(f"th-200-f1f1f1-fleet-{n:05d}" for n in range(1, 5))
N1, N2 = sorted(FLEET)[:2]
V1 = f"{P}probe-00002"  # a device the hostile mode brought along: normal
H1, H2, H3 = (f"{P}exfil-{n:05d}" for n in range(1, 4))


def labels(
    hostile: dict[str, float | None] | None = None, *, began: float = 0.0, ended: float = 3600.0
) -> ScenarioLabels:
    return ScenarioLabels("exfil", P, hostile or {}, FLEET, began, ended)


def alert(subject: str | None, at: float, detection: str = "rate_spike") -> Alert:
    return Alert(subject, at, detection=detection, action="quarantine", rule="r")


def test_every_hostile_device_found_and_nothing_else_is_perfect() -> None:
    score = score_scenario(
        labels({H1: 100.0, H2: 200.0, H3: 300.0}),
        [alert(H1, 110.0), alert(H1, 111.0), alert(H2, 230.0), alert(H3, 305.0, "new_topic")],
    )
    assert score.hostile == 3 and score.detected == 3
    assert score.precision == 1.0 and score.recall == 1.0
    assert score.ttd_p50_s == pytest.approx(10.0)  # nearest rank of 5, 10, 30
    assert score.ttd_max_s == pytest.approx(30.0)
    assert score.false_alerts == 0 and score.flagged_normal == 0
    assert score.detections == {"rate_spike": 3, "new_topic": 1}
    # The fleet of four beside three hostile devices, for an hour.
    assert score.devices == 7 and score.normal_devices == 4
    assert score.normal_device_hours == pytest.approx(4.0)


def test_without_hostile_devices_there_is_no_recall_and_any_alert_is_false() -> None:
    quiet = score_scenario(labels(), [])
    assert quiet.recall is None and quiet.precision is None and quiet.ttd_p50_s is None
    assert quiet.false_alerts == 0
    noisy = score_scenario(labels(), [alert(N1, 10.0), alert(N1, 20.0), alert(N2, 30.0)])
    assert noisy.recall is None
    assert noisy.precision == 0.0  # three alerts, two devices flagged, none hostile
    assert noisy.false_alerts == 3 and noisy.fleet_false_alerts == 3
    assert noisy.flagged_normal == 2


def test_no_detection_is_zero_recall_and_no_precision() -> None:
    score = score_scenario(labels({H1: 100.0}), [])
    assert score.recall == 0.0 and score.detected == 0
    assert score.precision is None
    assert score.ttd_p50_s is None and score.ttd_max_s is None


def test_an_alert_before_the_behaviour_started_is_a_false_alert() -> None:
    early_only = score_scenario(labels({H1: 100.0}), [alert(H1, 99.0)])
    assert early_only.detected == 0 and early_only.recall == 0.0
    assert early_only.false_alerts == 1 and early_only.premature_alerts == 1
    assert early_only.precision == 0.0  # flagged, but not for what it did
    early_and_late = score_scenario(labels({H1: 100.0}), [alert(H1, 99.0), alert(H1, 104.0)])
    assert early_and_late.detected == 1 and early_and_late.recall == 1.0
    assert early_and_late.ttd_max_s == pytest.approx(4.0)  # from the start, not the early alert
    assert early_and_late.false_alerts == 1 and early_and_late.premature_alerts == 1
    assert early_and_late.flagged_normal == 0


def test_a_hostile_device_that_never_started_is_not_missed_but_cannot_be_right() -> None:
    score = score_scenario(labels({H1: 100.0, H2: None}), [alert(H1, 101.0), alert(H2, 150.0)])
    assert score.hostile == 1 and score.recall == 1.0
    assert score.false_alerts == 1 and score.precision == 0.5


def test_a_false_alert_on_a_normal_device_lowers_precision_not_recall() -> None:
    score = score_scenario(labels({H1: 100.0}), [alert(H1, 120.0), alert(V1, 130.0)])
    assert score.recall == 1.0 and score.precision == 0.5
    assert score.false_alerts == 1 and score.flagged_normal == 1
    assert score.fleet_false_alerts == 0  # a victim of the prober, not the fleet


def test_what_belongs_to_a_scenario_is_its_own_devices_and_the_fleet_in_its_window() -> None:
    score = score_scenario(
        labels({H1: 100.0}, began=50.0, ended=200.0),
        [
            alert("th-200-ffffff-exfil-00001", 120.0),  # another scenario's device
            alert(None, 120.0),
            alert("detect-bench", 120.0),
            alert(N1, 49.0),  # the fleet before the window: the previous scenario's
            alert(N1, 200.5),  # ... and after it: the next one's
            alert(N2, 150.0),  # the fleet in the window: false
            alert(V1, 201.5),  # own device, within the grace: false
            alert(H1, 202.5),  # own device after the grace: late
        ],
        grace=2.0,
    )
    assert score.false_alerts == 2 and score.fleet_false_alerts == 1
    assert score.detected == 0 and score.late_alerts == 1


def test_quarantines_count_for_hostile_devices_after_their_start_only() -> None:
    score = score_scenario(
        labels({H1: 100.0, H2: 100.0}),
        [alert(H1, 101.0)],
        [Quarantine(H1, 101.5), Quarantine(H2, 50.0), Quarantine(N1, 120.0)],
    )
    assert score.quarantined == 1 and score.wrongly_quarantined == 2


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError):
        score_scenario(labels(), [], grace=-1.0)
    with pytest.raises(ValueError):
        score_fleet(FLEET, 0.0, 1.0, [], grace=-1.0)


def test_every_alert_about_the_fleet_while_it_ran_is_false() -> None:
    fleet = score_fleet(
        FLEET,
        100.0,
        100.0 + 2 * 3600,
        [alert(N1, 150.0), alert(N1, 4000.0), alert(N2, 7301.0), alert(N2, 7400.0),
         alert(H1, 200.0)],
        [Quarantine(N1, 4001.0), Quarantine(H1, 201.0)],
        grace=2.0,
    )
    assert fleet.devices == 4 and fleet.device_hours == pytest.approx(8.0)
    # warm-up and windows alike; 7301 is within the grace after the stop, 7400 is not
    assert fleet.false_alerts == 3 and fleet.flagged == 2 and fleet.quarantined == 1


def test_the_false_alert_rate_pools_the_fleet_the_scenarios_and_the_replay() -> None:
    fleet = score_fleet(FLEET, 0.0, 2 * 3600, [alert(N1, 10.0), alert(N1, 4000.0)])  # 8 h
    scores = [
        # one in the window about the fleet (already counted above), one about a victim
        score_scenario(
            labels({H1: 3000.0}, began=2000.0, ended=5000.0),
            [alert(H1, 3010.0), alert(N1, 4000.0), alert(V1, 4100.0)],
        ),
    ]
    live_only = summarize(scores, fleet)
    assert live_only["live_normal_device_hours"] == pytest.approx(8.0)
    assert live_only["live_false_alerts"] == 3  # not 4: the fleet's are counted once
    assert live_only["false_alerts_per_1000_device_hours"] == pytest.approx(375.0)
    assert live_only["goals_met"] == {
        "recall": True,
        "false_alerts": False,
        "time_to_detection": True,
    }
    pooled = summarize(scores, fleet, {"device_hours": 2992.0, "false_alerts": 0})
    assert pooled["normal_device_hours"] == pytest.approx(3000.0)
    assert pooled["false_alerts"] == 3
    assert pooled["false_alerts_per_1000_device_hours"] == pytest.approx(1.0)
    assert pooled["goals_met"]["false_alerts"] is True


def test_goals_nothing_measured_are_not_claimed() -> None:
    summary = summarize([score_scenario(labels(), [])])
    assert summary["goals_met"] == {
        "recall": None,
        "false_alerts": None,  # no fleet, no replay: no hour to count on
        "time_to_detection": None,
    }
    late = summarize([score_scenario(labels({H1: 0.0}), [alert(H1, 61.0)])])
    assert late["goals_met"]["time_to_detection"] is False


# -- the event stream --------------------------------------------------------------------------


def test_the_event_log_keeps_alerts_and_quarantines_stamped_on_arrival() -> None:
    ticks = iter([10.0, 11.0, 12.0, 13.0, 14.0])
    log = EventLog(clock=lambda: next(ticks))
    log(
        {
            "v": 1,
            "kind": "anomaly",
            "subject": H1,
            "at": "2026-01-01T00:00:00+00:00",
            "data": {
                "detection": "volume_drift",
                "score": "0.75",
                "reason": "telemetry volume 8x its baseline",
                "action": "quarantine",
                "rule": "volume",
            },
        }
    )
    quarantined = {"kind": "device", "state": "quarantined"}
    log({"kind": "state_changed", "subject": H1, "data": quarantined})
    log({"kind": "state_changed", "subject": H1, "data": {"state": "active"}})
    log({"kind": "connected", "subject": N1, "data": {}})
    # the broker's clone detection: quarantined at once, before any anomaly verdict
    log({"kind": "clone", "subject": H2, "data": {"first": "10.0.0.1", "second": "10.0.0.2"}})
    assert log.alerts() == [
        Alert(H1, 10.0, detection="volume_drift", action="quarantine", rule="volume", score=0.75),
        Alert(H2, 14.0, detection="clone", action="quarantine", rule="broker"),
    ]
    assert log.quarantines() == [Quarantine(H1, 11.0)]
    assert log.counts == {"anomaly": 1, "state_changed": 2, "connected": 1, "clone": 1}


@pytest.mark.parametrize(
    "body",
    [
        ["anomaly"],
        {"subject": H1},
        {"kind": 3, "subject": H1},
        {"kind": "anomaly", "subject": 7},
        {"kind": "anomaly", "subject": H1, "data": "rate_spike"},
    ],
)
def test_unreadable_events_are_counted_not_raised(body: object) -> None:
    log = EventLog(clock=lambda: 1.0)
    log(body)
    assert log.counts == {"malformed": 1} and log.alerts() == []


def test_an_alert_with_an_unreadable_score_is_kept_without_one() -> None:
    log = EventLog(clock=lambda: 1.0)
    for score in ("high", "nan", None):
        log({"kind": "anomaly", "subject": H1, "data": {"score": score}})
    assert [a.score for a in log.alerts()] == [None, None, None]


# -- the offline replay hook -------------------------------------------------------------------


def test_the_offline_replay_is_skipped_only_when_its_module_is_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detect, "OFFLINE_MODULE", "gateway.no_such_package.evaluate")
    assert load_offline_replay() is None
    monkeypatch.setattr(detect, "OFFLINE_MODULE", "gateway.bench.stats")  # no replay() there
    with pytest.raises(DetectBenchError) as caught:
        load_offline_replay()
    assert caught.value.reason is DetectReason.OFFLINE_REPLAY_INVALID


async def test_the_anomaly_packages_replay_counts_normal_hours_with_our_settings() -> None:
    pytest.importorskip("gateway.anomaly.evaluate")
    replay = load_offline_replay()
    assert replay is not None
    result = await run_offline(replay, 20.0, 3, {"warmup_minutes": 2})
    assert 16.0 <= result["device_hours"] <= 24.0  # about what was asked for
    assert result["false_alerts"] == sum(result["false_by_kind"].values())
    with pytest.raises(ValueError):  # the same settings the gateway is given, checked alike
        await run_offline(replay, 20.0, 3, {"warmup_minutes": 0})


@pytest.mark.parametrize(
    "outcome",
    [
        OfflineOutcome(-1.0, 0),
        OfflineOutcome(float("inf"), 0),
        OfflineOutcome(10.0, -1),
        OfflineOutcome(10.0, True),
        object(),
    ],
)
async def test_a_replay_that_returns_nonsense_is_an_error(outcome: Any) -> None:
    with pytest.raises(DetectBenchError) as caught:
        await run_offline(lambda hours, seed, table: outcome, 100.0, 0, {})
    assert caught.value.reason is DetectReason.OFFLINE_REPLAY_INVALID


async def test_an_offline_only_run_reports_the_replayed_hours_without_a_gateway() -> None:
    asked: list[tuple[float, int, Mapping[str, Any]]] = []

    def replay(hours: float, seed: int, table: Mapping[str, Any]) -> OfflineOutcome:
        asked.append((hours, seed, table))
        return OfflineOutcome(hours, 3, {"silence": 3})

    result = await run_detect_bench(
        DetectBenchOptions(
            live=False,
            offline_device_hours=6000.0,
            seed=4,
            detection_settings={"warmup_minutes": "2", "thresholds.spike_z": "8.0"},
        ),
        offline_replay=replay,
    )
    assert asked == [(6000.0, 4, {"warmup_minutes": 2, "thresholds": {"spike_z": 8.0}})]
    assert result["scenarios"] == [] and result["fleet"] is None
    assert result["offline"]["device_hours"] == 6000.0
    assert result["offline"]["false_by_kind"] == {"silence": 3}
    assert result["normal_device_hours"] == 6000.0
    assert result["false_alerts_per_1000_device_hours"] == pytest.approx(0.5)
    assert result["goals_met"] == {
        "recall": None,
        "false_alerts": True,
        "time_to_detection": None,
    }


async def test_an_offline_only_run_without_the_replay_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detect, "OFFLINE_MODULE", "gateway.no_such_package.evaluate")
    with pytest.raises(DetectBenchError) as caught:
        await run_detect_bench(DetectBenchOptions(live=False))
    assert caught.value.reason is DetectReason.OFFLINE_REPLAY_MISSING


# -- options, the switch, the table ------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"scenarios": ()},
        {"broker": "rabbitmq"},
        {"grace": -1.0},
        {"offline_device_hours": float("nan")},
        {"response_timeout": 0.0},
        {"live": False, "offline_device_hours": 0.0},
        {"scenarios": ("exfil",)},
        {"fleet": 20},
        {"detection_settings": {"enabled": "false"}},
        {"detection_settings": {"warmup_minutes": 1}},
        {"detection_settings": {"warmup_minutes": "one"}},
    ],
)
def test_bad_detect_options_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        DetectBenchOptions(**changes)  # type: ignore[arg-type]


def test_the_default_run_has_every_hostile_mode_and_a_control_after_a_warm_fleet() -> None:
    options = DetectBenchOptions()
    assert [s.mode for s in options.scenarios] == [
        "prober", "flood", "clone", "tamper", "exfil", "normal",
    ]
    # Longer than the gateway's default anomaly.warmup_minutes (5): baselines to compare with.
    assert options.fleet.warmup > 5 * 60
    (exfil,) = [s for s in options.scenarios if s.mode == "exfil"]
    assert exfil.ramp.warmup > 5 * 60 and exfil.seconds - exfil.ramp.warmup >= 60


def test_table_keys_are_replaced_added_or_given_a_table() -> None:
    text = "[broker]\nkind = \"embedded\"\n\n[anomaly]\nenabled = false  # off\n"
    changed = with_table_keys(text, "anomaly", {"enabled": "true", "warmup_minutes": "1"})
    assert changed == (
        "[broker]\nkind = \"embedded\"\n\n[anomaly]\nwarmup_minutes = 1\nenabled = true  # off\n"
    )
    fresh = with_table_keys("[broker]\nkind = \"embedded\"", "anomaly", {"enabled": "true"})
    assert fresh == "[broker]\nkind = \"embedded\"\n\n[anomaly]\nenabled = true\n"


def test_detection_is_switched_in_the_home_or_refused_by_a_gateway_without_it(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    make_bench_home(home, broker="embedded")
    before = (home / CONFIG_NAME).read_text()
    try:
        configure_detection(home, True, {"warmup_minutes": "1"})
    except DetectBenchError as exc:
        # A gateway whose settings know no [anomaly]: nothing turned on, nothing changed.
        assert exc.reason is DetectReason.DETECTION_UNAVAILABLE
        assert (home / CONFIG_NAME).read_text() == before
    else:
        text = (home / CONFIG_NAME).read_text()
        assert "enabled = true" in text and "warmup_minutes = 1" in text
        load_settings(home)
    # Off is always possible: a gateway without detection is off already.
    configure_detection(home, False, {})
    load_settings(home)


def test_the_table_shows_each_scenario_and_the_goals() -> None:
    fleet = score_fleet(FLEET, 0.0, 7200.0, [alert(N1, 5.0)])
    scores = [score_scenario(labels({H1: 100.0}, began=50.0, ended=3000.0), [alert(H1, 112.0)])]
    result = {
        "scenarios": [s.as_dict() for s in scores],
        **summarize(scores, fleet),
        "offline": {"available": False},
        "parameters": DetectBenchOptions().parameters(),
    }
    console = Console(record=True, width=200)
    console.print(render_detect(result))
    text = console.export_text()
    assert "exfil" in text and "12.0 s" in text
    assert "not available" in text  # the offline replay
    assert "MISSED" in text  # one false alert in eight hours


def test_the_short_preset_is_minutes_long_and_trusts_one_clean_minute() -> None:
    options = short_options(broker="mosquitto")
    assert options.broker == "mosquitto"
    assert options.detection_settings == {"warmup_minutes": "1"}
    live = options.fleet.warmup + sum(s.seconds for s in options.scenarios)
    assert live <= 10 * 60
    # the fleet has a whole clean minute before the first hostile device shows up
    assert options.fleet.warmup >= 80
    assert options.offline_device_hours >= 1000


def test_the_offline_replay_gives_the_device_hours_asked_for() -> None:
    replay = load_offline_replay()
    if replay is None:
        pytest.skip("the anomaly package has no replay")
    outcome = replay(100.0, 3, {"warmup_minutes": 1})
    # devices join over the first hour: the replay runs long enough to make up for it
    assert 90.0 <= outcome.device_hours <= 110.0


def test_bench_detect_offline_only_prints_the_false_alert_rate() -> None:
    import json

    from typer.testing import CliRunner

    from gateway.cli import app

    result = CliRunner().invoke(
        app, ["bench", "detect", "--offline-only", "--offline-hours", "50", "--json"]
    )
    if load_offline_replay() is None:
        assert result.exit_code != 0 and "offline_replay_missing" in result.output
        return
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["scenarios"] == [] and data["offline"]["device_hours"] >= 45
    assert data["false_alerts_per_1000_device_hours"] is not None
    bad = CliRunner().invoke(app, ["bench", "detect", "--offline-only", "--setting", "x"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output
