"""Labelled scenarios: their description and labels, then short runs against real gateways
with detection off (these check the labels and the harness, not a detector)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.bench.detect import DetectBenchOptions, run_detect_bench
from gateway.bench.home import make_bench_home
from gateway.home import pem
from gateway.service import Gateway
from pki.clock import SystemClock
from pki.factory import FactoryCA
from simulators.factory import load_or_create_factory
from simulators.modes import ExfilRamp, Mode, ModeOptions
from simulators.scenarios import (
    CONTROL,
    HOSTILE_MODES,
    FleetPlan,
    NormalFleet,
    Scenario,
    ScenarioLabels,
    Target,
    hostile_ids,
    label_scenario,
    quick_scenarios,
    run_scenario,
    short_plan,
    standard_scenarios,
)

P = "th-200-abc123-"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"mode": "replay"}, ValueError),
        ({"hostile_devices": 2.0}, TypeError),
        ({"mode": CONTROL, "hostile_devices": 1}, ValueError),
        ({"mode": "flood", "hostile_devices": 2}, ValueError),
        ({"hostile_devices": 0}, ValueError),
        ({"seconds": 0.0}, ValueError),
        ({"seconds": float("inf")}, ValueError),
        ({"seconds": 30.0, "ramp": ExfilRamp(warmup=30.0)}, ValueError),  # ends in the warm-up
        ({"ramp": {"warmup": 1.0}}, TypeError),
    ],
)
def test_bad_scenarios_are_refused(changes: dict[str, object], error: type[Exception]) -> None:
    fields: dict[str, object] = {"mode": "exfil", "seconds": 400.0, **changes}
    with pytest.raises(error):
        Scenario(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"devices": 0}, ValueError),
        ({"devices": True}, TypeError),
        ({"warmup": -1.0}, ValueError),
        ({"telemetry_interval": 0.0}, ValueError),
        ({"telemetry_interval": "2"}, TypeError),
    ],
)
def test_bad_fleet_plans_are_refused(changes: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        FleetPlan(**changes)  # type: ignore[arg-type]


def test_the_standard_set_is_every_hostile_mode_then_a_control() -> None:
    scenarios = standard_scenarios(hostile_devices=3, seconds=60.0)
    assert [s.mode for s in scenarios] == [*HOSTILE_MODES, CONTROL]
    assert {s.mode: s.hostile_devices for s in scenarios} == {
        "prober": 3, "flood": 1, "clone": 3, "tamper": 3, "exfil": 3, "normal": 0,
    }
    # Every window lasts 60 s once its hostile behaviour has begun.
    assert all(s.seconds - (s.ramp.warmup if s.mode == "exfil" else 0) == 60 for s in scenarios)
    plan, short = short_plan()
    assert [s.mode for s in short] == [*HOSTILE_MODES, CONTROL]
    assert plan.warmup + sum(s.seconds for s in short) <= 120


def test_the_quick_set_gives_exfil_devices_two_minutes_and_a_minute_of_ramp() -> None:
    scenarios = quick_scenarios(hostile_devices=2, seconds=30.0, exfil_warmup=130.0)
    assert [s.mode for s in scenarios] == [*HOSTILE_MODES, CONTROL]
    (exfil,) = [s for s in scenarios if s.mode == "exfil"]
    # two whole minutes connected (one clean minute at least, whatever the first one holds)
    assert exfil.ramp.warmup >= 120 and exfil.seconds - exfil.ramp.warmup == 60
    assert sum(s.seconds for s in scenarios) <= 6 * 60


def _options(devices: int, batch: str = "abc123") -> ModeOptions:
    return ModeOptions(
        mode=Mode.NORMAL,
        devices=devices,
        host="127.0.0.1",
        enrollment_port=1883,
        operational_port=8883,
        ca_pem=b"-----BEGIN CERTIFICATE-----\n",
        batch=batch,
    )


def test_hostile_ids_are_the_misbehaving_devices_only() -> None:
    probers = hostile_ids("prober", _options(4))
    assert probers == [f"{P}probe-00001", f"{P}probe-00003"]  # the victims are 2 and 4
    assert hostile_ids("flood", _options(4)) == [f"{P}flooder-00001"]
    assert hostile_ids("exfil", _options(2)) == [f"{P}exfil-00001", f"{P}exfil-00002"]
    with pytest.raises(ValueError):
        hostile_ids(CONTROL, _options(2))


FLEET = frozenset({"th-200-f1f1f1-fleet-00001"})


def test_labels_take_the_recorded_start_else_the_mode_start() -> None:
    prober = label_scenario("prober", P, [f"{P}probe-00001"], {}, 40.0, FLEET, 0.0, 100.0)
    assert prober.started(f"{P}probe-00001") == 40.0
    exfil = label_scenario(
        "exfil",
        P,
        [f"{P}exfil-00001", f"{P}exfil-00002"],
        {f"{P}exfil-00001": 71.5},
        40.0,
        FLEET,
        0.0,
        100.0,
    )
    assert exfil.started(f"{P}exfil-00001") == 71.5
    # An exfil device that was not recorded never misbehaved: nothing to detect.
    assert f"{P}exfil-00002" in exfil.hostile and exfil.started(f"{P}exfil-00002") is None
    assert exfil.started("th-200-f1f1f1-fleet-00001") is None
    assert exfil.own(f"{P}probe-00009") and not exfil.own("th-200-f1f1f1-fleet-00001")
    assert not exfil.own(None)
    assert exfil.normal_device_hours == pytest.approx(100.0 / 3600)


@pytest.mark.parametrize(
    ("hostile", "fleet", "began", "ended"),
    [
        ({"th-200-ffffff-exfil-00001": 1.0}, set(), 0.0, 10.0),  # another prefix
        ({}, {f"{P}fleet-00001"}, 0.0, 10.0),  # the fleet under the scenario's prefix
        ({}, set(), 10.0, 0.0),  # ends before it begins
    ],
)
def test_inconsistent_labels_are_refused(
    hostile: dict[str, float], fleet: set[str], began: float, ended: float
) -> None:
    with pytest.raises(ValueError):
        ScenarioLabels("exfil", P, hostile, frozenset(fleet), began, ended)


async def test_a_hostile_mode_that_fails_is_recorded_and_its_window_still_closes() -> None:
    factory = FactoryCA.create("Acme Sensors", SystemClock())
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = Target("127.0.0.1", port, port, pem(factory.root), response_timeout=2.0)
    run = await run_scenario(
        Scenario("prober", hostile_devices=1, seconds=1.0), target, factory, FLEET,
        telemetry_interval=1.0,
    )
    assert run.summary is None and run.error is not None
    assert run.labels.seconds >= 1.0
    # Labelled all the same: a prober that never probed counts as one not detected.
    assert len(run.labels.hostile) == 1


# -- against real gateways ---------------------------------------------------------------------


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Gateway, FactoryCA]]:
    settings = make_bench_home(tmp_path / "home", broker="embedded")
    running = Gateway(settings)
    try:
        await running.start()
        yield running, load_or_create_factory(settings.home / "factory")
    finally:
        await running.stop()


def _quick(mode: str) -> Scenario:
    return Scenario(
        mode,
        hostile_devices=1,
        seconds=6.0,
        ramp=ExfilRamp(warmup=1.0, step_seconds=0.5, step_pct=50.0),
    )


@pytest.mark.broker
@pytest.mark.slow
async def test_scenarios_label_the_devices_the_gateway_really_enrolled(
    gateway: tuple[Gateway, FactoryCA],
) -> None:
    running, factory = gateway
    target = Target(
        "127.0.0.1",
        running.ports.enrollment,
        running.ports.operational,
        running.ca_chain_pem(),
        response_timeout=5.0,
    )
    fleet = NormalFleet(FleetPlan(devices=2, warmup=0.0, telemetry_interval=0.5), target, factory)
    fleet.start()
    stop = asyncio.Event()
    runs = {
        mode: await run_scenario(
            _quick(mode), target, factory, fleet.ids, telemetry_interval=0.5, stop=stop
        )
        for mode in ("prober", "clone", "exfil")
    }
    assert not stop.is_set()  # a window's end is its own, not its caller's
    assert fleet.running  # and not the fleet's
    summary = await fleet.stop()
    assert summary.enrolled == 2 and summary.telemetry > 0
    known = {i.id for i in running.store.list_identities()}
    assert fleet.ids <= known
    for mode, run in runs.items():
        labels = run.labels
        assert labels.fleet == fleet.ids and labels.seconds >= 6.0
        assert len(labels.hostile) == 1
        (hostile,) = labels.hostile
        # The label names a device the gateway knows, misbehaving within the window.
        assert hostile in known
        started = labels.started(hostile)
        assert started is not None and labels.began <= started <= labels.ended
        own = {i for i in known if labels.own(i)}
        if mode == "prober":
            (victim,) = own - {hostile}
            assert labels.started(victim) is None  # brought along, normal
        else:
            assert own == {hostile}
        if mode == "exfil":
            assert run.summary is not None and run.summary.telemetry > 0
            assert started >= labels.began + 1.0  # after its warm-up


@pytest.mark.broker
@pytest.mark.slow
async def test_the_bench_hears_a_clone_quarantine_on_the_event_stream(tmp_path: Path) -> None:
    clone = Scenario("clone", hostile_devices=1, seconds=6.0)
    result = await run_detect_bench(
        DetectBenchOptions(
            fleet=FleetPlan(devices=2, warmup=3.0, telemetry_interval=0.5),
            scenarios=(clone,),
            detection=False,
            offline_device_hours=0.0,
            settle=1.0,
            response_timeout=5.0,
            work_dir=tmp_path,
        )
    )
    (row,) = result["scenarios"]
    assert row["mode"] == "clone" and row["hostile"] == 1 and row["devices"] == 3
    # The broker's clone detection quarantined it; the bench saw it as an operator would.
    assert row["quarantined"] == 1 and row["wrongly_quarantined"] == 0
    assert result["events"]["clone"] >= 1 and result["events"]["state_changed"] >= 1
    assert row["false_alerts"] == 0 and result["unattributed_alerts"] == 0
    fleet = result["fleet"]
    assert fleet["devices"] == 2 and fleet["quarantined"] == 0
    # The fleet ran through the warm-up and the window.
    assert fleet["device_hours"] >= 2 * (3.0 + 6.0) / 3600
    assert result["fleet_simulation"]["enrolled"] == 2
